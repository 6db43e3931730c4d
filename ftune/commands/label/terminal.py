"""Labelling at the keys: one prompt at a time, one key per decision, no mouse.

The first open prompt is always the one shown, so undo (which can reopen an earlier
prompt) and resume need no bookkeeping of their own. Every key that decides something is
saved before the next key is read.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable

from ftune.commands.label.export import good_and_bad
from ftune.commands.label.session import BAD, GOOD, Session

HELP = """keys:
  g    the current answer is good
  b    the current answer is bad (then an optional note on why; Enter for none)
  1-{n}  this answer is the best: the prompt is done (best against each other answer)
  s    skip this prompt
  u    undo the last decision (it may reopen an earlier prompt)
  q    quit: every decision is saved; run the same command (or add --resume) to continue
  ?    this help"""


class Keys:
    """Single key presses from the terminal: no Enter, no echo; Ctrl-C still interrupts.

    `with Keys():` keeps the terminal in cbreak mode for the whole session (switched per
    key, keys typed in between would be echoed or lost) and restores it however it ends.
    """

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.saved = None

    def __enter__(self) -> Keys:
        import termios
        import tty

        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)  # TCSANOW: keys typed ahead are kept
        return self

    def __exit__(self, *exc) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self) -> str:
        first = os.read(self.fd, 1)
        if not first:
            return ""  # the terminal went away: quit
        if first == b"\x1b":  # an escape sequence (arrow keys): read it whole and ignore it
            while select.select([self.fd], [], [], 0.05)[0]:
                os.read(self.fd, 16)
            return "\x1b"
        data = first
        while data[0] >= 0xC0 and len(data) < 4:  # the rest of a UTF-8 character
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                data += os.read(self.fd, 1)
        return data.decode("utf-8", "replace")

    def drop_typed_ahead(self) -> None:
        """Keys pressed before a prompt's answers were on screen decide nothing about them."""
        import termios

        termios.tcflush(self.fd, termios.TCIFLUSH)

    def line(self, prompt: str) -> str:
        import termios
        import tty

        termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
        try:
            return input(prompt)
        except EOFError:
            return ""
        finally:
            tty.setcbreak(self.fd, termios.TCSANOW)


def label(session: Session, *, generate: Callable[[int], None], console, keys: Keys) -> bool:
    """Ask until every prompt is decided (True) or the user quits (False)."""
    shown = None
    while True:
        index = session.next_open()
        if index is None:
            return True
        item = session.items[index]
        if item.answers is None:
            console.print(f"sampling {session.sampling['n']} answers to the prompt on line {item.line}...", markup=False)
            generate(index)
        if shown != index:
            if shown is None or session.items[shown].done:  # a new prompt, not the same one shown again
                keys.drop_typed_ahead()
            show(session, index, console)
            shown = index
        n = len(item.answers)
        cursor = item.labels.index(None)
        best = "1 best" if n == 1 else f"1-{n} best"
        console.print(f"answer {cursor + 1} of {n}: g good · b bad · {best} · s skip · u undo · q quit · ? help > ", end="", markup=False)
        key = keys.read()
        if key in ("q", "Q", "\x04", ""):
            console.print("q: quit", markup=False)
            return False
        if key in ("g", "b"):
            label_ = GOOD if key == "g" else BAD
            session.decide(index, "keys", lambda it: it.labels.__setitem__(cursor, label_))
            console.print(f"{key}: answer {cursor + 1} is {label_}", markup=False)
            if label_ == BAD:
                note = " ".join(keys.line("  why? (a short note; Enter for none) ").split())
                if note:
                    item.notes[cursor] = note
                    session.save()
        elif len(key) == 1 and key in "123456789" and int(key) <= n:
            session.decide(index, "keys", lambda it: setattr(it, "best", int(key) - 1))
            console.print(f"{key}: answer {key} is the best", markup=False)
        elif key == "s":
            session.decide(index, "keys", lambda it: setattr(it, "skipped", True))
            console.print("s: skipped", markup=False)
        elif key == "u":
            undone = session.undo()
            console.print("u: nothing to undo" if undone is None else f"u: undid the last decision (line {session.items[undone].line})", markup=False)
            shown = None
        elif key == "?":
            console.print("?\n" + HELP.format(n=n), markup=False)
        elif key in ("\n", "\r", " "):
            console.print("", markup=False)
        else:
            console.print(f"{key!r} is not a key here; ? shows the keys", markup=False)
        if item.done:
            good, bad = good_and_bad(item)
            console.print(f"line {item.line} done: " + ("skipped" if item.skipped else f"{len(good)} good, {len(bad)} bad"
                          + (f", best: answer {item.best + 1}" if item.best is not None else "")), markup=False)


def show(session: Session, index: int, console) -> None:
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.text import Text

    item = session.items[index]
    decided = sum(it.done for it in session.items)
    console.print(Rule(Text(f"prompt {index + 1} of {len(session.items)} · {session.prompts_file} line {item.line} · "
                            f"{decided} decided", style="bold")))
    console.print(Panel(Text(item.prompt), title="prompt", title_align="left", border_style="cyan"))
    if item.sampled > len(item.answers):
        console.print(f"({item.sampled} sampled; identical answers are shown once)", markup=False)
    for i, text in enumerate(item.answers):
        mark = "best" if i == item.best else item.labels[i] or ""
        if mark == BAD and item.notes[i]:
            mark += f": {item.notes[i]}"
        style = {GOOD: "green", BAD: "red"}.get(item.labels[i], "white")
        body = Text(text) if text.strip() else Text("(empty answer)", style="italic")
        console.print(Panel(body, title=f"answer {i + 1}", title_align="left", subtitle=mark or None, subtitle_align="right",
                            border_style=style))

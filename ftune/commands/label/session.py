"""A labelling session: its prompts, the answers generated for them, and every decision.

It lives in one JSON file in the output directory, rewritten atomically after each
generation and each decision, so a quit, Ctrl-C or kill loses nothing and `--resume`
shows the very answers that were labelled (they are never generated again). The file's
header marks the directory as ftune's; the output files it lists, with the hashes ftune
wrote, are the only files a session replaces.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ftune.artifacts.ownership import make_parents, refuse_file_on_path, refuse_inside, refuse_other_kind, refuse_protected, remove_empty
from ftune.artifacts.ownership import atomic_file
from ftune.commands.label import session_check
from ftune.errors import FtuneError
from ftune.guards import textio

SESSION_FILE = "label-session.json"
FORMAT = "ftune-label-session"
VERSION = 1
DEFAULTS = {"n": 4, "max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "seed": 0}
OPTION = {"n": "--n", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "seed": "--seed"}
GOOD, BAD = "good", "bad"


@dataclass
class Item:
    """One prompt and what was decided about its answers."""

    line: int  # in the prompts file
    prompt: str
    answers: list[str] | None = None  # distinct answers in sampling order; None until generated
    sampled: int = 0  # answers sampled; identical ones are shown (and counted) once
    labels: list[str | None] = field(default_factory=list)  # good, bad or None per answer
    notes: list[str | None] = field(default_factory=list)  # why an answer is bad (optional)
    best: int | None = None  # index of the answer picked as best
    skipped: bool = False
    decided_by: str | None = None  # keys, judge FILE:FUNCTION, decisions FILE

    @property
    def done(self) -> bool:
        if self.skipped or self.best is not None:
            return True
        return self.answers is not None and all(label is not None for label in self.labels)

    def state(self) -> dict:
        return {"labels": list(self.labels), "notes": list(self.notes), "best": self.best, "skipped": self.skipped,
                "decided_by": self.decided_by}

    def restore(self, state: dict) -> None:
        self.labels, self.notes = list(state["labels"]), list(state["notes"])
        self.best, self.skipped, self.decided_by = state["best"], state["skipped"], state["decided_by"]


@dataclass
class Session:
    dir: Path
    model: dict  # spec, kind, path, adapter: what generated the answers
    prompts_file: str
    sampling: dict  # n, max_new_tokens, temperature, top_p, seed
    items: list[Item]
    history: list[dict] = field(default_factory=list)  # {"item": i, "before": state}, for undo
    outputs: dict[str, list[str]] = field(default_factory=dict)  # file name -> sha256 values ftune wrote
    created: str = ""
    lock: int | None = None  # the directory's file descriptor, flock-ed while the session is open

    @property
    def path(self) -> Path:
        return self.dir / SESSION_FILE

    def save(self) -> None:
        data = {"format": FORMAT, "version": VERSION, "created": self.created, "updated": _now(),
                "model": self.model, "prompts_file": self.prompts_file, "sampling": self.sampling,
                "items": [asdict(item) for item in self.items], "history": self.history, "outputs": self.outputs}
        with atomic_file(self.path) as handle:
            textio.dump(data, handle, ensure_ascii=False, indent=1)
            handle.write("\n")

    def next_open(self) -> int | None:
        return next((i for i, item in enumerate(self.items) if not item.done), None)

    def decide(self, index: int, by: str, change) -> None:
        """Apply `change(item)` to one item as one undoable decision, and save."""
        item = self.items[index]
        self.history.append({"item": index, "before": item.state()})
        change(item)
        item.decided_by = by
        self.save()

    def undo(self) -> int | None:
        """Take back the last decision; returns the item it belonged to (None: nothing to undo)."""
        if not self.history:
            return None
        last = self.history.pop()
        self.items[last["item"]].restore(last["before"])
        self.save()
        return last["item"]

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)  # releases the flock
            self.lock = None


def set_answers(item: Item, sampled: list[str]) -> None:
    # Answers that differ only in whitespace are one answer: a pair of them teaches nothing (and `ftune dpo` refuses it).
    seen: dict[str, str] = {}
    for text in sampled:
        seen.setdefault(" ".join(text.split()), text)
    distinct = list(seen.values())
    item.answers, item.sampled = distinct, len(sampled)
    item.labels, item.notes = [None] * len(distinct), [None] * len(distinct)


# --------------------------------------------------------------------------- opening


def open_session(out: Path, *, model: dict, prompts: list[tuple[int, str]] | None, prompts_file: str | None,
                 options: dict, resume: bool, say) -> Session:
    """The session in `out`: continued when one is there (settings must agree), else a new one.

    Nothing is written here for a new session; its first `save` creates the directory.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    out = out.resolve() if out.is_symlink() else out
    if out.exists() and not out.is_dir():
        raise FtuneError(f"--out {out} is a file, not a directory")
    if (out / SESSION_FILE).exists():
        session = _load(out)
        _check_same(session, model, prompts, options)
        if prompts and len(prompts) > len(session.items):
            added = [Item(line, text) for line, text in prompts[len(session.items):]]
            session.items += added
            say(f"{len(added)} new prompt(s) at the end of the prompts file join the session")
        if prompts:
            for item, (line, _) in zip(session.items, prompts):
                item.line = line  # blank lines added above a prompt move it, and its errors name the line it is on now
        session.lock = _lock(out)
        decided = sum(item.done for item in session.items)
        say(f"resuming the session in {out}: {decided} of {len(session.items)} prompts decided")
        return session
    if resume:
        raise FtuneError(f"there is no labelling session in {out} to resume ({SESSION_FILE} is missing)",
                         hint="leave out --resume to start one")
    # A new session goes where any output may go: not over its prompts, nor inside a run or a merged model.
    refuse_protected(out, inputs=[("the prompts file", Path(prompts_file))] if prompts_file else [], option="--out")
    refuse_file_on_path(out, option="--out")
    refuse_other_kind(out, kind="label-session", option="--out")  # a run, a merged model: named as what they are
    refuse_inside(out, kind="label-session", option="--out")
    if out.is_dir() and any(out.iterdir()):
        raise FtuneError(f"{out} holds files that ftune did not write", hint="choose a new or empty directory for --out")
    if prompts is None:
        raise FtuneError("--prompts FILE is needed to start a labelling session")
    if not prompts:
        raise FtuneError(f"prompts file {prompts_file} has no prompts", hint="one prompt per line, or JSON lines with 'prompt'")
    sampling = {key: DEFAULTS[key] if options.get(key) is None else options[key] for key in DEFAULTS}
    return Session(out, model, prompts_file or "", sampling, [Item(line, text) for line, text in prompts], created=_now())


def start(session: Session) -> None:
    """Create the directory and the session file of a new session, and hold its lock."""
    created = make_parents(session.path)  # removed again if the first save fails (a full or read-only disk)
    try:
        if session.lock is None:  # a continued session took its lock when it was opened
            session.lock = _lock(session.dir)
        if not session.path.exists():
            session.save()
    except BaseException:
        if created:
            session.close()
            remove_empty(created)
        raise


def _load(out: Path) -> Session:
    path = out / SESSION_FILE
    try:
        data = textio.load_file(path, "labelling session")  # depth-bounded, NaN refused
    except FtuneError as exc:
        raise FtuneError(f"unreadable labelling session ({exc.message})", place=exc.place or str(path)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FtuneError("not an ftune labelling session", place=str(path), hint="choose another directory for --out")
    if data.get("version") != VERSION:
        raise FtuneError(f"a labelling session of version {data.get('version')}; this ftune reads version {VERSION}", place=str(path))
    session_check.check(data, path, DEFAULTS)  # read back, not trusted: every field's type and range
    try:
        items = [Item(**item) for item in data["items"]]
        return Session(out, data["model"], data["prompts_file"], data["sampling"], items, data["history"], data["outputs"],
                       data["created"])
    except (KeyError, TypeError) as exc:
        raise FtuneError(f"damaged labelling session ({exc})", place=str(path)) from None


def _check_same(session: Session, model: dict, prompts: list[tuple[int, str]] | None, options: dict) -> None:
    """A session continues only as it began: the same model, prompts and sampling."""
    where = f"the session in {session.dir}"
    if (model["path"], model.get("adapter")) != (session.model["path"], session.model.get("adapter")):
        raise FtuneError(f"{where} labels answers of {session.model['spec']} ({session.model['path']}); "
                         f"MODEL is {model['spec']} ({model['path']})", hint="name the same model, or choose another --out")
    for key, value in options.items():
        if value is not None and value != session.sampling[key]:
            raise FtuneError(f"{where} was started with {OPTION[key]} {session.sampling[key]}, not {value}",
                             hint=f"leave out {OPTION[key]} to continue it, or choose another --out")
    if prompts is None:
        return
    for item, (line, text) in zip(session.items, prompts):
        if item.prompt != text:
            raise FtuneError(f"the prompts file changed since {where} started: the prompt on line {line} was {item.prompt!r:.60}",
                             place=f"{session.prompts_file} line {line}",
                             hint="new prompts may be added at the end; to label another file, choose another --out")
    if len(prompts) < len(session.items):
        raise FtuneError(f"the prompts file has {len(prompts)} prompts; {where} has {len(session.items)}",
                         place=session.prompts_file, hint="leave out --prompts to continue with the session's own prompts")


def _lock(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FtuneError(f"another `ftune label` is using {directory}", hint="wait for it to finish, or choose another --out") from None
    return fd


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- outputs ftune owns


def replace_outputs(session: Session, texts: dict[str, str]) -> list[Path]:
    """Write output files atomically, replacing only files this session wrote, unchanged since.

    The new hashes are recorded before the files are renamed in, so a crash in between
    leaves files the next run still recognises as its own.
    """
    for name in texts:
        path = session.dir / name
        if path.exists() and _sha(path.read_bytes()) not in session.outputs.get(name, []):
            raise FtuneError(f"{path} was not written by this labelling session, or was changed since",
                             hint=f"move it away and run again; every decision is kept in {session.path}")
    digests = {name: _sha(text.encode("utf-8")) for name, text in texts.items()}
    for name, digest in digests.items():
        session.outputs[name] = [*session.outputs.get(name, [])[-1:], digest]
    session.save()
    written = []
    for name, text in texts.items():
        with atomic_file(session.dir / name) as handle:
            handle.write(text)
        written.append(session.dir / name)
    for name, digest in digests.items():
        session.outputs[name] = [digest]
    session.save()
    return written


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

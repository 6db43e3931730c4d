"""Decisions without a person at the keys: a judge function, or a file of decisions.

A judge is a Python function named on the command line as `path.py:function`, loaded from
that file only (its folder is not put on the import path) and only when named. It runs in a
worker process of its own (ftune/guards/usercode.py), each call within --judge-timeout seconds:

    def judge(prompt: str, answers: list[str]):
        return ["good", "bad", None]      # a label per answer (None: leave it unlabelled);
                                          # ("bad", "why") adds a failure note
        return 2                          # or the index (from 0) of the best answer
        return "skip"                     # or skip the prompt; None leaves it undecided

A decisions file (JSON list, or JSON lines) holds one object per prompt, naming it by
`line` (in the prompts file) or by its exact `prompt` text, with the same choices:
`{"line": 3, "labels": ["good", "bad"], "notes": [null, "too curt"]}`, `{"line": 4, "best": 0}`,
`{"prompt": "Hi", "skip": true}`. Answers are numbered as the session stores them (see
report.json or --generate-only).
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from ftune.commands.label.session import BAD, GOOD, Item
from ftune.errors import FtuneError
from ftune.guards import textio, usercode

EXPECTED = "a list of {n} labels ('good', 'bad', None, or ('bad', 'note')), the index of the best answer (0 to {last}), 'skip' or None"


@dataclass(frozen=True)
class Verdict:
    labels: list[str | None] | None = None
    notes: list[str | None] | None = None
    best: int | None = None
    skip: bool = False

    def apply(self, item: Item) -> None:
        """Fill what is still open in `item`: a person's earlier labels stay."""
        if self.skip:
            item.skipped = True
        if self.best is not None:
            item.best = self.best
        for i, label in enumerate(self.labels or []):
            if label is not None and item.labels[i] is None:
                item.labels[i] = label
                if label == BAD and self.notes and self.notes[i]:
                    item.notes[i] = self.notes[i]


def interpret(value, n: int, notes=None) -> Verdict | str:
    """A judge's (or decision's) answer as a Verdict, or the reason it cannot be one."""
    expected = EXPECTED.format(n=n, last=n - 1)
    if value is None:
        return Verdict()
    if isinstance(value, str) and value == "skip":
        return Verdict(skip=True)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy's integers too
        value = int(value)
        return Verdict(best=value) if 0 <= value < n else f"best answer {value} is out of range; expected {expected}"
    if not isinstance(value, (list, tuple)):
        return f"expected {expected}"
    if len(value) != n:
        return f"{len(value)} labels for {n} answers; expected {expected}"
    labels: list[str | None] = []
    found_notes: list[str | None] = list(notes) if notes is not None else [None] * n
    for i, entry in enumerate(value):
        note = None
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
            entry, note = entry
        if entry not in (GOOD, BAD, None):
            return f"label {i} is {entry!r:.60}; expected {expected}"
        labels.append(entry)
        if note:
            found_notes[i] = note
    return Verdict(labels=labels, notes=found_notes)


def describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- judge functions


@dataclass(frozen=True)
class Judge:
    spec: str  # as given: path.py:function
    path: Path
    code: usercode.UserCode  # the file, imported in its worker
    name: str
    timeout: float  # seconds a call may take


def load_judge(spec: str, timeout: float | None = None) -> Judge:
    """The judge's file imported (in its worker) and its function found, before any session is written."""
    timeout = usercode.DEFAULT_TIMEOUT_S if timeout is None else timeout
    if not (math.isfinite(timeout) and 0 < timeout <= 86400):
        raise FtuneError(f"--judge-timeout {timeout:g}: expected seconds, more than 0 and at most 86400")
    file_part, sep, name = spec.rpartition(":")
    if not sep or not file_part or not name:
        raise FtuneError(f"--judge expects path.py:function, not {spec!r}")
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise FtuneError(f"judge file {path} does not exist", hint="--judge expects path.py:function")
    if not name.isidentifier():
        raise FtuneError(f"--judge names {name!r}, which is not a Python function name", place=str(path))
    code = usercode.open_file(path, "the judge")
    try:
        code.function(name, f"--judge {spec}")
    except FtuneError as exc:
        raise FtuneError(exc.message, place=str(path), hint=exc.hint) from None
    return Judge(spec, path, code, name, timeout)


def ask(judge: Judge, item: Item, place: str) -> Verdict:
    """The judge's verdict on one prompt; its failures name the function and the prompt's line."""
    try:
        value = judge.code.call(judge.name, (item.prompt, list(item.answers)), {}, what=f"judge {judge.spec}", place=place,
                                timeout=judge.timeout, limit_key="--judge-timeout")
    except FtuneError as exc:
        saved = "decisions so far are saved; fix the judge and run the same command to continue"
        raise FtuneError(exc.message, place=place, hint=f"{exc.hint}; {saved}" if exc.hint else saved) from None
    verdict = interpret(value, len(item.answers))
    if isinstance(verdict, str):
        raise FtuneError(f"judge {judge.spec} returned {describe(value)}: {verdict}", place=place)
    return verdict


# --------------------------------------------------------------------------- decisions files


@dataclass(frozen=True)
class Decision:
    place: str  # where in the decisions file
    index: int  # the item it decides
    value: object  # labels list, best index, 'skip'
    notes: list | None


KEYS = ("line", "prompt", "labels", "notes", "best", "skip")


def read_decisions(path: Path, items: list[Item], prompts_file: str) -> list[Decision]:
    """Every decision of the file, checked against the prompts; answer counts are checked later."""
    from ftune.data.sources import read_source

    textio.check_regular(path, "decisions file")  # missing, a directory, or a FIFO that would hang the read
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise FtuneError("a decisions file is JSON (a list of objects) or JSON lines (.json or .jsonl)", place=str(path))
    rows, _ = read_source(str(path), base_dir=Path())  # places name the file as the user did
    if not rows:  # an empty file is a mistake (the wrong file, a failed export), not "decide nothing"
        raise FtuneError("the decisions file holds no decisions", place=str(path),
                         hint="one object per prompt: {\"line\": N, \"labels\"|\"best\"|\"skip\": ...}")
    by_line = {item.line: i for i, item in enumerate(items)}
    seen: dict[int, str] = {}
    decisions = []
    for row in rows:
        entry, place = row.data, row.place
        if not isinstance(entry, dict):
            raise FtuneError(f"a decision is an object, not {type(entry).__name__}", place=place)
        for key in entry:
            if key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                raise FtuneError(f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(KEYS)}"), place=place)
        index = _which(entry, by_line, items, place, prompts_file)
        if index in seen:
            raise FtuneError(f"the prompt on line {items[index].line} is decided twice (also at {seen[index]})", place=place)
        seen[index] = place
        choices = [key for key in ("labels", "best", "skip") if key in entry]
        if len(choices) != 1:
            raise FtuneError("a decision needs exactly one of 'labels', 'best' or 'skip'", place=place)
        value = entry[choices[0]]
        if choices[0] == "skip":
            if value is not True:
                raise FtuneError(f"'skip' must be true, not {describe(value)}", place=place)
            value = "skip"
        elif choices[0] == "best" and (not isinstance(value, int) or isinstance(value, bool)):
            raise FtuneError(f"'best' must be an answer's index (from 0), not {describe(value)}", place=place)
        elif choices[0] == "labels" and not isinstance(value, list):
            raise FtuneError(f"'labels' must be a list ('good', 'bad' or null per answer), not {describe(value)}", place=place)
        notes = entry.get("notes")
        if notes is not None and (choices[0] != "labels" or not isinstance(notes, list)
                                  or not all(note is None or isinstance(note, str) for note in notes)):
            raise FtuneError("'notes' goes with 'labels': a list of strings or null, one per answer", place=place)
        decisions.append(Decision(place, index, value, notes))
    return decisions


def _which(entry: dict, by_line: dict[int, int], items: list[Item], place: str, prompts_file: str) -> int:
    line, prompt = entry.get("line"), entry.get("prompt")
    if line is None and prompt is None:
        raise FtuneError("a decision names its prompt by 'line' (in the prompts file) or by 'prompt' (its text)", place=place)
    if line is not None:
        if not isinstance(line, int) or isinstance(line, bool) or line not in by_line:
            raise FtuneError(f"there is no prompt on line {describe(line)} of {prompts_file}", place=place)
        index = by_line[line]
        if prompt is not None and prompt != items[index].prompt:
            raise FtuneError(f"line {line} of {prompts_file} holds {items[index].prompt!r:.60}, not {describe(prompt)}", place=place)
        return index
    matches = [i for i, item in enumerate(items) if item.prompt == prompt]
    if not matches:
        raise FtuneError(f"no prompt in {prompts_file} is {describe(prompt)}", place=place)
    if len(matches) > 1:
        lines = ", ".join(str(items[i].line) for i in matches)
        raise FtuneError(f"the prompt {describe(prompt)} is on lines {lines} of {prompts_file}", place=place, hint="name it by 'line'")
    return matches[0]


def verdict_for(decision: Decision, item: Item) -> Verdict:
    n = len(item.answers)
    if decision.notes is not None and len(decision.notes) != n:
        raise FtuneError(f"{len(decision.notes)} notes for {n} answers", place=decision.place)
    verdict = interpret(decision.value, n, decision.notes)
    if isinstance(verdict, str):
        raise FtuneError(f"{verdict} (the prompt on line {item.line} has {n} distinct answers)", place=decision.place)
    return verdict

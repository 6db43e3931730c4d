"""A labelling session file read back: every field's type and range checked before use.

label-session.json is ftune's own file, but it is read back from a disk a user can edit, a
crash can cut short and another version can have written. A field of the wrong type would
otherwise surface much later as a traceback (an int where a list goes, an index past the
answers). Nothing is repaired or started over: the decisions in it are the user's work, so a
damaged session is refused with the file and the field named.
"""

from __future__ import annotations

import math
from pathlib import Path

from ftune.errors import FtuneError

LABELS = ("good", "bad", None)
HINT = "the session file is damaged: fix the field named, or move the directory aside and start a new session"


def check(data: dict, path: Path, defaults: dict) -> None:
    """Raise an FtuneError naming the first field of `data` that a session ftune wrote could not hold."""
    bad = _Checker(path)
    bad.of(data, "created", str)
    bad.of(data, "prompts_file", str)
    model = bad.of(data, "model", dict)
    bad.of(model, "spec", str, "model.")
    bad.of(model, "path", str, "model.")
    bad.of(model, "adapter", (str, type(None)), "model.", optional=True)
    sampling = bad.of(data, "sampling", dict)
    for key in defaults:
        value = bad.of(sampling, key, (int, float) if key in ("temperature", "top_p") else int, "sampling.")
        low = 1 if key in ("n", "max_new_tokens") else 0
        if not math.isfinite(value) or value < low or (key == "top_p" and value > 1):
            bad.fail(f"sampling.{key}", f"must be a number of at least {low}{' and at most 1' if key == 'top_p' else ''}, not {value!r}")
    items = bad.of(data, "items", list)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            bad.fail(f"items[{i}]", f"must be an object, not {type(item).__name__}")
        unknown = sorted(set(item) - {"line", "prompt", "answers", "sampled", "labels", "notes", "best", "skipped", "decided_by"})
        if unknown:
            bad.fail(f"items[{i}].{unknown[0]}", "is not a field of a session item")
        where = f"items[{i}]."
        line = bad.of(item, "line", int, where)
        if line < 1:
            bad.fail(f"{where}line", f"must be a line number (from 1), not {line}")
        bad.of(item, "prompt", str, where)
        answers = bad.of(item, "answers", (list, type(None)), where, optional=True)
        if answers is not None and not all(isinstance(a, str) for a in answers):
            bad.fail(f"{where}answers", "must be a list of strings")
        sampled = bad.of(item, "sampled", int, where, optional=True, default=0)
        if sampled < 0:
            bad.fail(f"{where}sampled", f"must not be negative, not {sampled}")
        _state(bad, item, where, answers)
    history = bad.of(data, "history", list)
    for j, entry in enumerate(history):
        where = f"history[{j}]"
        if not isinstance(entry, dict):
            bad.fail(where, f"must be an object, not {type(entry).__name__}")
        index = bad.of(entry, "item", int, where + ".")
        if not 0 <= index < len(items):
            bad.fail(f"{where}.item", f"must be an item's index (0 to {len(items) - 1}), not {index}")
        before = bad.of(entry, "before", dict, where + ".")
        _state(bad, before, f"{where}.before.", items[index].get("answers"))
    outputs = bad.of(data, "outputs", dict)
    for name, digests in outputs.items():
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            bad.fail(f"outputs.{name}", "must be a list of sha256 strings")


def _state(bad: _Checker, state: dict, where: str, answers: list | None) -> None:
    """The decision part of an item (also what undo restores): labels, notes, best, skipped, decided_by."""
    count = len(answers) if isinstance(answers, list) else 0
    labels = bad.of(state, "labels", list, where, optional=True, default=[])
    notes = bad.of(state, "notes", list, where, optional=True, default=[])
    if any(label not in LABELS for label in labels) or len(labels) not in (0, count):
        bad.fail(f"{where}labels", f"must be 'good', 'bad' or null for each of the {count} answers")
    if not all(note is None or isinstance(note, str) for note in notes) or len(notes) not in (0, count):
        bad.fail(f"{where}notes", f"must be a string or null for each of the {count} answers")
    best = bad.of(state, "best", (int, type(None)), where, optional=True)
    if best is not None and not 0 <= best < count:
        bad.fail(f"{where}best", f"must be an answer's index (0 to {count - 1}), not {best}")
    bad.of(state, "skipped", bool, where, optional=True, default=False)
    bad.of(state, "decided_by", (str, type(None)), where, optional=True)


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str):
        raise FtuneError(f"damaged labelling session: field '{field}' {problem}", place=str(self.path), hint=HINT)

    def of(self, data: dict, key: str, kinds, prefix: str = "", *, optional: bool = False, default=None):
        if key not in data:
            if optional:
                return default
            self.fail(prefix + key, "is missing")
        value = data[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else {"int": "a whole number", "float": "a number", "str": "a string",
                                "list": "a list", "dict": "an object", "bool": "true or false"}[k.__name__] for k in kinds)
            self.fail(prefix + key, f"must be {names}, not {_describe(value)}")
        return value


def _describe(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"

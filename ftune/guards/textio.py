"""The one line reader, JSON parser and JSON writer for every text ftune reads or writes.

Lines end at b"\\n" only (a trailing b"\\r" is dropped): `str.splitlines` would also split at
U+2028, U+2029, \\x85 and \\x0c, which JSON allows unescaped inside a string, so a valid row
would be cut in two and every later line number would be wrong. Lines are read one at a time
(a million-row file is never held whole) and each is bounded: `MAX_LINE_BYTES` is far beyond
any model's context (1M tokens is about 4 MiB of text) and keeps one bad line from allocating
without limit. A NUL byte means a binary file; bytes that are not UTF-8 are named by line.

JSON is parsed with a depth bound: the code that walks parsed data (templates, tool-call
arguments, hashing, json.dumps) recurses, so a document nested 100,000 deep would end in a
RecursionError anywhere downstream, in a worker process too. `MAX_DEPTH` (100) is far beyond
any real row (a conversation with tool calls is under 10 deep) and far inside Python's
recursion limit (1000) even for code that spends a few frames per level. NaN and Infinity
(not JSON) and numbers beyond float range (1e400) are refused at their line: no field of a
row, a session or a run file has a meaning for them.

Every JSON ftune writes goes through `dumps`/`dump` with allow_nan=False: a non-finite
number can never be written silently. A caller whose values can legitimately be non-finite
(a score, a metric) writes an explicit null (`finite_or_none`) and counts it.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from ftune.errors import FtuneError

MAX_LINE_BYTES = 16 << 20
MAX_DEPTH = 100
MAX_JSON_FILE_BYTES = 256 << 20  # a run file, session or cache meta read whole: far beyond any ftune writes
_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------- files and lines


def check_regular(path: Path, what: str) -> None:
    """Refuse a directory, FIFO, socket or device named as a file: reading one hangs or fails obscurely."""
    try:
        mode = os.stat(path).st_mode  # stat never blocks, unlike opening a FIFO
    except FileNotFoundError:
        raise FtuneError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise FtuneError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise FtuneError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise FtuneError(f"{what} {path} is not a regular file (a pipe, socket or device)",
                         hint="name a file on disk")


def raw_lines(path: Path, what: str = "file", *, name: str | None = None) -> Iterator[tuple[int, bytes, int]]:
    """(line number from 1, the line's bytes without its line end, its first byte's offset), streamed.

    A line over MAX_LINE_BYTES or holding a NUL byte is an error naming the line; decoding is the
    caller's (`decode`), so that a tokenization worker can do it in parallel.
    """
    check_regular(path, what)
    name = name or str(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise FtuneError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with handle:
        offset, number = 0, 0
        while True:
            try:
                line = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise FtuneError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_BYTES and not (len(line) == MAX_LINE_BYTES + 1 and line.endswith(b"\n")):
                raise FtuneError(f"line longer than {MAX_LINE_BYTES >> 20} MiB", place=f"{name} line {number}",
                                 hint="is this the right file? one row or prompt per line")
            nul = line.find(b"\0")
            if nul >= 0:
                raise FtuneError(f"a NUL byte at byte {offset + nul}: this is a binary file, not text",
                                 place=f"{name} line {number}")
            size = len(line)
            if line.endswith(b"\n"):
                line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            yield number, line, offset
            offset += size


def decode(raw: bytes, place: str, offset: int = 0) -> str:
    """A line's text; bytes that are not UTF-8 are an error naming the place and the byte in the file."""
    if offset == 0 and raw.startswith(_BOM):
        raw, offset = raw[3:], 3
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FtuneError(f"invalid UTF-8 at byte {offset + exc.start}", place=place) from None


def text_lines(path: Path, what: str = "file", *, name: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 text file, streamed."""
    name = name or str(path)
    for number, raw, offset in raw_lines(path, what, name=name):
        yield number, decode(raw, f"{name} line {number}", offset)


def read_bytes(path: Path, what: str = "file", *, limit: int = MAX_JSON_FILE_BYTES) -> bytes:
    """A whole (small) file's bytes, refusing non-files and sizes beyond the limit."""
    check_regular(path, what)
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise FtuneError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise FtuneError(f"{what} is larger than {limit >> 20} MiB", place=str(path))
    return data


def load_file(path: Path, what: str = "file") -> object:
    """A whole JSON file ftune or the user wrote, parsed with `loads`; every failure names the file."""
    raw = read_bytes(path, what)
    if raw.startswith(_BOM):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FtuneError(f"invalid UTF-8 at byte {exc.start}", place=f"{path} line {line}") from None
    return loads(text, str(path), lines=True)


# --------------------------------------------------------------------------- JSON in


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BIG_NUMBER = re.compile(r"\d[eE]\+?\d{3}|\d{309}")  # what float() can overflow on (or an int that long)


def depth(text: str) -> int:
    """How deeply a JSON text nests (strings skipped); exact for valid JSON."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    level = deepest = 0
    for char in brackets:
        if char in "[{":
            level += 1
            if level > deepest:
                deepest = level
        else:
            level -= 1
    return deepest


_ODD_VALUE = re.compile(r'"((?:[^"\\]|\\.){1,80})"\s*:\s*(?:-?(?:NaN|Infinity)\b|-?\d[\d.]*[eE]\+?\d{3}|-?\d{309})')


def _field_of(text: str) -> str:
    """' (field NAME)' for the first key whose value JSON cannot hold, when one can be seen."""
    found = _ODD_VALUE.search(text)
    return f" (field '{found.group(1)}')" if found else ""


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond the range of a float")
    return value


def _none(_text: str) -> None:
    return None


def _float_or_none(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def loads(text: str | bytes, place: str, *, lines: bool = False, nonfinite_as_null: bool = False) -> object:
    """Parse JSON from data, a session, a cache or a run file; any problem is an FtuneError at `place`.

    The bracket count costs one pass in C; only a text with more brackets than MAX_DEPTH is
    scanned for its real depth (a long conversation, say), and refused beyond it.
    `lines`: the text is a whole file, so a syntax error's place adds its line and column.
    `nonfinite_as_null`: NaN, Infinity and 1e400 read as null instead of an error (only for a file
    an older ftune wrote with such literals, e.g. metrics.jsonl, so it can be rewritten valid).
    """
    if isinstance(text, bytes):
        text = decode(text, place)
    if text.count("[") + text.count("{") > MAX_DEPTH and depth(text) > MAX_DEPTH:
        raise FtuneError(f"JSON nested too deeply (more than {MAX_DEPTH} levels)", place=place,
                         hint="no row, session or run file nests this deeply; is this the right file?")
    checked = _BIG_NUMBER.search(text) is not None
    constant, number = (_none, _float_or_none) if nonfinite_as_null else (_constant, _float)
    try:
        return json.loads(text, parse_constant=constant, **({"parse_float": number} if checked else {}))
    except json.JSONDecodeError as exc:
        where = f"{place} line {exc.lineno}, column {exc.colno}" if lines else place
        message = f"invalid JSON: {exc.msg}" + ("" if lines else f" (column {exc.colno})")
        raise FtuneError(message, place=where) from None
    except RecursionError:  # below MAX_DEPTH this cannot happen; kept so no traceback ever escapes
        raise FtuneError("JSON nested too deeply", place=place) from None
    except ValueError as exc:  # NaN, 1e400, an integer of more than 4300 digits
        raise FtuneError(f"unreadable JSON: {str(exc).split(';')[0]}{_field_of(text)}", place=place) from None


# --------------------------------------------------------------------------- JSON out


def finite_or_none(value):
    """A number as written to JSON: NaN and infinity become null (the caller counts them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def nulled(value, where: str = "") -> tuple[object, list[str]]:
    """value with every NaN or infinity (at any depth) replaced by null, and where each was (key paths),
    for a report whose figures can legitimately be non-finite: the caller writes it and says how many."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "value"]
    if isinstance(value, dict):
        found: list[str] = []
        out = {}
        for key, item in value.items():
            out[key], inner = nulled(item, f"{where}.{key}" if where else str(key))
            found += inner
        return out, found
    if isinstance(value, (list, tuple)):
        found, out = [], []
        for i, item in enumerate(value):
            item, inner = nulled(item, f"{where}[{i}]")
            out.append(item)
            found += inner
        return out, found
    return value, []


def nulls_note(nulls: list[str]) -> str:
    """One line saying which figures were written as null."""
    return (f"note: {len(nulls)} figure{'s' if len(nulls) != 1 else ''} NaN or infinite, written as null "
            f"({', '.join(nulls[:3])}{', ...' if len(nulls) > 3 else ''})")


def dumps(value, *, place: str | None = None, **options) -> str:
    """JSON text; a NaN or infinity anywhere in value is an error (at place), never invalid JSON."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError as exc:
        if "JSON compliant" not in str(exc) and "Circular" not in str(exc):
            raise
        raise FtuneError("a number to be written is NaN or infinite, which JSON cannot hold", place=place) from None


def dump(value, handle, *, place: str | None = None, **options) -> None:
    """`dumps` to an open text file (the text is made whole first, so a refusal writes nothing)."""
    handle.write(dumps(value, place=place, **options))


def canonical(value) -> str:
    """A stable text of a value, for hashing and messages only: never written as a JSON file
    (so a NaN in a hub dataset's row may appear in it)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)

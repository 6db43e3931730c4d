"""Read rows from local files and hub datasets, each row tagged with where it came from.

The place of a row is what a user can open in an editor: the line of a JSONL or CSV
file, the index in a JSON list, the row of a Parquet file or hub split.

`open_source` streams: its fingerprint hashes the file in blocks, and its units come one at a
time (a JSONL line still as bytes, parsed by whoever takes it: a tokenization worker), so no
reader holds every row of a large file as Python objects. `read_source` is the whole-list
form for the stages whose data is small (preference pairs, prompts).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.guards import textio

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
BLOCK = 1 << 20


@dataclass(frozen=True)
class Row:
    data: dict
    place: str  # e.g. "data/train.jsonl line 12"


@dataclass(frozen=True)
class Unit:
    """One row as read: parsed already, or (JSONL) the line's bytes, parsed by `parse`."""

    number: int  # the line (JSONL, CSV) or row index (JSON, Parquet, hub) that `place` names
    data: object
    offset: int = -1  # a JSONL line's first byte in the file (for the position of bad UTF-8); -1: parsed


@dataclass(frozen=True)
class Opened:
    name: str  # as places name the source
    counted: str  # "line" or "row"
    fingerprint: str  # of the contents (or, for a streamed hub dataset, of its name)
    units: Iterator[Unit]

    def place(self, number: int) -> str:
        return place_of(self.name, self.counted, number)


def place_of(name: str, counted: str, number: int) -> str:
    return f"{name} {counted} {number}"


def read_source(path: str, *, base_dir: Path, split: str = "train", subset: str | None = None) -> tuple[list[Row], str]:
    """All rows of one source and a fingerprint of its contents (for the tokenization cache)."""
    opened = open_source(path, base_dir=base_dir, split=split, subset=subset)
    rows = []
    for unit in opened.units:
        row = parse(unit, opened.name, opened.counted)
        if row is not None:
            rows.append(row)
    return rows, opened.fingerprint


def open_source(path: str, *, base_dir: Path, split: str = "train", subset: str | None = None, streaming: bool = False) -> Opened:
    """A source's fingerprint now (without parsing a row) and its units as they are read."""
    local = Path(path).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.suffix.lower() in FILE_SUFFIXES or local.exists():
        if local.is_dir():
            raise FtuneError(f"data path {local} is a directory; name a .json, .jsonl, .parquet or .csv file in it")
        textio.check_regular(local, "data file")  # a FIFO or device would hang the reader
        return _open_file(local)
    return _open_hub(path, split=split, subset=subset, streaming=streaming)


def parse(unit: Unit, name: str, counted: str) -> Row | None:
    """The row a unit holds (None for a blank JSONL line); bad JSON or UTF-8 is an error at its line."""
    if unit.offset < 0:
        return Row(unit.data, place_of(name, counted, unit.number))
    raw = unit.data
    place = place_of(name, counted, unit.number)
    if isinstance(raw, bytes):
        raw = textio.decode(raw, place, unit.offset)
    if not raw.strip():
        return None
    return Row(textio.loads(raw, place), place)


def _open_file(path: Path) -> Opened:
    name, suffix = str(path), path.suffix.lower()
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(BLOCK):
                digest.update(block)
    except OSError as exc:
        raise FtuneError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    fingerprint = digest.hexdigest()
    if suffix == ".parquet":
        return Opened(name, "row", fingerprint, _parquet_units(path))
    if suffix == ".csv":
        return Opened(name, "line", fingerprint, _csv_units(path))
    if suffix == ".jsonl":
        return Opened(name, "line", fingerprint, _jsonl_units(path))
    # A .json file is one JSON document (a list of rows), read whole when its rows are wanted;
    # JSON Lines under a .json name, as many datasets ship, streams like .jsonl.
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(b"["):
        return Opened(name, "row", fingerprint, _json_units(path))
    rows = _read_file(path, path.read_bytes())  # fails at once on JSON Lines, which stream
    if rows is None:
        return Opened(name, "line", fingerprint, _jsonl_units(path))
    return Opened(name, "row", fingerprint, (Unit(i, row.data) for i, row in enumerate(rows)))


def _json_units(path: Path) -> Iterator[Unit]:
    yield from (Unit(i, row.data) for i, row in enumerate(_read_file(path, path.read_bytes())))


def _jsonl_units(path: Path) -> Iterator[Unit]:
    # The one line reader: lines end at b"\n" only, bounded, binary refused (see textio).
    for number, line, offset in textio.raw_lines(path, "data file"):
        yield Unit(number, line, offset)


def _utf8_error(path: Path) -> FtuneError:
    """Where a file stops being UTF-8: the byte and its line (read again whole: this is the error path)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return FtuneError(f"invalid UTF-8 at byte {exc.start}", place=f"{path} line {line}")
    return FtuneError("invalid UTF-8", place=str(path))


def _read_file(path: Path, raw: bytes) -> list[Row] | None:
    """A .json file's rows, or None when it holds JSON Lines."""
    name = str(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    if not text.lstrip().startswith("["):
        try:
            json.loads(text)  # one JSON document, or (most often) JSON Lines under a .json name
        except (ValueError, RecursionError):
            return None
    data = textio.loads(text, name, lines=True)
    if not isinstance(data, list):
        raise FtuneError(f"a JSON data file must hold a list of rows, not a {type(data).__name__}", place=name)
    return [Row(item, f"{name} row {i}") for i, item in enumerate(data)]


def _csv_units(path: Path) -> Iterator[Unit]:
    name = str(path)
    csv.field_size_limit(textio.MAX_LINE_BYTES)  # a long answer is not an error; a 1 GiB field is
    header: list[str] | None = None
    start = 1
    # newline="": records split at real line ends only, and quoted newlines stay in their field.
    # strict: an unclosed quote is an error, not the rest of the file read into one field.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            for record in reader:
                number = start  # where the record starts, however many lines it spans
                start = reader.line_num + 1
                if not record:
                    continue
                if header is None:
                    header = record
                    repeated = sorted({c for c in header if header.count(c) > 1})
                    if repeated:
                        raise FtuneError(f"the header names column{'s' if len(repeated) > 1 else ''} {', '.join(map(repr, repeated))} twice",
                                         place=f"{name} line {number}")
                    continue
                if len(record) > len(header):
                    raise FtuneError(f"this record has {len(record)} fields but the header names {len(header)} columns",
                                     place=f"{name} line {number}", hint="quote fields that contain commas")
                yield Unit(number, dict(zip(header, record)))  # missing trailing fields are missing columns
        except csv.Error as exc:
            raise FtuneError(f"invalid CSV: {exc}", place=f"{name} line {start}") from None
        except UnicodeDecodeError:
            raise _utf8_error(path) from None


def _parquet_units(path: Path) -> Iterator[Unit]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=4096)
        number = 0
        for batch in batches:
            for item in batch.to_pylist():
                yield Unit(number, item)
                number += 1
    except FtuneError:
        raise
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise FtuneError(f"unreadable Parquet file: {exc}", place=str(path)) from None


def _open_hub(name: str, *, split: str, subset: str | None, streaming: bool) -> Opened:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except FileNotFoundError:
        raise FtuneError(
            f"data '{name}' is neither a local file nor a dataset on the Hub (or in the local cache)",
            hint="check the path (relative paths are relative to the recipe's folder)",
        ) from None
    except ConnectionError:
        raise FtuneError(
            f"cannot fetch dataset '{name}': the Hugging Face Hub is unreachable and it is not in the local cache"
        ) from None
    except ValueError as exc:
        raise FtuneError(f"cannot load dataset '{name}': {exc}") from None
    # A streamed dataset has no content fingerprint: its cache entry is keyed by its name.
    fingerprint = getattr(dataset, "_fingerprint", None) or hashlib.sha256(f"{name}:{subset}:{split}".encode()).hexdigest()
    return Opened(f"{name}[{split}]", "row", fingerprint, (Unit(i, item) for i, item in enumerate(dataset)))

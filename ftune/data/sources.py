"""Read rows from local files and hub datasets, each row tagged with where it came from.

The place of a row is what a user can open in an editor: the line of a JSONL or CSV
file, the index in a JSON list, the row of a Parquet file or hub split.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


@dataclass(frozen=True)
class Row:
    data: dict
    place: str  # e.g. "data/train.jsonl line 12"


def read_source(path: str, *, base_dir: Path, split: str = "train", subset: str | None = None) -> tuple[list[Row], str]:
    """All rows of one source and a fingerprint of its contents (for the tokenization cache)."""
    local = Path(path).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.suffix.lower() in FILE_SUFFIXES or local.exists():
        if local.is_dir():
            raise FtuneError(f"data path {local} is a directory; name a .json, .jsonl, .parquet or .csv file in it")
        if not local.is_file():
            raise FtuneError(f"data file {local} does not exist")
        try:
            raw = local.read_bytes()
        except OSError as exc:
            raise FtuneError(f"cannot read data file {local}: {exc.strerror or exc}") from None
        fingerprint = hashlib.sha256(raw).hexdigest()
        rows = _read_file(local, raw)
        return rows, fingerprint
    return _read_hub(path, split=split, subset=subset)


def _read_file(path: Path, raw: bytes) -> list[Row]:
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FtuneError(f"invalid UTF-8 at byte {exc.start}", place=f"{name} line {line}") from None
    if suffix == ".csv":
        return _read_csv(name, text)
    if suffix == ".jsonl":
        return _read_jsonl(name, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith("["):
            return _read_jsonl(name, text)  # JSON Lines under a .json name, as many datasets ship
        raise FtuneError(f"invalid JSON: {exc.msg}", place=f"{name} line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise FtuneError(f"unreadable JSON: {_json_limit(exc)}", place=name) from None
    if not isinstance(data, list):
        raise FtuneError(f"a JSON data file must hold a list of rows, not a {type(data).__name__}", place=name)
    return [Row(item, f"{name} row {i}") for i, item in enumerate(data)]


def _read_jsonl(name: str, text: str) -> list[Row]:
    rows = []
    # Lines end at "\n" only: str.splitlines also splits at U+2028, U+2029, \x85 and \x0c,
    # which JSON allows unescaped inside a string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(json.loads(line), f"{name} line {number}"))
        except json.JSONDecodeError as exc:
            raise FtuneError(f"invalid JSON: {exc.msg} (column {exc.colno})", place=f"{name} line {number}") from None
        except (ValueError, RecursionError) as exc:
            raise FtuneError(f"unreadable JSON: {_json_limit(exc)}", place=f"{name} line {number}") from None
    return rows


def _json_limit(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]  # e.g. an integer of more than 4300 digits


def _read_csv(name: str, text: str) -> list[Row]:
    # newline="": records split at real line ends only, and quoted newlines stay in their field.
    # strict: an unclosed quote is an error, not the rest of the file read into one field.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long answer is not an error
    rows: list[Row] = []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            place = f"{name} line {start}"  # where the record starts, however many lines it spans
            start = reader.line_num + 1
            if not record:
                continue
            if header is None:
                header = record
                repeated = sorted({c for c in header if header.count(c) > 1})
                if repeated:
                    raise FtuneError(f"the header names column{'s' if len(repeated) > 1 else ''} {', '.join(map(repr, repeated))} twice", place=place)
                continue
            if len(record) > len(header):
                raise FtuneError(f"this record has {len(record)} fields but the header names {len(header)} columns", place=place,
                                 hint="quote fields that contain commas")
            rows.append(Row(dict(zip(header, record)), place))  # missing trailing fields are missing columns
    except csv.Error as exc:
        raise FtuneError(f"invalid CSV: {exc}", place=f"{name} line {start}") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise FtuneError(f"unreadable Parquet file: {exc}", place=str(path)) from None
    return [Row(item, f"{path} row {i}") for i, item in enumerate(table.to_pylist())]


def _read_hub(name: str, *, split: str, subset: str | None) -> tuple[list[Row], str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
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
    fingerprint = getattr(dataset, "_fingerprint", None) or hashlib.sha256(f"{name}:{subset}:{split}".encode()).hexdigest()
    rows = [Row(item, f"{name}[{split}] row {i}") for i, item in enumerate(dataset)]
    return rows, fingerprint

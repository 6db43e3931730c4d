"""One tokenized-data cache entry read back: validated, never trusted.

An entry is ftune's own file, but it lives on a disk that fills, in a folder a killed process
or a user's hand can leave half-written: a truncated array, a meta.json cut short, token ids
that are not this tokenizer's. Opening one checks, before a single batch is made:
- meta.json parses (with ftune's JSON bounds) as the object ftune wrote, for this entry (its
  key and the cache version), and its `check` hash matches its contents;
- every array exists with the dtype and shape the meta says (so its byte size is right too);
- the offsets, sources and per-sample counts agree with the arrays;
- every token id and label is inside this tokenizer's vocabulary (a reduction over memory-
  mapped arrays: a pass at memory speed, far below what reading the rows again would cost).
Anything else raises `Damaged` with the reason; the caller rebuilds the entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ftune.data.packing import Encoded
from ftune.data.rendering import IGNORE
from ftune.errors import FtuneError
from ftune.guards import textio

CHUNK = 1 << 22  # elements per read (16 MiB of int32): bounded extra memory on any entry size
SPLITS = ("train", "eval")


class Damaged(Exception):
    """A cache entry that must not be used; the message says what is wrong with it."""


def write_meta(folder: Path, saved: dict, *, key: str, version: str, vocab: int) -> None:
    """meta.json for the arrays already in `folder`: the report, what each array must be, and a hash of it all."""
    arrays = {}
    for path in sorted(folder.glob("*.npy")):
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        arrays[path.name] = [array.dtype.str, list(array.shape)]
    body = {**saved, "entry": key, "version": version, "vocab": vocab, "arrays": arrays}
    (folder / "meta.json").write_text(textio.dumps({**body, "check": _check(body)}))


def read(folder: Path, *, key: str, version: str, vocab: int) -> tuple[Encoded, Encoded, dict] | None:
    """The entry's train and eval sets (memory-mapped) and its saved report; None when there is no entry."""
    meta = folder / "meta.json"
    if not meta.exists() and not meta.is_symlink():
        return None
    try:
        return _read(folder, meta, key=key, version=version, vocab=vocab)
    except Damaged:
        raise
    except FtuneError as exc:  # meta.json unreadable (not UTF-8, not JSON, nested, not a file)
        raise Damaged(f"meta.json: {exc.message}") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError, IndexError, AttributeError) as exc:
        # what numpy raises for a truncated, emptied or rewritten .npy file
        raise Damaged(f"{type(exc).__name__}: {str(exc)[:120]}") from None


def _read(folder: Path, meta: Path, *, key: str, version: str, vocab: int) -> tuple[Encoded, Encoded, dict]:
    saved = textio.load_file(meta, "cache meta")
    if not isinstance(saved, dict):
        raise Damaged("meta.json is not an object")
    check = saved.pop("check", None)
    if check != _check(saved):
        raise Damaged("meta.json does not match its check hash (cut short or edited)")
    if saved.pop("entry", None) != key or saved.pop("version", None) != version:
        raise Damaged("meta.json belongs to another entry or cache version")
    if saved.pop("vocab", None) != vocab:
        raise Damaged("it was made for a tokenizer of another vocabulary size")
    arrays = saved.pop("arrays")
    trained = saved.pop("trained")
    if not isinstance(arrays, dict) or not isinstance(trained, list) or len(trained) != 2:
        raise Damaged("meta.json lacks its array list")
    sets = []
    for name, count in zip(SPLITS, trained):
        ids, labels = (_load(folder, f"{name}_{k}.npy", arrays, mmap=True) for k in ("ids", "labels"))
        offsets = _load(folder, f"{name}_offsets.npy", arrays)
        source = _load(folder, "train_source.npy", arrays) if name == "train" else None
        per_sample = _load(folder, f"{name}_trained.npy", arrays)
        samples = len(offsets) - 1
        if (len(ids) != len(labels) or samples < 0 or int(offsets[0]) != 0 or int(offsets[-1]) != len(ids)
                or bool((np.diff(offsets) < 0).any()) or len(per_sample) != samples
                or (source is not None and len(source) != samples) or int(per_sample.sum()) != count):
            raise Damaged(f"the {name} arrays disagree with each other")
        _within(ids, 0, vocab, f"{name}_ids.npy")
        _within(labels, IGNORE, vocab, f"{name}_labels.npy")
        sets.append(Encoded(ids, labels, offsets, source, count, per_sample))
    return sets[0], sets[1], saved


def _load(folder: Path, name: str, arrays: dict, *, mmap: bool = False) -> np.ndarray:
    expected = arrays.get(name)
    path = folder / name
    if expected is None or not path.is_file() or path.is_symlink():
        raise Damaged(f"{name} is missing")
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if [array.dtype.str, list(array.shape)] != expected:
        raise Damaged(f"{name} is not the array meta.json describes")
    return array


def _within(values: np.memmap, low: int, vocab: int, name: str) -> None:
    """Every value of a memory-mapped array in [low, vocab), read from its file a chunk at a time.

    Plain reads into one chunk-sized buffer, not slices of the mapping: pages touched through
    the mapping would stay in the process's resident set, and a million-row entry would then
    cost its whole size in memory at every cache hit."""
    if not isinstance(values, np.memmap):  # numpy maps no empty array: it loads it
        if len(values) and (int(values.min()) < low or int(values.max()) >= vocab):
            raise Damaged(f"{name} holds token ids outside this tokenizer's vocabulary ({vocab})")
        return
    with open(values.filename, "rb") as handle:
        handle.seek(values.offset)
        left = len(values)
        while left:
            block = np.fromfile(handle, dtype=values.dtype, count=min(CHUNK, left))
            if len(block) == 0:
                raise Damaged(f"{name} is shorter than its header says")
            if int(block.min()) < low or int(block.max()) >= vocab:
                raise Damaged(f"{name} holds token ids outside this tokenizer's vocabulary ({vocab})")
            left -= len(block)


def _check(body: dict) -> str:
    return hashlib.sha256(textio.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

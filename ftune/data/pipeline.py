"""From a recipe's data section to tokenized train and eval sets, with a report and a cache.

Steps: read every source, map columns, detect or apply the format, convert rows (bad rows
stop the run or are counted, as the recipe says), shuffle with the seed, cap each source,
split off eval rows, then tokenize and label. The tokenized result is cached under a key
made of everything that can change it, so a second run starts training at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ftune.artifacts.lock import pid_alive
from ftune.artifacts.ownership import OUTPUT_MARKER, is_output, write_json
from ftune.data import cache_entry, cleaning, encode
from ftune.data.build import build, default_num_proc
from ftune.data.conversation import source_tools
from ftune.data.formats import BadRow, convert_row
from ftune.data.packing import Encoded
from ftune.data.render_proof import audit_labels, enforce
from ftune.data.rendering import Formatter
from ftune.data.sources import open_source, read_source
from ftune.errors import FtuneError
from ftune.guards import textio

if TYPE_CHECKING:
    from ftune.recipe import DataSection, Recipe


CACHE_VERSION = "sft-v6"  # v6: meta.json records what each array must be (cache_entry)


@dataclass
class Loaded:
    """Converted samples of one split, with where each came from."""

    samples: list = field(default_factory=list)
    places: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    sources: list[dict] = field(default_factory=list)  # path, format, rows, used, skipped
    skipped: list[str] = field(default_factory=list)  # "place: reason" (first 20 shown)
    skipped_count: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss: int = 0
    audit: dict = field(default_factory=dict)
    render_proof: dict = field(default_factory=dict)  # render_proof.prove's report
    rejected: list[str] = field(default_factory=list)  # rows the chat template cannot render (skipped), "place: reason"
    removed: list[str] = field(default_factory=list)  # rows data.dedup / data.filters removed, "place: reason" (first 20)
    removed_count: int = 0
    removed_by_rule: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # a few train samples with each token's kind, for `ftune inspect`

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "examples"}


def load_samples(data_section, *, base_dir: Path, seed: int, allowed: set[str]) -> tuple[Loaded, Loaded, DataReport, list[str]]:
    """Read and convert train and eval sources. Returns train, eval, report, source fingerprints."""
    report = DataReport()
    fingerprints: list[str] = []
    train = _load_split(data_section.train, data_section, base_dir, seed, allowed, report, fingerprints)
    if data_section.eval:
        evaluation = _load_split(data_section.eval, data_section, base_dir, seed + 1, allowed, report, fingerprints)
    else:
        n_eval = int(round(len(train.samples) * data_section.eval_fraction))
        if data_section.eval_fraction > 0 and len(train.samples) > 1:
            n_eval = max(1, min(n_eval, len(train.samples) - 1))
        evaluation = Loaded(train.samples[:n_eval], train.places[:n_eval])
        train = Loaded(train.samples[n_eval:], train.places[n_eval:])
    if not train.samples:
        raise FtuneError("no usable training rows", hint="see the skipped rows above, or check data.train")
    return train, evaluation, report, fingerprints


def _load_split(sources, section: DataSection, base_dir: Path, seed: int, allowed: set[str], report: DataReport, fingerprints: list[str]) -> Loaded:
    out = Loaded()
    rules = cleaning.Rules.from_section(section)
    deduper = cleaning.Deduper(rules) if rules.dedup else None
    seen: list[str] = []  # the deduper's row numbers: each checked row's place
    for source in sources:
        rows, fingerprint = read_source(source.path, base_dir=base_dir, split=source.split, subset=source.subset)
        fingerprints.append(fingerprint)
        if not rows:
            raise FtuneError("the data source has no rows", place=source.path)
        if rules.per_row or rules.dedup:
            rows = _curated(rows, source, rules, deduper, seen, allowed, report)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        fmt = source.format
        tools = source_tools(source.tools, source.path)
        used = skipped = 0
        for index in order:
            if source.samples is not None and used >= source.samples:
                break
            row = rows[index]
            try:
                sample, fmt = convert_row(row.data, fmt, columns=source.columns, tools=tools, allowed=allowed, place=row.place)
            except BadRow as exc:
                if section.on_bad_row == "error":
                    raise FtuneError(str(exc), place=row.place, hint="fix the row, or set data.on_bad_row: skip") from None
                skipped += 1
                report.skipped_count += 1
                if len(report.skipped) < 20:
                    report.skipped.append(f"{row.place}: {exc}")
                continue
            out.samples.append(sample)
            out.places.append(row.place)
            used += 1
        report.sources.append({"path": source.path, "format": fmt, "rows": len(rows), "used": used, "skipped": skipped})
    return out


def _curated(rows: list, source, rules: cleaning.Rules, deduper, seen: list[str], allowed: set[str], report: DataReport) -> list:
    """The rows data.filters and data.dedup keep, decided in file order (the first of duplicates is kept)."""
    kept = []
    tools = source_tools(source.tools, source.path)
    for row in rows:
        try:
            sample, _ = convert_row(row.data, source.format, columns=source.columns, tools=tools, allowed=allowed, place=row.place)
        except (BadRow, FtuneError):
            sample = None
        if sample is None:
            kept.append(row)  # a bad row is reported as one where it is used
            continue
        reason, kept_place = cleaning.row_reason(sample, rules), None
        if reason is None and deduper is not None:
            seen.append(row.place)
            duplicate = deduper.check(len(seen) - 1, cleaning.signature(sample, rules))
            if duplicate is not None:
                reason, kept_place = duplicate.reason, seen[duplicate.of]
        if reason is None:
            kept.append(row)
            continue
        report.removed_count += 1
        if len(report.removed) < 20:
            report.removed.append(f"{row.place}: {reason}" + (f" (kept: {kept_place})" if kept_place else ""))
        rule = cleaning.rule_of(reason)
        report.removed_by_rule[rule] = report.removed_by_rule.get(rule, 0) + 1
    return kept


def prepare_sft(recipe: Recipe, tokenizer, formatter: Formatter, *, base_dir: Path, cache_root: Path | None) -> tuple[Encoded, Encoded, DataReport]:
    """Train and eval sets for SFT, from the cache when nothing that shapes them changed.

    A cache hit reads no row: the key is made of the sources' content hashes, and the arrays
    open memory-mapped, so a run's resident memory for data grows with its batches, not the
    dataset. A miss tokenizes every row in `data.num_proc` processes (build.py), then selects
    (shuffle, caps, held-out split) on row numbers and writes the selected samples once.
    """
    section = recipe.data
    sources = [*section.train, *section.eval]
    opened = [open_source(s.path, base_dir=base_dir, split=s.split, subset=s.subset, streaming=s.streaming) for s in sources]
    # The names are in the key too: the cached report's places name the files as this recipe reads them.
    key = _cache_key(recipe, tokenizer, formatter, [[o.name, o.fingerprint] for o in opened])
    cached = _read_cache(cache_root / key, key, len(tokenizer)) if cache_root else None
    if cached is not None:
        return cached
    if cache_root:
        _remove_dead_spills(cache_root)
        spill = Path(tempfile.mkdtemp(prefix=f".spill.{os.getpid()}.", dir=_made(cache_root)))
        _mark(spill)
    else:
        spill = Path(tempfile.mkdtemp(prefix="ftune-data-"))
    try:
        built = build(section, sources, formatter, SFT_FORMATS, base_dir=base_dir, spill=spill,
                      num_proc=section.num_proc or default_num_proc(), opened=opened)
        report = DataReport(examples=built.examples)
        report.render_proof = enforce(built.proof, section.render_check)
        train_pieces, train_source, eval_pieces = _select(built, section, recipe.training.seed, report)
        if not len(train_pieces):
            raise FtuneError("no training sample has a token to learn from after tokenization", hint="check data.max_length and data.too_long")
        target = spill / "arrays"
        target.mkdir()
        _mark(target)
        train = _write_split(target, "train", built, train_pieces, train_source)
        evaluation = _write_split(target, "eval", built, eval_pieces, None)
        report.audit = audit_labels(formatter, [train.sample(i) for i in range(min(len(train), 2000))])
        if cache_root is None:
            return _in_memory(train), _in_memory(evaluation), report
        cache_entry.write_meta(target, {**report.as_dict(), "examples": report.examples, "trained": [train.trained, evaluation.trained]},
                               key=key, version=CACHE_VERSION, vocab=len(tokenizer))
        try:
            os.rename(target, cache_root / key)
        except OSError:  # another process wrote the same entry first: theirs is the same data
            pass
        return _read_cache(cache_root / key, key, len(tokenizer)) or (_in_memory(train), _in_memory(evaluation), report)
    finally:
        shutil.rmtree(spill, ignore_errors=True)


SFT_FORMATS = {"alpaca", "messages", "sharegpt", "prompt_completion", "text"}


def _remove_dead_spills(root: Path) -> None:
    """Spill folders a killed process left in the cache (named .spill.PID.*): ftune's own, removed once PID is gone."""
    for folder in root.glob(".spill.*.*"):
        pid = folder.name.split(".")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove_own(folder)


def _mark(folder: Path) -> None:
    """Say a cache folder is ftune's (the output marker), so only such a folder is ever removed."""
    write_json(folder / OUTPUT_MARKER, {"written_by": "ftune", "kind": "data-cache", "what": "tokenized data cache"})


def _remove_own(folder: Path) -> None:
    """Remove a cache folder ftune marked (never a link, never one without the marker)."""
    if folder.is_dir() and not folder.is_symlink() and is_output(folder):
        shutil.rmtree(folder, ignore_errors=True)

    return True


def _made(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


def _select(built, section: DataSection, seed: int, report: DataReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which pieces train and which are held out, in order, with each train piece's source; fills the report.

    As it always was: each source's usable rows in a seeded order, capped by its `samples`; the
    held-out rows are the first eval_fraction of the train rows unless eval sources are given.
    """
    train_count = len(section.train)
    chosen: list[tuple[int, np.ndarray]] = []  # (source index, rows) in order
    eval_chosen: list[tuple[int, np.ndarray]] = []
    for index, (source, rows) in enumerate(zip([*section.train, *section.eval], built.sources)):
        order = list(range(len(rows.numbers)))
        random.Random(seed if index < train_count else seed + 1).shuffle(order)
        order = np.asarray(order, np.int64)
        picked = order[rows.status[order] == encode.OK][: source.samples]
        (chosen if index < train_count else eval_chosen).append((index, picked))
        bad = np.flatnonzero((rows.status == encode.BAD) | (rows.status == encode.REJECTED))
        removed = int((rows.status == encode.FILTERED).sum())
        report.sources.append({"path": source.path, "format": rows.fmt or "auto", "rows": len(rows.numbers), "used": len(picked),
                               "skipped": len(bad), **({"removed": removed} if removed else {})})
        report.skipped_count += len(bad)
        for row in bad[: max(0, 20 - len(report.skipped))]:
            report.skipped.append(f"{rows.place(row)}: {rows.reasons[int(row)]}")
        report.rejected += [f"{rows.place(row)}: {rows.reasons[int(row)]}" for row in bad if rows.status[row] == encode.REJECTED][:20]
    report.removed_count = len(built.removed)
    report.removed = [f"{r.place}: {r.reason}" + (f" (kept: {r.duplicate_of})" if r.duplicate_of else "") for r in built.removed[:20]]
    report.removed_by_rule = cleaning.summarise(built.removed)["by_rule"] if built.removed else {}
    if not section.eval:
        total = sum(len(rows) for _, rows in chosen)
        n_eval = int(round(total * section.eval_fraction))
        if section.eval_fraction > 0 and total > 1:
            n_eval = max(1, min(n_eval, total - 1))
        eval_chosen, chosen = _cut(chosen, n_eval)
    if not sum(len(rows) for _, rows in chosen):
        raise FtuneError("no usable training rows", hint="see the skipped rows above, or check data.train")
    for part in (chosen, eval_chosen):
        for index, rows in part:
            counts = built.sources[index].counts[:, rows]
            report.truncated += int(counts[0].sum())
            report.dropped_too_long += int(counts[1].sum())
            report.dropped_no_loss += int(counts[2].sum())
    train_pieces, train_source = _pieces(built, chosen)
    eval_pieces, _ = _pieces(built, eval_chosen)
    return train_pieces, train_source, eval_pieces


def _cut(chosen: list[tuple[int, np.ndarray]], n: int):
    """The first n rows of the concatenation, and the rest."""
    head, tail = [], []
    for index, rows in chosen:
        take = min(n, len(rows))
        if take:
            head.append((index, rows[:take]))
        tail.append((index, rows[take:]))
        n -= take
    return head, tail


def _pieces(built, chosen: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The spill's piece indices of these rows, in order, and each one's source."""
    parts, owners = [], []
    for index, rows in chosen:
        source = built.sources[index]
        starts = source.first_piece + np.concatenate([[0], np.cumsum(source.pieces)])[:-1]
        counts = source.pieces[rows]
        first = np.repeat(starts[rows], counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        parts.append(first + within)
        owners.append(np.full(len(first), index, np.int16))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int16)
    return np.concatenate(parts).astype(np.int64), np.concatenate(owners)


GATHER = 1 << 16  # pieces copied per mapping of the spill


def _write_split(folder: Path, name: str, built, pieces: np.ndarray, source: np.ndarray | None) -> Encoded:
    """The pieces, in order, as .npy files in `folder` (opened memory-mapped).

    Written with plain writes, GATHER pieces at a time from a fresh mapping of the spill, so the
    pages read and written never pile up in this process's memory (a mapping keeps them resident).
    """
    spill_offsets = np.concatenate([[0], np.cumsum(built.lengths)]).astype(np.int64)
    lengths = built.lengths[pieces] if len(pieces) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False, "shape": (total,)}
    for kind_, path in (("ids", built.ids_path), ("labels", built.labels_path)):
        with (folder / f"{name}_{kind_}.npy").open("wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            for first in range(0, len(pieces), GATHER):
                spilled = np.memmap(path, dtype=np.int32, mode="r")
                block = pieces[first: first + GATHER]
                out.write(np.concatenate([spilled[spill_offsets[i]: spill_offsets[i + 1]] for i in block.tolist()]).tobytes())
                del spilled
    np.save(folder / f"{name}_offsets.npy", offsets)
    if source is not None:
        np.save(folder / f"{name}_source.npy", source)
    per_sample = built.trained[pieces] if len(pieces) else np.zeros(0, np.int64)
    np.save(folder / f"{name}_trained.npy", per_sample)
    ids, labels = (np.load(folder / f"{name}_{k}.npy", mmap_mode="r") for k in ("ids", "labels"))
    return Encoded(ids, labels, offsets, source, int(per_sample.sum()), per_sample)


def _in_memory(data: Encoded) -> Encoded:
    return Encoded(np.array(data.ids), np.array(data.labels), data.offsets, data.source, data.trained, data.per_sample)


def _cache_key(recipe: Recipe, tokenizer, formatter: Formatter, fingerprints: list) -> str:
    data = json.loads(recipe.data.model_dump_json())
    # What cannot change the arrays: how many processes made them, and how each epoch mixes them.
    for key in ("num_proc", "epoch_samples", "replacement"):
        data.pop(key, None)
    for source in data["train"]:
        source.pop("weight", None)
    parts = {
        "version": CACHE_VERSION,
        "data": data,
        "seed": recipe.training.seed,
        "sources": fingerprints,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "template": formatter.template,
        "tool_template": formatter.tool_template,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, formatter.prepend_bos],
    }
    return hashlib.sha256(textio.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(folder: Path, key: str, vocab: int):
    """A cache entry's sets, memory-mapped, and its report; None when absent or damaged.

    A damaged entry (cache_entry says why: truncated, edited, ids outside this vocabulary) is
    ftune's own file: it is removed (only when ftune's marker proves it) and rebuilt, with a
    note naming it, instead of failing every run until someone deletes it by hand.
    """
    try:
        found = cache_entry.read(folder, key=key, version=CACHE_VERSION, vocab=vocab)
        if found is None:
            return None
        train, evaluation, saved = found
        return train, evaluation, DataReport(**saved)
    except (cache_entry.Damaged, TypeError) as exc:  # TypeError: a report of fields this version does not know
        sys.stderr.write(f"note: the data cache entry {folder} is damaged ({exc}); rebuilding it\n")
        _remove_own(folder)
        return None
"""From a recipe's data section to tokenized train and eval sets, with a report and a cache.

Steps: read every source, map columns, detect or apply the format, convert rows (bad rows
stop the run or are counted, as the recipe says), shuffle with the seed, cap each source,
split off eval rows, then tokenize and label. The tokenized result is cached under a key
made of everything that can change it, so a second run starts training at once.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftune.data.chat import IGNORE, KINDS, Formatter, audit_labels
from ftune.data.conversation import source_tools
from ftune.data.formats import BadRow, Raw, convert, detect_format, kind, rename_columns
from ftune.data.packing import Encoded
from ftune.data.render_proof import prove
from ftune.data.sources import read_source
from ftune.errors import FtuneError
from ftune.runs import atomic_file

CACHE_VERSION = "sft-v3"


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


def _load_split(sources, section, base_dir, seed, allowed, report: DataReport, fingerprints: list[str]) -> Loaded:
    out = Loaded()
    for source in sources:
        rows, fingerprint = read_source(source.path, base_dir=base_dir, split=source.split, subset=source.subset)
        fingerprints.append(fingerprint)
        if not rows:
            raise FtuneError("the data source has no rows", place=source.path)
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
                data = rename_columns(row.data, source.columns) if isinstance(row.data, dict) else row.data
                if fmt == "auto":
                    if not isinstance(data, dict):
                        raise BadRow(f"a row must be an object with named fields, not {kind(data)}")
                    fmt = detect_format(data)
                if fmt not in allowed:
                    raise FtuneError(
                        f"rows in {fmt} format cannot train this stage (expected {', '.join(sorted(allowed))})",
                        place=row.place,
                        hint="set `format:` for this source in the recipe",
                    )
                sample = convert(data, fmt, tools=tools)
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


def encode_split(formatter: Formatter, loaded: Loaded, section, report: DataReport) -> Encoded:
    """Tokenize and label samples, applying the recipe's too-long rule; drops samples with no loss."""
    kept: list[tuple[list[int], list[int]]] = []
    for ids, labels in _encode_rows(formatter, loaded, section, report):
        if len(ids) > section.max_length:
            if section.too_long == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            ids, labels = ids[: section.max_length], labels[: section.max_length]
        if not any(label != IGNORE for label in labels[1:]):
            report.dropped_no_loss += 1
            continue
        kept.append((ids, labels))
    return Encoded.from_lists(kept)


def _encode_rows(formatter: Formatter, loaded: Loaded, section, report: DataReport):
    """Every sample's (ids, labels) pieces; a conversation the chat template rejects is a bad row (data.on_bad_row)."""
    for place, result in zip(loaded.places, formatter.encode_each(loaded.samples, places=loaded.places)):
        if isinstance(result, BadRow):
            if section.on_bad_row == "error":
                raise FtuneError(str(result), place=place, hint="fix the row, or set data.on_bad_row: skip")
            report.skipped_count += 1
            report.rejected.append(f"{place}: {result}")
            if len(report.skipped) < 20:
                report.skipped.append(f"{place}: {result}")
            continue
        yield from result


def annotated_examples(formatter: Formatter, loaded: Loaded, max_length: int, count: int = 4) -> list[dict]:
    """The first few conversations' samples with each token's kind (KINDS indexes), cut to max_length."""
    out: list[dict] = []
    for sample, place in zip(loaded.samples, loaded.places):
        if len(out) >= count:
            break
        try:
            pieces = formatter.annotate(sample) if not isinstance(sample, Raw) else []
        except BadRow:
            continue
        except FtuneError as exc:  # the template cannot carry this conversation: say which row
            raise FtuneError(exc.message, place=exc.place or place, hint=exc.hint) from None
        for ids, labels, kinds in pieces[: count - len(out)]:
            out.append({"place": place, "ids": ids[:max_length], "labels": labels[:max_length],
                        "kinds": [KINDS.index(k) for k in kinds[:max_length]]})
    return out


def prepare_sft(recipe, tokenizer, formatter: Formatter, *, base_dir: Path, cache_root: Path | None) -> tuple[Encoded, Encoded, DataReport]:
    """Train and eval sets for SFT, from the cache when nothing that shapes them changed."""
    allowed = {"alpaca", "messages", "sharegpt", "prompt_completion", "text"}
    train_rows, eval_rows, report, fingerprints = load_samples(recipe.data, base_dir=base_dir, seed=recipe.training.seed, allowed=allowed)
    key = _cache_key(recipe, tokenizer, formatter, fingerprints)
    report.examples = annotated_examples(formatter, train_rows, recipe.data.max_length)  # a few renders: never cached
    cached = _read_cache(cache_root, key) if cache_root else None
    if cached is not None:
        train, evaluation, saved = cached
        report.truncated, report.dropped_too_long, report.dropped_no_loss = saved["truncated"], saved["dropped_too_long"], saved["dropped_no_loss"]
        report.audit = saved["audit"]
        report.render_proof = saved["render_proof"]
        report.skipped_count += len(saved["rejected"])
        report.skipped += [line for line in saved["rejected"] if line not in report.skipped][: max(0, 20 - len(report.skipped))]
        return train, evaluation, report
    # Before anything is tokenized: does training render each answer as inference will?
    report.render_proof = prove(formatter, train_rows.samples, train_rows.places, mode=recipe.data.render_check)
    train = encode_split(formatter, train_rows, recipe.data, report)
    if len(train) == 0:
        raise FtuneError("no training sample has a token to learn from after tokenization", hint="check data.max_length and data.too_long")
    evaluation = encode_split(formatter, eval_rows, recipe.data, report)
    report.audit = audit_labels(formatter, [train.sample(i) for i in range(min(len(train), 2000))])
    if cache_root:
        _write_cache(cache_root, key, train, evaluation, report)
    return train, evaluation, report


def _cache_key(recipe, tokenizer, formatter: Formatter, fingerprints: list[str]) -> str:
    parts = {
        "version": CACHE_VERSION,
        "data": json.loads(recipe.data.model_dump_json()),
        "seed": recipe.training.seed,
        "sources": fingerprints,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "template": formatter.template,
        "tool_template": formatter.tool_template,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, formatter.prepend_bos],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(root: Path, key: str):
    path = root / f"{key}.npz"
    meta = root / f"{key}.json"
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            train = Encoded(arrays["train_ids"], arrays["train_labels"], arrays["train_offsets"])
            evaluation = Encoded(arrays["eval_ids"], arrays["eval_labels"], arrays["eval_offsets"])
        return train, evaluation, json.loads(meta.read_text())
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is rebuilt


def _write_cache(root: Path, key: str, train: Encoded, evaluation: Encoded, report: DataReport) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with atomic_file(root / f"{key}.npz", "wb") as handle:
        np.savez(
            handle,
            train_ids=train.ids, train_labels=train.labels, train_offsets=train.offsets,
            eval_ids=evaluation.ids, eval_labels=evaluation.labels, eval_offsets=evaluation.offsets,
        )
    saved = {k: getattr(report, k) for k in ("truncated", "dropped_too_long", "dropped_no_loss", "audit", "render_proof", "rejected")}
    with atomic_file(root / f"{key}.json") as handle:
        json.dump(saved, handle)


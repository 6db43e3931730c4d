"""One job's rows, in a worker (or in the parent): parse, convert, filter, render, tokenize.

A job is CHUNK rows of one source; its result is the tokens of the pieces kept and a few
numbers per row (build.py keeps those and never the rows). Everything a job needs besides
itself (the formatter, the data section, the rules) is in _WORKER, set by the parent before
it forks, so nothing large is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ftune.data import cleaning
from ftune.data.formats import BadRow, Raw, convert_row
from ftune.data.render_proof import prove
from ftune.data.rendering import IGNORE, KINDS
from ftune.data.sources import Unit, parse
from ftune.errors import FtuneError

if TYPE_CHECKING:
    from ftune.recipe import DataSection


EXAMPLES = 4  # train samples annotated for `ftune inspect`


# Row status, per row of a source.
OK, BAD, FILTERED, REJECTED = 0, 1, 2, 3


@dataclass(frozen=True)
class Job:
    name: str
    counted: str
    fmt: str | None  # None: detect per row
    columns: dict
    tools: tuple
    units: list[Unit]
    prove: int = 0  # conversations of this job the render proof checks
    annotate: int = 0  # samples of this job to annotate for `ftune inspect`


@dataclass
class Done:
    """A job's result: per row, per kept piece, and the tokens."""

    numbers: np.ndarray  # int64 per row: the line or index its place names
    status: np.ndarray  # int8 per row
    reasons: dict  # row position -> why it is not OK
    pieces: np.ndarray  # int32 per row: pieces kept
    truncated: np.ndarray  # int32 per row
    too_long: np.ndarray  # int32 per row: pieces dropped by data.too_long: drop
    no_loss: np.ndarray  # int32 per row: pieces dropped with no trained token
    lengths: np.ndarray  # int32 per kept piece
    trained: np.ndarray  # int32 per kept piece: tokens with loss once shifted
    ids: np.ndarray
    labels: np.ndarray
    signatures: list = field(default_factory=list)  # per row (None unless OK), with dedup on
    proof: dict | None = None
    examples: list = field(default_factory=list)
    error: tuple | None = None  # (message, place, hint): the run stops here


_WORKER: dict = {}  # what a job needs besides itself: set by the parent before workers fork


def encode_job(job: Job) -> Done:
    """Parse, convert, filter and tokenize one job's rows (in a worker, or in the parent when num_proc is 1)."""
    try:
        return _encode(job)
    except FtuneError as exc:
        return _failed(exc.message, exc.place, exc.hint)


def _failed(message, place, hint) -> Done:
    empty = np.zeros(0, np.int64)
    return Done(empty, empty, {}, empty, empty, empty, empty, empty, empty, empty, empty, error=(message, place, hint))


def _encode(job: Job) -> Done:
    formatter, section, rules, allowed = (_WORKER[k] for k in ("formatter", "section", "rules", "allowed"))
    numbers, status, reasons, samples, places, positions = [], [], {}, [], [], []
    for unit in job.units:
        row = parse(unit, job.name, job.counted)
        if row is None:
            continue  # a blank line is no row
        pos = len(numbers)
        numbers.append(unit.number)
        try:
            sample = _convert(row.data, job, allowed, row.place)
            reason = cleaning.row_reason(sample, rules) if rules.per_row else None
        except BadRow as exc:
            status.append(BAD)
            reasons[pos] = str(exc)
            continue
        if reason is not None:
            status.append(FILTERED)
            reasons[pos] = reason
            continue
        status.append(OK)
        samples.append(sample)
        places.append(row.place)
        positions.append(pos)
    done = _tokenize(formatter, section, rules, samples, places, positions, len(numbers), status, reasons)
    done.numbers = np.asarray(numbers, np.int64)
    if rules.dedup:
        by_pos = dict(zip(positions, samples))
        done.signatures = [cleaning.signature(by_pos[p], rules) if done.status[p] == OK else None for p in range(len(numbers))]
    if job.prove:
        done.proof = prove(formatter, samples, places, mode="warn", limit=job.prove)
    if job.annotate:
        done.examples = annotated_examples(formatter, samples, places, section.max_length, job.annotate)
    return done


def annotated_examples(formatter, samples: list, places: list[str], max_length: int, count: int = EXAMPLES) -> list[dict]:
    """The first few conversations' samples with each token's kind (KINDS indexes), cut to max_length."""
    out: list[dict] = []
    for sample, place in zip(samples, places):
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


def _convert(data, job: Job, allowed: set[str], place: str):
    return convert_row(data, job.fmt or "auto", columns=job.columns, tools=job.tools, allowed=allowed, place=place)[0]


def _tokenize(formatter, section: DataSection, rules: cleaning.Rules, samples, places, positions, rows: int, status: list, reasons: dict) -> Done:
    pieces = np.zeros(rows, np.int32)
    truncated, too_long, no_loss = (np.zeros(rows, np.int32) for _ in range(3))
    lengths, trained, ids_parts, labels_parts = [], [], [], []
    status = np.asarray(status, np.int8)
    for pos, place, result in zip(positions, places, formatter.encode_each(samples, places=places)):
        if isinstance(result, BadRow):
            status[pos] = REJECTED
            reasons[pos] = str(result)
            continue
        filtered = None
        for ids, labels in result:
            if len(ids) > section.max_length:
                if section.too_long == "drop":
                    too_long[pos] += 1
                    continue
                truncated[pos] += 1
                ids, labels = ids[: section.max_length], labels[: section.max_length]
            ids, labels = np.asarray(ids, np.int32), np.asarray(labels, np.int32)
            shifted = int((labels[1:] != IGNORE).sum())
            if not shifted:
                no_loss[pos] += 1
                continue
            if rules.lengths:
                filtered = cleaning.length_reason(len(ids), rules)
                if filtered:
                    continue
            pieces[pos] += 1
            lengths.append(len(ids))
            trained.append(shifted)
            ids_parts.append(ids)
            labels_parts.append(labels)
        if filtered and not pieces[pos]:
            status[pos] = FILTERED
            reasons[pos] = filtered
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32)  # noqa: E731
    return Done(np.zeros(0, np.int64), status, reasons, pieces, truncated, too_long, no_loss,
                np.asarray(lengths, np.int32), np.asarray(trained, np.int32), join(ids_parts), join(labels_parts))

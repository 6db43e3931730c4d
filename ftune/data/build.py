"""Reading, converting and tokenizing every row of an SFT recipe's sources, in parallel and in bounded memory.

The parent process streams each source (sources.open_source) into jobs of CHUNK rows, one
per worker at a time; a worker (encode.py) parses its rows (a JSONL line arrives as bytes),
converts them, applies the per-row filters, renders and tokenizes them, and sends back its
tokens and a few numbers per row. The parent takes results in order, appends the tokens to
spill files on disk, runs the duplicate check (which must see rows in order: the first of a
group is kept) and keeps, per row, only numbers. Whatever `num_proc` is, the same rows give
the same arrays: work is cut into the same jobs and read back in the same order.

Workers are forked, so they share the parent's formatter (tokenizer, chat template) without
pickling it; tokenizers' own thread pool is switched off in them.
"""

from __future__ import annotations

import array
import collections
import multiprocessing
import os
import signal
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ftune.data import cleaning
from ftune.data.conversation import source_tools
from ftune.data.encode import (
    _WORKER,
    BAD,
    EXAMPLES,
    FILTERED,
    OK,
    REJECTED,
    Done,
    Job,
    encode_job,
)
from ftune.data.formats import BadRow, check_allowed, convert_row
from ftune.data.render_proof import CONVERSATIONS_CHECKED
from ftune.data.sources import Opened, Unit, open_source, parse, place_of
from ftune.errors import FtuneError
from ftune.guards.usercode_worker import die_with_parent  # one guard for every worker ftune starts

if TYPE_CHECKING:
    from ftune.recipe import DataSection, DataSource


CHUNK = 1024  # rows per job: big enough that a job's fixed costs vanish, small enough to keep workers even


@dataclass
class SourceRows:
    """What the parent keeps of one source: numbers per row, never the rows."""

    opened: Opened
    fmt: str | None
    numbers: list = field(default_factory=list)  # arrays, concatenated by `finish`
    status: list = field(default_factory=list)
    pieces: list = field(default_factory=list)
    counts: list = field(default_factory=list)  # (truncated, too_long, no_loss) arrays
    reasons: dict = field(default_factory=dict)  # row position -> reason
    first_piece: int = 0  # index of its first piece in the spill
    is_train: bool = True
    rows_so_far: int = 0

    def finish(self) -> None:
        join = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        self.numbers, self.status, self.pieces = join(self.numbers, np.int64), join(self.status, np.int8), join(self.pieces, np.int64)
        self.counts = np.stack([join([c[k] for c in self.counts], np.int64) for k in range(3)]) if self.counts else np.zeros((3, 0), np.int64)

    def place(self, row: int) -> str:
        return place_of(self.opened.name, self.opened.counted, int(self.numbers[row]))


@dataclass
class Built:
    sources: list[SourceRows]  # train sources, then eval sources
    lengths: np.ndarray  # int64 per piece, in spill order
    trained: np.ndarray
    ids_path: Path
    labels_path: Path
    proof: dict
    examples: list
    removed: list  # cleaning.Removal, in order




def default_num_proc() -> int:
    """The cores this process may use, shared between the processes of a distributed run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def build(section: DataSection, sources: list[DataSource], formatter, allowed: set[str], *, base_dir: Path, spill: Path, num_proc: int,
          opened: list[Opened] | None = None) -> Built:
    """Every row of `sources` (train then eval), tokenized into spill files under `spill`."""
    rules = cleaning.Rules.from_section(section)
    _WORKER.update(formatter=formatter, section=section, rules=rules, allowed=allowed)
    spill.mkdir(parents=True, exist_ok=True)
    ids_path, labels_path = spill / "ids.bin", spill / "labels.bin"
    state = _Parent(rules, len(section.train))
    workers = _Workers(num_proc)
    try:
        with ids_path.open("wb") as ids_out, labels_path.open("wb") as labels_out:
            for index, source in enumerate(sources):
                handle = opened[index] if opened else open_source(source.path, base_dir=base_dir, split=source.split,
                                                                  subset=source.subset, streaming=source.streaming)
                rows = state.start(handle, source, allowed, is_train=index < len(section.train))
                pending: collections.deque = collections.deque()
                for job in state.jobs(handle, source, rows):
                    while len(pending) >= workers.capacity:
                        state.take(rows, workers.result(pending.popleft()), ids_out, labels_out)
                    pending.append(workers.submit(job))
                while pending:
                    state.take(rows, workers.result(pending.popleft()), ids_out, labels_out)
                rows.finish()
                if not len(rows.numbers):
                    raise FtuneError("the data source has no rows", place=source.path)
    finally:
        workers.close()
    join = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return Built(state.sources, join(state.lengths), join(state.trained), ids_path, labels_path, state.proof,
                 state.examples[:EXAMPLES], state.removed)


class _Workers:
    """Forked worker processes, each with its own pipe and one job at a time, results read in order.

    They start only once there is a second job (small data stays in this process), forked with
    SIGINT ignored and SIGTERM at its default so that no handler of the parent's runs in them.
    With no lock shared between them, `close` can kill them wherever they are. A job that brings
    no result for STALLED seconds is an error, never a wait for ever.
    """

    STALLED = 900  # seconds: a job of CHUNK rows takes a second or two

    def __init__(self, num_proc: int):
        self.num_proc = num_proc if "fork" in multiprocessing.get_all_start_methods() else 1
        self.processes: list = []
        self.pipes: list = []
        self.submitted = 0

    @property
    def capacity(self) -> int:
        """Jobs that may be pending: one per worker (or, before any starts, the one run here)."""
        return len(self.processes) or 1

    def submit(self, job: Job):
        self.submitted += 1
        if not self.processes and self.num_proc > 1 and self.submitted > 1:
            self._start()
        if not self.processes:
            return job
        worker = (self.submitted - 2) % len(self.processes)
        self.pipes[worker].send(job)  # it is idle: its last result was read before this job was made
        return worker

    def result(self, handle) -> Done:
        if isinstance(handle, Job):
            return encode_job(handle)
        pipe = self.pipes[handle]
        if not pipe.poll(self.STALLED):
            raise FtuneError(f"a tokenization worker gave no result in {self.STALLED} s",
                             hint="set data.num_proc: 1 to tokenize in the main process")
        try:
            done = pipe.recv()
        except EOFError:
            raise FtuneError("a tokenization worker died (out of memory?)",
                             hint="set a smaller data.num_proc, or data.num_proc: 1") from None
        if isinstance(done, OSError):  # cli.main turns it into one line naming the path, as in one process
            raise done
        if isinstance(done, str):  # a bug, not bad data: its traceback, from the worker
            raise RuntimeError(f"a tokenization worker failed:\n{done}")
        return done

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            for _ in range(self.num_proc):
                mine, theirs = context.Pipe()
                # The child closes the parent's ends it inherits (its own and earlier workers'):
                # a pipe must close when the parent dies, so that no worker waits on it for ever.
                process = context.Process(target=_serve, args=(theirs, [mine, *self.pipes]), daemon=True)
                process.start()
                theirs.close()
                self.processes.append(process)
                self.pipes.append(mine)
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for process, pipe in zip(self.processes, self.pipes):
            process.join()
            pipe.close()
        self.processes, self.pipes = [], []


def _serve(pipe, inherited: list) -> None:
    """A worker: jobs in, results out, until the parent closes its end (or dies: then so does the worker)."""
    for other in inherited:
        other.close()
    die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the workers are the parallelism
    while True:
        try:
            job = pipe.recv()
        except (EOFError, OSError):
            return
        try:
            done = encode_job(job)
        except OSError as exc:  # the file system's (a full disk, a file where a folder goes): the parent reports it as its own
            done = exc
        except Exception:
            done = traceback.format_exc()
        pipe.send(done)




class _Parent:
    """The parent's side: which jobs to make, and what to keep of their results."""

    def __init__(self, rules: cleaning.Rules, train_sources: int):
        self.rules = rules
        self.train_sources = train_sources
        self.deduper = cleaning.Deduper(rules) if rules.dedup else None
        self.sources: list[SourceRows] = []
        self.lengths: list[np.ndarray] = []  # per job
        self.trained: list[np.ndarray] = []
        self.pieces_so_far = 0
        self.proof = {"conversations": 0, "turns": 0, "mismatched": 0, "mismatches": []}
        self.examples: list = []
        self.removed: list[cleaning.Removal] = []
        self.proof_rows = 0  # train rows given to the render proof so far
        # deduper index -> source and line (or row) number, for duplicate_of; compact: one per row checked
        self.checked_source, self.checked_number = array.array("h"), array.array("q")

    def start(self, opened: Opened, source, allowed: set[str], *, is_train: bool) -> SourceRows:
        rows = SourceRows(opened, source.format if source.format != "auto" else None, is_train=is_train)
        rows.first_piece = self.pieces_so_far
        self.sources.append(rows)
        return rows

    def jobs(self, opened: Opened, source, rows: SourceRows):
        tools = source_tools(source.tools, source.path)
        chunk: list[Unit] = []
        for unit in opened.units:
            chunk.append(unit)
            if len(chunk) == CHUNK:
                yield self._job(opened, source, rows, tools, chunk)
                chunk = []
        if chunk:
            yield self._job(opened, source, rows, tools, chunk)

    def _job(self, opened: Opened, source, rows: SourceRows, tools, units: list[Unit]) -> Job:
        if rows.fmt is None and source.format == "auto":
            rows.fmt = _detect(units, opened, source, _WORKER["allowed"])
        elif source.format != "auto" and not rows.numbers and source.format not in _WORKER["allowed"]:
            check_allowed(source.format, _WORKER["allowed"], opened.place(units[0].number))
        proof = annotate = 0
        if rows.is_train and self.proof_rows < CONVERSATIONS_CHECKED:
            annotate = EXAMPLES if self.proof_rows == 0 else 0  # the first train rows: what `ftune inspect` shows
            proof = min(len(units), CONVERSATIONS_CHECKED - self.proof_rows)
            self.proof_rows += proof
        return Job(opened.name, opened.counted, rows.fmt, dict(source.columns), tools, units, proof, annotate)

    def take(self, rows: SourceRows, done: Done, ids_out, labels_out) -> None:
        if done.error is not None:
            message, place, hint = done.error
            raise FtuneError(message, place=place, hint=hint)
        section = _WORKER["section"]
        base = rows.rows_so_far
        rows.rows_so_far += len(done.numbers)
        status = done.status.copy()
        for pos, reason in done.reasons.items():
            code = status[pos]
            place = place_of(rows.opened.name, rows.opened.counted, int(done.numbers[pos]))
            if code in (BAD, REJECTED) and section.on_bad_row == "error":
                raise FtuneError(reason, place=place, hint="fix the row, or set data.on_bad_row: skip")
            if code == FILTERED:
                self.removed.append(cleaning.Removal(place, reason))
            rows.reasons[base + pos] = reason
        if self.deduper is not None:
            self._dedup(rows, done, status, base)
        rows.numbers.append(done.numbers)
        rows.status.append(status)
        rows.pieces.append(done.pieces)
        rows.counts.append((done.truncated, done.too_long, done.no_loss))
        self.lengths.append(done.lengths)
        self.trained.append(done.trained)
        self.pieces_so_far += len(done.lengths)
        ids_out.write(np.ascontiguousarray(done.ids, dtype=np.int32).tobytes())
        labels_out.write(np.ascontiguousarray(done.labels, dtype=np.int32).tobytes())
        if done.proof:
            for key in ("conversations", "turns", "mismatched"):
                self.proof[key] += done.proof[key]
            self.proof["mismatches"] += done.proof["mismatches"]
        self.examples += done.examples

    def _dedup(self, rows: SourceRows, done: Done, status: np.ndarray, base: int) -> None:
        # Duplicates are dropped with their pieces: the piece arrays stay as the worker sent them,
        # and the row's status says it is not used.
        for pos, sig in enumerate(done.signatures):
            if status[pos] != OK or sig is None:
                continue
            number = int(done.numbers[pos])
            self.checked_source.append(len(self.sources) - 1)
            self.checked_number.append(number)
            duplicate = self.deduper.check(len(self.checked_number) - 1, sig)
            if duplicate is None:
                continue
            status[pos] = FILTERED
            rows.reasons[base + pos] = duplicate.reason
            owner = self.sources[self.checked_source[duplicate.of]].opened
            self.removed.append(cleaning.Removal(rows.opened.place(number), duplicate.reason, owner.place(self.checked_number[duplicate.of])))


def _detect(units: list[Unit], opened: Opened, source, allowed: set[str]) -> str | None:
    """A source's format, from its first row whose columns tell it (None: none in the first job; each row is then asked)."""
    for unit in units:
        row = parse(unit, opened.name, opened.counted)
        if row is None or not isinstance(row.data, dict):
            continue
        try:
            return convert_row(row.data, "auto", columns=source.columns, tools=(), allowed=allowed, place=row.place)[1]
        except BadRow:
            continue
    return None


"""Preference pairs as token sequences: what DPO, the reward model and `ftune score` train on and read.

Pairs are stored as one `Encoded` of 2n sequences: 2i is the chosen answer of pair i,
2i+1 the rejected one. KTO examples are stored the same way: 2i is the example itself,
2i+1 the same prompt with the next example's answer, which estimates the KL term.
Only each sequence's final answer (and its end-of-turn token) is labelled. `packed_rows`
packs chosen and rejected sequences into rows, each attending only to itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ftune.data.formats import Chat, Preference
from ftune.data.packing import Encoded, collate, pack
from ftune.data.rendering import IGNORE, Formatter


@dataclass(frozen=True)
class PairSet:
    sequences: Encoded
    kto_labels: np.ndarray | None = None  # bool per example, KTO only
    margins: np.ndarray | None = None  # float32 per pair, for a reward model trained with rm.use_margin

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def head(self, n: int) -> PairSet:
        """The first n pairs (or KTO examples), with their labels and margins."""
        return PairSet(self.sequences.head(2 * n), self.kto_labels[:n] if self.kto_labels is not None else None,
                       self.margins[:n] if self.margins is not None else None)


def encode_pairs(formatter: Formatter, samples: list[Preference], *, method: str, max_length: int,
                 max_prompt_length: int | None, report, with_margins: bool = False) -> PairSet:
    """Tokenize pairs (or KTO examples); pairs whose answer does not fit are dropped and counted.
    `with_margins` keeps the kept pairs' `margin` (numbers already: the caller checked them)."""
    examples: list[tuple[tuple, tuple, tuple, bool | None]] = []  # prompt, first, second, label
    if method == "kto":
        singles = []
        for s in samples:
            if s.label is None:
                singles += [(s.prompt, s.chosen, True), (s.prompt, s.rejected, False)]
            else:
                singles.append((s.prompt, s.chosen, s.label))
        for i, (prompt, answer, label) in enumerate(singles):
            mismatched = singles[(i + 1) % len(singles)][1]
            examples.append((prompt, answer, mismatched, label))
    else:
        examples = [(s.prompt, s.chosen, s.rejected, None) for s in samples]
    kept: list[tuple[list[int], list[int]]] = []
    labels: list[bool] = []
    margins: list[float] = []
    for index, (prompt, first, second, label) in enumerate(examples):
        encoded = [_encode(formatter, prompt, answer, max_length, max_prompt_length, report) for answer in (first, second)]
        # A pair whose answers differ only past max_length trains on two identical sequences:
        # no preference is left in it, so it is dropped as too long.
        if any(e is None for e in encoded) or (method != "kto" and encoded[0] == encoded[1]):
            report.dropped_too_long += 1
            continue
        kept += encoded
        labels.append(bool(label))
        if with_margins:
            margins.append(samples[index].margin)
    return PairSet(Encoded.from_lists(kept), np.array(labels) if method == "kto" else None,
                   np.array(margins, dtype=np.float32) if with_margins else None)


def _encode(formatter: Formatter, prompt, answer, max_length: int, max_prompt_length: int | None, report):
    ids, labels = formatter.encode(Chat(formatter.with_system(tuple(prompt)) + tuple(answer)), last_turn_only=True)
    first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if first is None:
        return None
    if max_prompt_length is not None and first > max_prompt_length:
        cut = first - max_prompt_length  # keep the end of the prompt, nearest the answer
        ids, labels = ids[cut:], labels[cut:]
        report.truncated += 1
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        report.truncated += 1
        if not any(label != IGNORE for label in labels[1:]):
            return None
    return ids, labels


def packed_rows(data: Encoded, indices: list[int], *, max_length: int, pad_id: int, device) -> tuple[dict, list[tuple[int, int]]]:
    """Sequences `indices` packed into rows of at most `max_length` tokens (each attends only to
    itself): the batch on `device`, and where each sequence starts, as (row, column), in `indices` order."""
    local_rows = pack(data.lengths()[indices], max_length)
    rows = [[indices[j] for j in row] for row in local_rows]
    batch = {k: v.to(device) for k, v in collate(data, rows, pad_id, packed=True).items()}
    places: list[tuple[int, int]] = [(0, 0)] * len(indices)
    lengths = data.lengths()
    for r, row in enumerate(local_rows):
        at = 0
        for j in row:
            places[j] = (r, at)
            at += int(lengths[indices[j]])
    return batch, places

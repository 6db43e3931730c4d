"""Batches: samples packed into rows with no cross-contamination, or padded and length-grouped.

Packed rows carry position ids that restart at 0 for every sample. With no attention mask,
transformers builds a block-diagonal causal mask from them (and varlen kernels use them
directly), so each sample attends only to itself, as it would alone.

Targets are shifted here, once: `targets[t]` is the token the model must predict after
position t, or IGNORE. A sample's first token is never a target of the previous sample's
last position.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np

from ftune.data.chat import IGNORE


@dataclass(frozen=True)
class Encoded:
    """Tokenized samples stored flat: sample i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where no loss
    offsets: np.ndarray  # int64, len = samples + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.labels[a:b]

    def head(self, n: int) -> Encoded:
        """The first n samples."""
        n = min(n, len(self))
        end = self.offsets[n]
        return Encoded(self.ids[:end], self.labels[:end], self.offsets[: n + 1])

    def trained_tokens(self) -> int:
        """Tokens that carry loss once shifted (a sample's first token is never a target)."""
        starts = self.offsets[:-1]
        return int((self.labels != IGNORE).sum() - (self.labels[starts] != IGNORE).sum())

    @staticmethod
    def from_lists(samples: list[tuple[list[int], list[int]]]) -> Encoded:
        lengths = [len(ids) for ids, _ in samples]
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for s, _ in samples for t in s), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for _, s in samples for t in s), dtype=np.int32, count=int(offsets[-1]))
        return Encoded(ids, labels, offsets)


def pack(lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Best-fit decreasing: each sample goes into the fullest row it still fits in.

    Rows come out nearly full (typically >95% on instruction data), and the packing is
    deterministic given the lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            room -= need
        else:
            rows.append([i])
            row, room = len(rows) - 1, max_length - need
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def padded_groups(lengths: np.ndarray, batch_size: int, seed: int) -> list[list[int]]:
    """Unpacked batches of similar length (less padding), in a seeded random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 64
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c : c + chunk], key=lambda i: -int(lengths[i]))
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(data: Encoded, rows: list[list[int]], pad_id: int, *, packed: bool):
    """Tensors for one micro-batch. `rows` lists, per batch row, the samples it holds."""
    import torch

    built = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            s_ids, s_labels = data.sample(i)
            ids.append(s_ids)
            labels.append(s_labels)
            positions.append(np.arange(len(s_ids), dtype=np.int64))
        built.append((np.concatenate(ids), np.concatenate(labels), np.concatenate(positions)))
    width = max(len(r[0]) for r in built)
    batch = len(built)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    targets = np.full((batch, width), IGNORE, dtype=np.int64)
    position_ids = np.zeros((batch, width), dtype=np.int64)
    attention = np.zeros((batch, width), dtype=np.int64)
    for b, (ids, labels, positions) in enumerate(built):
        n = len(ids)
        input_ids[b, :n] = ids
        position_ids[b, :n] = positions
        attention[b, :n] = 1
        # Shift: position t predicts label t+1, unless t+1 starts a new sample.
        nxt = labels[1:].astype(np.int64)
        nxt[positions[1:] == 0] = IGNORE
        targets[b, : n - 1] = nxt
        if packed and n < width:
            # Padding is its own "sample" (positions restart) so no real token attends to it.
            position_ids[b, n:] = np.arange(width - n)
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "position_ids": torch.from_numpy(position_ids),
    }
    if not packed:
        out["attention_mask"] = torch.from_numpy(attention)
    return out


def micro_batches(data: Encoded, *, max_length: int, batch_size: int, packed: bool, seed: int, epoch: int) -> list[list[list[int]]]:
    """The epoch's micro-batches, each a list of rows, each row a list of sample indices."""
    if not packed:
        return [[[i] for i in batch] for batch in padded_groups(data.lengths(), batch_size, seed * 1000 + epoch)]
    rows = pack(data.lengths(), max_length)
    random.Random(seed * 1000 + epoch).shuffle(rows)
    return [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]

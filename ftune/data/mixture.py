"""Weighted mixtures: each train source's share of every epoch's samples.

With `weight` on the train sources, an epoch is `data.epoch_samples` samples (default: all
the train samples there are), split between the sources by largest remainder on their
weights, so the realised shares equal the planned ones to within one sample. Each epoch
draws every source's quota afresh from a generator seeded by (seed, epoch, source): a
down-weighted source shows different samples each epoch, the draw is the same on every
process and after a resume. Without `data.replacement`, a quota must fit in its source;
with it, a source gives whole copies of its samples and then a draw of the rest, so each
sample repeats as evenly as possible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ftune.errors import FtuneError

if TYPE_CHECKING:
    from ftune.recipe import DataSection



def weights_of(section: DataSection) -> list[float] | None:
    """The train sources' weights, or None when the data is not a weighted mixture."""
    if not section.train or section.train[0].weight is None:
        return None
    return [source.weight for source in section.train]


def quotas(weights: list[float], total: int) -> list[int]:
    """`total` samples split by the weights (largest remainder, ties to the earlier source)."""
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    left = total - int(counts.sum())
    order = sorted(range(len(weights)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return [int(c) for c in counts]


def plan(section: DataSection, available: list[int], *, used: int | None = None) -> list[int] | None:
    """Each source's samples per epoch, or None without weights; an impossible mixture is an error now.

    `used`: at most how many of an epoch's samples the run's steps can take (training.max_steps).
    A larger epoch is cut to that many, split by the same weights: the rest would never be trained,
    and drawing it would hold every index in memory (2**30 of them are gigabytes)."""
    weights = weights_of(section)
    if weights is None:
        return None
    total = section.epoch_samples or sum(available)
    counts = quotas(weights, total)
    for i, (source, want, have) in enumerate(zip(section.train, counts, available)):
        if want and not have:
            raise FtuneError(f"data.train[{i}] ({source.path}) has weight {source.weight:g} but no usable training samples",
                             hint="fix or remove the source, or see the skipped rows above")
        if want > have and not section.replacement:
            raise FtuneError(
                f"data.train[{i}] ({source.path}): weight {source.weight:g} asks for {want:,} of each epoch's {total:,} samples, "
                f"but the source has {have:,}",
                hint="set data.replacement: true to repeat its samples, lower its weight, or set a smaller data.epoch_samples",
            )
    if used is not None and total > used:
        counts = quotas(weights, used)
    return counts


def draw(source_of: np.ndarray, counts: list[int], *, replacement: bool, seed: int, epoch: int) -> np.ndarray:
    """The sample indices of one epoch (sorted; the batching shuffles them)."""
    picked = []
    for s, want in enumerate(counts):
        pool = np.flatnonzero(source_of == s)
        rng = np.random.default_rng([seed, epoch, s])
        if replacement and want > len(pool):
            whole, rest = divmod(want, len(pool))
            picked += [np.tile(pool, whole), rng.permutation(pool)[:rest]]
        else:
            picked.append(rng.permutation(pool)[:want])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def shares(source_of: np.ndarray, chosen: np.ndarray, sources: int) -> list[float]:
    """Each source's share of an epoch's samples, as drawn."""
    counts = np.bincount(source_of[chosen], minlength=sources)
    return [float(c) / max(len(chosen), 1) for c in counts]

"""Epochs into micro-batches and optimizer steps: the one count that training and `ftune inspect` share.

A stage cuts each epoch into global micro-batches of `batch_size x processes` rows (or pairs);
every process takes its `batch_size` share of each full one, and `gradient_accumulation_steps`
micro-batches make one optimizer step. The training loop runs exactly the groups that
`optimizer_steps` returns, and `plan_steps` counts the same groups, so the two cannot disagree.
A recipe whose data cannot fill one optimizer step is refused here, before any model loads:
it would otherwise loop over empty epochs for ever.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sized
from dataclasses import dataclass

import numpy as np

from ftune.data import mixture
from ftune.data.packing import Encoded, micro_batches
from ftune.errors import RecipeError
from ftune.recipe import Recipe, TrainingSection
from ftune.recipe.model import MAX_EPOCH_SAMPLES

SMOKE_STEPS = 3  # what `--smoke` trains: enough to pass through a step, a checkpoint and an eval
SMOKE_EVAL = 4  # held-out items a smoke run evaluates on
MAX_TOTAL_STEPS = 10**9  # far past any real run (a step a millisecond: eleven days); more is a typo in epochs


@dataclass(frozen=True)
class StepPlan:
    micro_batches: int  # this process's micro-batches per epoch that make full optimizer steps
    steps_per_epoch: int
    total_steps: int


def sft_micro_batches(recipe: Recipe, train: Encoded, *, world: int, epoch: int) -> list[list[list[int]]]:
    """An SFT epoch's global micro-batches: rows (packed, or padded in length groups) of sample indices."""
    tc = recipe.training
    return micro_batches(train, max_length=recipe.data.max_length, batch_size=tc.batch_size * world,
                         packed=recipe.data.packing, seed=tc.seed, epoch=epoch, subset=epoch_samples(recipe, train, epoch))


def epoch_samples(recipe: Recipe, train: Encoded, epoch: int):
    """A weighted mixture's samples for this epoch (None: every sample once)."""
    counts = mixture.plan(recipe.data, mixture_available(recipe, train), used=samples_used(recipe, train))
    if counts is None:
        return None
    return mixture.draw(train.source, counts, replacement=recipe.data.replacement, seed=recipe.training.seed, epoch=epoch)


def samples_used(recipe: Recipe, train: Encoded) -> int | None:
    """At most how many samples a run with training.max_steps trains (None: no step limit), counted
    generously: every row of every step, on every process, packed as full as the shortest sample allows."""
    tc = recipe.training
    if tc.max_steps is None or not len(train):
        return None
    rows = tc.max_steps * tc.batch_size * tc.gradient_accumulation_steps * recipe.distributed.num_processes
    per_row = max(1, recipe.data.max_length // max(1, int(train.lengths().min()))) if recipe.data.packing else 1
    # Packed, beyond MAX_EPOCH_SAMPLES an epoch ends early instead (the next one draws afresh): memory stays bounded.
    return min(rows * per_row, max(rows, MAX_EPOCH_SAMPLES))


def mixture_available(recipe: Recipe, train: Encoded) -> list[int]:
    """Training samples per train source."""
    if train.source is None:
        return [len(train)] + [0] * (len(recipe.data.train) - 1)
    return [int(c) for c in np.bincount(train.source, minlength=len(recipe.data.train))]


def pair_micro_batches(recipe: Recipe, pairs: int, *, world: int, epoch: int) -> list[list[int]]:
    """A preference epoch's global micro-batches: pair (or KTO example) indices in a seeded order."""
    tc = recipe.training
    return shuffled_batches(pairs, tc.batch_size * world, tc.seed * 1000 + epoch)


def pair_set_micro_batches(recipe: Recipe, pairs: Sized, *, world: int, epoch: int) -> list[list[int]]:
    """The same, for a stage's training set of pairs (what `Stage.micro_batches` takes)."""
    return pair_micro_batches(recipe, len(pairs), world=world, epoch=epoch)


def shuffled_batches(n: int, size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[b: b + size] for b in range(0, n, size)]


def optimizer_steps(global_batches: list, training: TrainingSection, *, world: int, rank: int) -> list[list]:
    """This process's micro-batches of one epoch, grouped into optimizer steps.

    Alone, a process takes every micro-batch, a short last one included. With several, a global
    micro-batch too small to give every process a full share is dropped, so all of them run the
    same steps. Micro-batches left over after the last full group of `gradient_accumulation_steps`
    are dropped too (the next epoch reshuffles them back in).
    """
    share = training.batch_size
    if world > 1:
        mine = [mb[rank * share: (rank + 1) * share] for mb in global_batches if len(mb) >= world * share]
    else:
        mine = list(global_batches)
    accumulation = training.gradient_accumulation_steps
    return [mine[i: i + accumulation] for i in range(0, len(mine) - len(mine) % accumulation, accumulation)]


def plan_steps(recipe: Recipe, global_batches: list, *, items: int, unit: str, world: int, smoke: bool = False,
               source: str = "the recipe") -> StepPlan:
    """Steps per epoch and in all for epoch 0's micro-batches, or a recipe error naming what to change.

    `items` and `unit` word the error ("12 samples", "8 pairs"); `source` is the recipe file.
    """
    tc = recipe.training
    steps_per_epoch = len(optimizer_steps(global_batches, tc, world=world, rank=0))
    if steps_per_epoch == 0:
        raise RecipeError([_no_step(recipe, global_batches, items=items, unit=unit, world=world)], source)
    if smoke:
        total = SMOKE_STEPS
    elif tc.max_steps is not None:
        total = tc.max_steps
    elif math.isfinite(tc.epochs) and tc.epochs <= MAX_TOTAL_STEPS / steps_per_epoch:
        total = max(1, math.ceil(tc.epochs * steps_per_epoch))
    else:
        total = math.inf
    if total > MAX_TOTAL_STEPS:
        key = "training.max_steps" if tc.max_steps is not None else "training.epochs"
        raise RecipeError([f"{key}: {tc.max_steps or tc.epochs} makes more than {MAX_TOTAL_STEPS:,} optimizer steps "
                           f"({steps_per_epoch:,} per epoch), more than any run could finish; set the passes over the data you mean"],
                          source)
    return StepPlan(steps_per_epoch * tc.gradient_accumulation_steps, steps_per_epoch, int(total))


def plan_data(recipe: Recipe, data, micro_batches, *, unit: str, smoke_size: int | None, world: int,
              source: str) -> tuple:
    """(data, its step plan); with `smoke_size` (--smoke), the fewest training items from that many up
    that make a step, and SMOKE_EVAL held-out ones. `data` is a stage's `Data`, cut by its `head`;
    `micro_batches` the stage's (recipe, train, world=, epoch=) -> an epoch's global micro-batches."""

    def plan(train) -> StepPlan:
        return plan_steps(recipe, micro_batches(recipe, train, world=world, epoch=0), items=len(train),
                          unit=unit, world=world, smoke=smoke_size is not None, source=source)

    if smoke_size is None:
        return data, plan(data.train)
    size = smoke_size
    while True:
        fitted = data.head(size, SMOKE_EVAL)
        try:
            return fitted, plan(fitted.train)
        except RecipeError:
            if size >= len(data.train):
                raise
            size *= 2


def _no_step(recipe: Recipe, global_batches: list, *, items: int, unit: str, world: int) -> str:
    """Why this data cannot make one optimizer step, in the recipe's own numbers."""
    tc = recipe.training
    rows = "rows" if unit == "samples" else unit
    # Packed SFT micro-batches hold rows of several samples: count rows, not samples.
    made = sum(len(mb) for mb in global_batches)
    made_text = f"{items} {unit}" + (f" pack into {made} rows of data.max_length {recipe.data.max_length}, which" if made != items else "")
    if world > 1:
        size = tc.batch_size * world
        full = sum(len(mb) >= size for mb in global_batches)
        return (f"training.batch_size: {made_text} make {full} full micro-batch{'es' if full != 1 else ''} of {size} {rows} "
                f"(training.batch_size {tc.batch_size} x distributed.num_processes {world}), and one optimizer step needs "
                f"training.gradient_accumulation_steps ({tc.gradient_accumulation_steps}) of them; lower training.batch_size, "
                "training.gradient_accumulation_steps or distributed.num_processes, or add training data")
    count = len(global_batches)
    return (f"training.gradient_accumulation_steps: {made_text} make {count} micro-batch{'es' if count != 1 else ''} of "
            f"{tc.batch_size} {rows} (training.batch_size), fewer than gradient_accumulation_steps ({tc.gradient_accumulation_steps}), "
            f"so no optimizer step can be made; lower it to {count} or less, or lower training.batch_size, or add training data")


def row_widths(data: Encoded, rows: list[list[int]]) -> list[int]:
    """Tokens in each row of a micro-batch (a row holds one sample, or several packed)."""
    lengths = data.lengths()
    return [int(sum(lengths[i] for i in row)) for row in rows]


def count_steps(recipe: Recipe, train: Encoded, *, smoke: bool = False, world: int = 1,
                source: str = "the recipe") -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of an SFT run on `train`: what `ftune sft` will run."""
    plan = plan_steps(recipe, sft_micro_batches(recipe, train, world=world, epoch=0), items=len(train), unit="samples",
                      world=world, smoke=smoke, source=source)
    return plan.steps_per_epoch, plan.total_steps

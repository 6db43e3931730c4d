"""What the two stages that train on preference pairs (dpo.py, rm.py) share: their rows read, with
--smoke's cut, and a micro-batch of pairs split into passes.

A pair's two sequences (prompt + chosen, prompt + rejected) are packed together into one pass, so
a pass's size is the sum of both; a pass holds at most `training.tokens_per_pass` tokens, and at
least one pair.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ftune.data.pairs import PairSet
from ftune.data.pipeline import load_samples
from ftune.errors import FtuneError
from ftune.recipe import Recipe
from ftune.train import steps, training
from ftune.train.stage import Data, Pass

SMOKE_PAIRS = 8  # --smoke trains on this many pairs, or as many as one optimizer step needs

micro_batches = steps.pair_set_micro_batches  # an epoch's global micro-batches: pair indices in a seeded order


def read_pairs(recipe: Recipe, base_dir: Path, smoke: bool, *, allowed: set[str], encode: Callable) -> Data:
    """The recipe's preference rows (formats `allowed`), each split tokenized by `encode(rows, report)`."""
    tc = recipe.training
    train_rows, eval_rows, report, _ = load_samples(recipe.data, base_dir=base_dir, seed=tc.seed, allowed=allowed)
    if smoke:  # encode no more than a smoke run can use: the pairs of one optimizer step, twice over
        keep = 2 * max(SMOKE_PAIRS, tc.batch_size * tc.gradient_accumulation_steps * recipe.distributed.num_processes)
        train_rows.samples, train_rows.places = train_rows.samples[:keep], train_rows.places[:keep]
        eval_rows.samples, eval_rows.places = eval_rows.samples[:steps.SMOKE_EVAL], eval_rows.places[:steps.SMOKE_EVAL]
    train, held_out = encode(train_rows, report), encode(eval_rows, report)
    if len(train) == 0:
        raise FtuneError("no usable preference pairs", hint="check data.max_length and the rows reported above")
    return Data(train, held_out, report)


def passes(pairs: PairSet, micro_batch: list[int], budget: int | None) -> list[Pass]:
    """One micro-batch of pairs in passes of at most `budget` tokens (None: one pass); a pass counts its pairs."""
    lengths = pairs.sequences.lengths()
    sizes = [int(lengths[2 * p] + lengths[2 * p + 1]) for p in micro_batch]  # both sequences, packed together
    return [Pass(part, len(part)) for part in training.split_passes(micro_batch, sizes, budget, padded=False)]

"""The types a stage and the loop (loop.py) pass each other.

A stage calls `loop.fit(...)` with its data function and its `start`; once the loop has built the
model, `start(setup)` returns the stage's `Step`: how one optimizer step's micro-batches become
passes, a pass's `Loss`, and its evaluation; `Extras` holds what only some stages add. No base
class and no hooks: a stage file reads top to bottom, and so does the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ftune.data.rendering import Formatter
from ftune.recipe import Recipe
from ftune.train import distributed, steps


@dataclass(frozen=True)
class Inputs:
    model_path: str  # the base model's directory
    adapter_from: Path | None = None  # an adapter training continues (DPO's init_from), else a fresh one
    source: str = ""  # what training starts from, for the model line ("the SFT run runs/demo-sft")


@dataclass(frozen=True)
class Data:
    train: Any  # what the stage's micro_batches cut up: Encoded samples, a PairSet, a PromptSet
    eval: Any  # the held-out set its evaluation reads (len() 0 when there is none)
    report: Any  # the DataReport: sources and skipped rows, for the run card

    def head(self, n: int, m: int) -> Data:
        """The first n training and m held-out items (what --smoke trains and evaluates on)."""
        return Data(self.train.head(n), self.eval.head(m), self.report)


@dataclass(frozen=True)
class Pass:
    batch: Any  # what the stage's loss takes: one forward and backward
    count: int  # what its loss sums over (tokens, pairs): a step's loss is its sum over their total


@dataclass(frozen=True)
class Loss:
    sum: Any  # tensor: the loss summed over the pass's `count` units, with its graph
    # name -> (sum, weight) for figures logged beside the loss, e.g. a reward margin summed over
    # pairs: the step logs sum / weight over all passes and processes. Same names on every process.
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


class Checkpointed(Protocol):
    """Stage state kept in every checkpoint (a DPO run's reference log-probs so far, say)."""

    def state(self) -> dict: ...  # this process's tensors to save

    def restore(self, saved: dict) -> None: ...  # ... and to take back on resume


@dataclass(frozen=True)
class Kept:
    """A `Checkpointed` made of two functions."""

    state: Callable[[], dict]
    restore: Callable[[dict], None]


@dataclass(frozen=True)
class Extras:
    """What only some stages add to a run; each left out adds nothing."""

    kept: Checkpointed | None = None  # state saved in every checkpoint and restored on resume
    # figures of the step just taken that are not sums over passes (a spread, a share of groups),
    # already combined over processes: logged beside the loss. Called on every process.
    figures: Callable[[], dict] | None = None
    summary: Callable[[], dict] | None = None  # figures for the run card (called on every process)
    # (title, [(prompt, answer)]) for the run card instead of greedy answers to evaluation.prompts (main process)
    card: Callable[[], tuple[str, list[tuple[str, str]]]] | None = None


@dataclass(frozen=True)
class Step:
    """A stage's optimizer step, bound to its model and data (what its `start(setup)` returns)."""

    # this process's micro-batches of one optimizer step -> its passes, in order; whatever the step
    # needs first (reference log-probs scored, completions sampled) happens here, before any pass runs
    passes: Callable[[list], list[Pass]]
    loss: Callable[[Any], Loss]  # one pass's batch -> its loss
    evaluate: Callable[[], dict | None]  # held-out figures (eval_*); None if setup.stop() cut it short
    extras: Extras = Extras()


@dataclass(frozen=True)
class Setup:
    """What the loop built, handed to the stage's `start`."""

    recipe: Recipe
    data: Data
    tokenizer: Any
    formatter: Formatter
    model: Any  # the model being trained (peft-wrapped unless full fine-tuning)
    scorer: Any  # the stage's scorer(model) as accelerate prepared it: every forward goes through it
    ctx: distributed.Context
    plan: steps.StepPlan
    budget: int | None  # most tokens per forward/backward pass (training.pass_budget)
    stop: Callable[[], bool]  # True, on every process alike, once a stop was asked for: check it in long work
    resuming: bool
    base_dir: Path | None = None  # the recipe's folder: the recipe's relative paths start there

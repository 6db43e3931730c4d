"""What a training stage supplies to the loop (loop.py), as plain values and functions.

A stage is a `Stage`: its name, its data and how an epoch is cut into micro-batches, and a
`train(setup)` that, once the loop has built the model, returns the stage's `Training`: how a
micro-batch becomes passes, a pass's `Loss`, its evaluation, and any state it keeps. No base
class and no hooks beyond these: a stage file reads top to bottom, and so does the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune.train import distributed, steps
from ftune.data.rendering import Formatter
from ftune.recipe import Recipe


@dataclass(frozen=True)
class Inputs:
    model_path: str  # the base model's directory
    adapter_from: Path | None = None  # an adapter training continues (DPO's init_from), else a fresh one
    source: str = ""  # what training starts from, for the model line ("the SFT run runs/demo-sft")


@dataclass(frozen=True)
class Data:
    train: Any  # what the stage's micro_batches cut up: Encoded samples, a PairSet, ...
    eval: Any  # the held-out set its evaluation reads (len() 0 when there is none)
    report: Any  # the DataReport: sources and skipped rows, for the run card


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


def _nothing(*_args) -> None: ...


@dataclass(frozen=True)
class Training:
    """The stage's part of one run, bound to its model and data (what `Stage.train` returns)."""

    passes: Callable[[Any], list[Pass]]  # this process's share of one micro-batch -> its passes
    loss: Callable[[Any], Loss]  # one pass's batch -> its loss
    evaluate: Callable[[], dict | None]  # held-out figures (eval_*); None if setup.stop() cut it short
    before_step: Callable[[list], None] = _nothing  # a step's micro-batches, before its first pass
    state: Callable[[], dict] = dict  # this process's tensors to keep in every checkpoint
    restore: Callable[[dict], None] = _nothing  # ... and to take back on resume
    summary: Callable[[], dict] = dict  # figures for the run card (called on every process)
    # figures of the step just taken that are not sums over passes (a maximum, a share of groups),
    # already combined over processes: logged beside the loss. Called on every process.
    figures: Callable[[], dict] = dict
    # (title, [(prompt, answer)]) for the run card instead of greedy answers to evaluation.prompts (main process)
    card: Callable[[], tuple[str, list[tuple[str, str]]]] | None = None


@dataclass(frozen=True)
class Setup:
    """What the loop built, handed to `Stage.train`."""

    recipe: Recipe
    data: Data
    tokenizer: Any
    formatter: Formatter
    model: Any  # the model being trained (peft-wrapped unless full fine-tuning)
    scorer: Any  # stage.scorer(model) as accelerate prepared it: every forward goes through it
    ctx: distributed.Context
    plan: steps.StepPlan
    budget: int | None  # most tokens per forward/backward pass (training.pass_budget)
    stop: Callable[[], bool]  # True, on every process alike, once a stop was asked for: check it in long work
    resuming: bool
    base_dir: Path | None = None  # the recipe's folder: the recipe's relative paths start there


def _stage_name(recipe: Recipe) -> str:
    return recipe.stage


@dataclass(frozen=True)
class Stage:
    """What one training stage supplies; `run_stage` does the rest."""

    name: str  # the command and the recipe's `stage:`
    unit: str  # what training data counts ("samples", "pairs"), for step plans and their errors
    rate: str  # what a pass's count counts ("tokens", "pairs"): logged as RATE_per_s
    smoke_size: int  # --smoke trains on this many items, or as many as one optimizer step needs
    data: Callable[[Recipe, Any, Formatter, Path, bool], Data]  # (recipe, tokenizer, formatter, base_dir, smoke)
    show_data: Callable[[Data, Callable], None]  # print the data report with `say`
    head: Callable[[Data, int, int], Data]  # the first n training and m held-out items
    micro_batches: Callable[..., list]  # (recipe, train, world=, epoch=) -> the epoch's global micro-batches
    held_out: Callable[[Any], Iterable[tuple]]  # eval set -> (ids, labels) whose prompts go to eval_prompts.jsonl
    train: Callable[[Setup], Training]  # once the model is built: passes, loss, evaluation
    inputs: Callable[[Recipe, Path, bool], Inputs] | None = None  # (recipe, base_dir, smoke); None: the base, a fresh adapter
    describe: Callable[[Recipe], str] = _stage_name  # the model line's first words ("dpo (beta 0.1)")
    build_model: Callable | None = None  # (recipe, path, dtype, adapter_from=) -> model; None: training.build_model
    scorer: Callable | None = None  # model -> the module accelerate wraps; None: training.TokenLogProbs
    samples: Callable | None = None  # answers for the run card; None: outputs.generate_samples

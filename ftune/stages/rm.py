"""`ftune rm RECIPE`: a reward model from preference pairs, the whole story on one screen.

Model: the base with a one-output score head (transformers' sequence-classification model), an
adapter on the body and the head trained in full beside it (train/reward_training.py); `rm.init_from` starts
the adapter from an SFT run's, the head anew. Data: the pairs DPO reads, rendered and masked as
DPO renders them: prompt + chosen and prompt + rejected. A step: each micro-batch packs its
pairs' two sequences together (in passes of at most `training.tokens_per_pass` tokens), runs
the decoder once and reads each sequence's reward at its last token that is not a pad; a pair's
loss is -log sigmoid(r_chosen - r_rejected - margin), plus rm.center_coefficient x
(r_chosen + r_rejected)^2, and the step's loss is the mean over its pairs. Evaluation: the same
loss, pairwise accuracy, mean margin and the rewards' mean and spread on held-out pairs; the run
card shows the held-out pairs scored worst. train/loop.py's `fit` does the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.data.pairs import PairSet
from ftune.modeling import reward_model
from ftune.recipe import Recipe
from ftune.train import loop, pair_steps, reward_training
from ftune.train.stage import Data, Extras, Kept, Loss, Pass, Setup, Step


def load_data(recipe: Recipe, tokenizer, formatter, base_dir: Path, smoke: bool) -> Data:
    """Pairs: prompt + chosen and prompt + rejected, the prompt masked, with their margins (rm.use_margin)."""
    return pair_steps.read_pairs(recipe, base_dir, smoke, allowed={"preference"},
                                 encode=lambda rows, report: reward_training.encode(formatter, rows, recipe, report))


def show_data(data: Data, say) -> None:
    margins = data.train.margins
    rows = [("train / eval pairs", f"{len(data.train)} / {len(data.eval)}"),
            ("too long", f"{data.report.truncated} truncated, {data.report.dropped_too_long} dropped")]
    if margins is not None:
        rows.append(("margins (rm.use_margin)", f"mean {margins.mean():.3f}, from {margins.min():.3f} to {margins.max():.3f}"))
    loop.show_report("preference pairs", data.report, rows, say)


def start(setup: Setup) -> Step:
    recipe, rm, ctx = setup.recipe, setup.recipe.rm, setup.ctx
    train, held_out, pairs_per_batch = setup.data.train, setup.data.eval, recipe.training.batch_size
    read = dict(max_length=recipe.data.max_length, pad_id=setup.tokenizer.pad_token_id, read_pad_id=reward_model.read_pad_id(setup.model),
                device=ctx.device)
    spread = reward_training.StepSpread(ctx)
    worst: list[tuple[int, float, float]] = []  # the held-out pairs scored worst at the latest evaluation
    start_accuracy: dict[str, torch.Tensor] = {}  # held-out accuracy before the first step, for the run card

    def rewards(data: PairSet, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sequences of every pair in one packed pass: (r_chosen, r_rejected)."""
        scores = reward_model.sequence_rewards(setup.scorer, data.sequences, [i for p in pairs for i in (2 * p, 2 * p + 1)], **read)
        return scores[0::2], scores[1::2]

    def margins(data: PairSet, pairs: list[int]) -> torch.Tensor | None:
        return torch.from_numpy(data.margins[pairs]).to(ctx.device) if data.margins is not None else None

    def passes(micro_batches: list[list[int]]) -> list[Pass]:
        spread.start()  # the step's reward spread counts from here
        return [one for micro_batch in micro_batches for one in pair_steps.passes(train, micro_batch, setup.budget)]

    def loss(pairs: list[int]) -> Loss:
        chosen, rejected = rewards(train, pairs)
        spread.add(torch.cat([chosen, rejected]))
        losses = reward_training.pair_losses(chosen, rejected, margins(train, pairs), rm.center_coefficient)
        return Loss(losses.sum(), reward_training.pair_figures(chosen, rejected))

    @torch.no_grad()
    def evaluate() -> dict | None:
        """Held-out loss, pairwise accuracy, margin and reward spread (every process evaluates all of it)."""
        setup.scorer.eval()
        try:
            scored = reward_training.score_pairs(lambda pairs: rewards(held_out, pairs), len(held_out), pairs_per_batch, stop=setup.stop)
        finally:
            setup.scorer.train()
        if scored is None:
            return None
        chosen, rejected = scored
        worst[:] = reward_training.worst_pairs(chosen, rejected, rm.worst_pairs)
        every = list(range(len(held_out)))
        figures = reward_training.held_out_figures(chosen, rejected, margins(held_out, every), rm.center_coefficient)
        start_accuracy.setdefault("accuracy", torch.tensor([figures["eval_reward_accuracy"]]))
        return figures

    def summary() -> dict:
        return {"eval_reward_accuracy_at_start": float(start_accuracy["accuracy"])} if start_accuracy else {}

    return Step(passes, loss, evaluate, Extras(kept=Kept(lambda: dict(start_accuracy), start_accuracy.update), figures=spread.figures,
                                               summary=summary, card=lambda: reward_training.card(setup.tokenizer, held_out, worst)))


def describe(recipe: Recipe) -> str:
    rm = recipe.rm
    return ("rm (Bradley-Terry" + (f", centering {rm.center_coefficient:g}" if rm.center_coefficient else "")
            + (", per-pair margins" if rm.use_margin else "") + ")")


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    return loop.fit(recipe_path, overrides, smoke=smoke, resume=resume, overwrite=overwrite,
                    stage="rm", unit="pairs", rate="pairs", smoke_size=pair_steps.SMOKE_PAIRS, continues="rm.init_from",
                    score_head=True,
                    data=load_data, show=show_data, micro_batches=pair_steps.micro_batches, start=start, describe=describe,
                    eval_prompts=reward_training.whole_sequences)

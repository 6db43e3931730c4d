"""`ftune rm RECIPE`: a reward model from preference pairs, the whole story on one screen.

Model: the base with a one-output score head (transformers' sequence-classification model), an
adapter on the body and the head trained in full beside it (reward_model.py); `rm.init_from` starts
the adapter from an SFT run's, the head anew. Data: the pairs DPO reads, rendered and masked as
DPO renders them: prompt + chosen and prompt + rejected. A step: each micro-batch packs its
pairs' two sequences together (in passes of at most `training.tokens_per_pass` tokens), runs
the decoder once and reads each sequence's reward at its last token that is not a pad; a pair's
loss is -log sigmoid(r_chosen - r_rejected - margin), plus rm.center_coefficient x
(r_chosen + r_rejected)^2, and the step's loss is the mean over its pairs. Evaluation: the same
loss, pairwise accuracy, mean margin and the rewards' mean and spread on held-out pairs; the run
card shows the held-out pairs scored worst. stages/loop.py does the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.commands import scoring
from ftune.modeling import reward_model
from ftune.train import steps, training
from ftune.data.pipeline import load_samples
from ftune.errors import FtuneError
from ftune.train.preference import PairSet
from ftune.recipe import Recipe
from ftune.train import loop
from ftune.train.stage import Data, Loss, Pass, Setup, Stage, Training

SMOKE_PAIRS = 8


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    return loop.run_stage(STAGE, recipe_path, overrides, smoke=smoke, resume=resume, overwrite=overwrite)



def load_data(recipe: Recipe, tokenizer, formatter, base_dir: Path, smoke: bool) -> Data:
    """Pairs: prompt + chosen and prompt + rejected, the prompt masked, with their margins (rm.use_margin)."""
    train_rows, eval_rows, report, _ = load_samples(recipe.data, base_dir=base_dir, seed=recipe.training.seed, allowed={"preference"})
    if smoke:  # encode no more than a smoke run uses: the pairs of one optimizer step, twice over
        tc = recipe.training
        keep = 2 * max(SMOKE_PAIRS, tc.batch_size * tc.gradient_accumulation_steps * recipe.distributed.num_processes)
        train_rows.samples, train_rows.places = train_rows.samples[:keep], train_rows.places[:keep]
        eval_rows.samples, eval_rows.places = eval_rows.samples[:loop.SMOKE_EVAL], eval_rows.places[:loop.SMOKE_EVAL]
    train, held_out = (reward_model.encode(formatter, rows, recipe, report) for rows in (train_rows, eval_rows))
    if len(train) == 0:
        raise FtuneError("no usable preference pairs", hint="check data.max_length and the rows reported above")
    return Data(train, held_out, report)


def start(setup: Setup) -> Training:
    recipe, rm, ctx = setup.recipe, setup.recipe.rm, setup.ctx
    train, held_out, pairs_per_batch = setup.data.train, setup.data.eval, recipe.training.batch_size
    read = dict(max_length=recipe.data.max_length, pad_id=setup.tokenizer.pad_token_id, read_pad_id=reward_model.read_pad_id(setup.model),
                device=ctx.device)
    spread = reward_model.StepSpread(ctx)
    worst: list[tuple[int, float, float]] = []  # the held-out pairs scored worst at the latest evaluation
    start_accuracy: dict[str, torch.Tensor] = {}  # held-out accuracy before the first step, for the run card

    def rewards(data: PairSet, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sequences of every pair in one packed pass: (r_chosen, r_rejected)."""
        scores = reward_model.sequence_rewards(setup.scorer, data.sequences, [i for p in pairs for i in (2 * p, 2 * p + 1)], **read)
        return scores[0::2], scores[1::2]

    def margins(data: PairSet, pairs: list[int]) -> torch.Tensor | None:
        return torch.from_numpy(data.margins[pairs]).to(ctx.device) if data.margins is not None else None

    def passes(micro_batch: list[int]) -> list[Pass]:
        lengths = train.sequences.lengths()
        sizes = [int(lengths[2 * p] + lengths[2 * p + 1]) for p in micro_batch]  # both sequences, packed together
        return [Pass(part, len(part)) for part in training.split_passes(micro_batch, sizes, setup.budget, padded=False)]

    def loss(pairs: list[int]) -> Loss:
        chosen, rejected = rewards(train, pairs)
        spread.add(torch.cat([chosen, rejected]))
        losses = reward_model.pair_losses(chosen, rejected, margins(train, pairs), rm.center_coefficient)
        return Loss(losses.sum(), reward_model.pair_figures(chosen, rejected))

    @torch.no_grad()
    def evaluate() -> dict | None:
        """Held-out loss, pairwise accuracy, margin and reward spread (every process evaluates all of it)."""
        setup.scorer.eval()
        try:
            scored = reward_model.score_pairs(lambda pairs: rewards(held_out, pairs), len(held_out), pairs_per_batch, stop=setup.stop)
        finally:
            setup.scorer.train()
        if scored is None:
            return None
        chosen, rejected = scored
        worst[:] = reward_model.worst_pairs(chosen, rejected, rm.worst_pairs)
        every = list(range(len(held_out)))
        figures = reward_model.held_out_figures(chosen, rejected, margins(held_out, every), rm.center_coefficient)
        start_accuracy.setdefault("accuracy", torch.tensor([figures["eval_reward_accuracy"]]))
        return figures

    def summary() -> dict:
        return {"eval_reward_accuracy_at_start": float(start_accuracy["accuracy"])} if start_accuracy else {}

    return Training(passes=passes, loss=loss, evaluate=evaluate, before_step=spread.start, figures=spread.figures,
                    state=lambda: dict(start_accuracy), restore=start_accuracy.update, summary=summary,
                    card=lambda: scoring.card(setup.tokenizer, held_out, worst))


def show_data(data: Data, say) -> None:
    margins = data.train.margins
    rows = [("train / eval pairs", f"{len(data.train)} / {len(data.eval)}"),
            ("too long", f"{data.report.truncated} truncated, {data.report.dropped_too_long} dropped")]
    if margins is not None:
        rows.append(("margins (rm.use_margin)", f"mean {margins.mean():.3f}, from {margins.min():.3f} to {margins.max():.3f}"))
    loop.show_report("preference pairs", data.report, rows, say)


STAGE = Stage(
    name="rm", unit="pairs", rate="pairs", smoke_size=SMOKE_PAIRS,
    data=load_data, show_data=show_data, inputs=loop.continued_inputs("rm.init_from"),
    head=lambda data, n, m: Data(reward_model.first_pairs(data.train, n), reward_model.first_pairs(data.eval, m), data.report),
    micro_batches=lambda recipe, train, *, world, epoch: steps.pair_micro_batches(recipe, len(train), world=world, epoch=epoch),
    held_out=reward_model.whole_sequences,
    train=start,
    describe=lambda recipe: "rm (Bradley-Terry" + (f", centering {recipe.rm.center_coefficient:g}" if recipe.rm.center_coefficient else "")
    + (", per-pair margins" if recipe.rm.use_margin else "") + ")",
    build_model=reward_model.build_model,
    scorer=reward_model.SequenceRewards,
)

"""`ftune dpo RECIPE`: preference tuning (DPO, IPO, SimPO, CPO, ORPO, KTO), the whole story on one screen.

Start: the adapter of the SFT run `preference.init_from` names (in --smoke, that run's smoke
run when there is one), else a fresh adapter on the base. Data: prompt + chosen and prompt +
rejected, labelled on the final answer only. A step: each micro-batch packs its pairs' two
sequences together (in passes of at most `training.tokens_per_pass` tokens); a pair's loss is
its objective on the policy's and the reference's log-probs (train/preference.py), and the step's
loss is the mean over its pairs. The reference is the model as training started, scored
lazily, the first time the run reaches each pair (reference.py). Evaluation: the same loss,
reward accuracy and margins on held-out pairs. train/loop.py's `fit` does the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.data.pairs import PairSet, encode_pairs
from ftune.recipe import Recipe
from ftune.train import loop, pair_steps, steps
from ftune.train.preference import REFERENCE_FREE, preference_loss, reward_metrics, sequence_logps
from ftune.train.reference import ReferenceLogps, start_scope
from ftune.train.stage import Data, Extras, Loss, Pass, Setup, Step

FIGURES = {"pairs": ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"),
           "kto": ("reward_accuracy", "kl", "reward_desirable", "reward_undesirable")}


def load_data(recipe: Recipe, tokenizer, formatter, base_dir: Path, smoke: bool) -> Data:
    """Pairs (or KTO examples): prompt + chosen and prompt + rejected, labelled on the final answer only."""
    pref = recipe.preference
    encode = dict(method=pref.method, max_length=recipe.data.max_length, max_prompt_length=pref.max_prompt_length)
    return pair_steps.read_pairs(recipe, base_dir, smoke, allowed={"preference", "kto"},
                                 encode=lambda rows, report: encode_pairs(formatter, rows.samples, **encode, report=report))


def show_data(data: Data, say) -> None:
    unit = "examples" if data.train.kto_labels is not None else "pairs"
    loop.show_report("preference data", data.report, [(f"train / eval {unit}", f"{len(data.train)} / {len(data.eval)}"),
                                                      ("too long", f"{data.report.truncated} truncated, {data.report.dropped_too_long} dropped")], say)


def start(setup: Setup) -> Step:
    recipe, pref, ctx = setup.recipe, setup.recipe.preference, setup.ctx
    train, held_out, pairs_per_batch = setup.data.train, setup.data.eval, recipe.training.batch_size
    args = dict(max_length=recipe.data.max_length, pad_id=setup.tokenizer.pad_token_id, device=ctx.device)
    reference = None
    if pref.method not in REFERENCE_FREE:
        zero3 = ctx.accelerator.distributed_type.name == "DEEPSPEED" and recipe.distributed.zero_stage == 3
        scope = start_scope(setup.model, recipe, continued=bool(pref.init_from), zero3=zero3)
        reference = ReferenceLogps(setup.scorer, {"train": train, "eval": held_out}, recipe, scope=scope,
                                   pad_id=args["pad_id"], device=ctx.device)
        if reference.up_front and not setup.resuming:
            reference.ensure("train", pairs_to_train(setup), pairs_per_batch, stop=setup.stop)
            reference.ensure("eval", range(len(held_out)), pairs_per_batch, stop=setup.stop)
            reference.seal()

    def scored(name: str, data: PairSet, pairs: list[int]) -> tuple[torch.Tensor, dict]:
        if reference is not None:
            reference.ensure(name, pairs, pairs_per_batch)
        sequences = [i for p in pairs for i in (2 * p, 2 * p + 1)]
        logps, counts = sequence_logps(setup.scorer, data.sequences, sequences, **args)
        ref = reference.of(name, pairs).to(ctx.device) if reference is not None else None
        labels = torch.from_numpy(data.kto_labels[pairs]).to(ctx.device) if data.kto_labels is not None else None
        losses, rewards = preference_loss(pref, logps, counts, ref, labels)
        return losses, figures(rewards, len(pairs), pref.method)

    def passes(micro_batches: list[list[int]]) -> list[Pass]:
        """The step's pairs not scored by the reference yet are scored first, then each micro-batch split into passes."""
        if reference is not None:
            reference.ensure("train", [p for micro_batch in micro_batches for p in micro_batch], pairs_per_batch)
        budget = None if pref.method == "kto" else setup.budget  # KTO's KL baseline is a mean over its micro-batch
        return [one for micro_batch in micro_batches for one in pair_steps.passes(train, micro_batch, budget)]

    def loss(pairs: list[int]) -> Loss:
        losses, figures_ = scored("train", train, pairs)
        return Loss(losses.sum(), figures_)

    @torch.no_grad()
    def evaluate() -> dict | None:
        """Held-out loss, reward accuracy and margin (every process evaluates all of it)."""
        setup.scorer.eval()
        total, sums = 0.0, {}
        try:
            for pairs in steps.shuffled_batches(len(held_out), pairs_per_batch, seed=0):
                if setup.stop():
                    return None
                losses, part = scored("eval", held_out, pairs)
                total += float(losses.sum())
                sums = {k: (sums.get(k, (0.0, 0))[0] + t, sums.get(k, (0.0, 0))[1] + w) for k, (t, w) in part.items()}
        finally:
            setup.scorer.train()
        return {"eval_loss": total / len(held_out), **{f"eval_{k}": t / w for k, (t, w) in sums.items() if w}}

    if reference is None:
        return Step(passes, loss, evaluate)
    return Step(passes, loss, evaluate,
                Extras(kept=reference, summary=lambda: {"reference_pairs_scored": int(ctx.sum(reference.scored("train")))}))


def figures(rewards: dict, pairs: int, method: str) -> dict[str, tuple[float, int]]:
    """Reward figures of `pairs` pairs as (sum, weight), under the same names every time (processes
    sum them together); one absent from these pairs (KTO with no desirable example) weighs 0."""
    means = reward_metrics(rewards)
    return {k: (means[k] * pairs, pairs) if k in means else (0.0, 0) for k in FIGURES["kto" if method == "kto" else "pairs"]}


def pairs_to_train(setup: Setup) -> list[int]:
    """Every pair this process trains on in the whole run, in the order it first meets them."""
    recipe, ctx, seen, epoch, left = setup.recipe, setup.ctx, {}, 0, setup.plan.total_steps
    while left > 0 and len(seen) < len(setup.data.train):
        groups = steps.optimizer_steps(steps.pair_micro_batches(recipe, len(setup.data.train), world=ctx.world, epoch=epoch),
                                       recipe.training, world=ctx.world, rank=ctx.rank)[:left]
        seen.update((p, None) for group in groups for micro_batch in group for p in micro_batch)
        left, epoch = left - len(groups), epoch + 1
    return list(seen)


def describe(recipe: Recipe) -> str:
    return f"{recipe.preference.method} (beta {recipe.preference.beta})"


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    return loop.fit(recipe_path, overrides, smoke=smoke, resume=resume, overwrite=overwrite,
                    stage="dpo", unit="pairs", rate="pairs", smoke_size=pair_steps.SMOKE_PAIRS, continues="preference.init_from",
                    data=load_data, show=show_data, micro_batches=pair_steps.micro_batches, start=start, describe=describe,
                    eval_prompts=lambda held_out: (held_out.sequences.sample(2 * i) for i in range(len(held_out))))

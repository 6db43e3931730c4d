"""`ftune grpo RECIPE`: online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO), the whole story on one screen.

Start: the adapter of the SFT run `grpo.init_from` names (in --smoke, that run's smoke run when
there is one), else a fresh adapter on the base. Data: prompts, rendered with the chat template
and its generation prompt; each row's other columns go to the reward functions (data/prompts.py).
A step: its prompts (batch_size x accumulation x processes) are each sampled num_generations
times, one batched, KV-cached `generate` per micro-batch (rl/generation.py); every reward
scores every completion through one guarded call (rl/rewards.py); a completion's advantage is
its reward against its group's (rl/losses.py). Passes pack whole prompt + completion
sequences; the step's loss is the variant's mean over completions (tokens for dapo). With
grpo.iterations > 1 the same completions train that many steps, against the log-probs of their
first. Evaluation: the mean reward of greedy completions to the held-out prompts.
A step's batch of completions is a `Rollout` (rl/rollout.py: sampled, cut into passes, its loss);
what the run keeps from step to step, and in every checkpoint, is a `GrpoState` (rl/state.py).
train/loop.py does the rest: model, optimizer, resume, the steps, checkpoints, outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ftune.data.prompts import PromptSet, load_prompts
from ftune.data.rendering import IGNORE
from ftune.modeling import adapters
from ftune.recipe import Recipe
from ftune.stages.rl import rewards
from ftune.stages.rl.batches import CompletionScorer
from ftune.stages.rl.generation import Sampling, TransformersBackend
from ftune.stages.rl.rollout import (Rollout, RolloutStep, reference_logps, reward_batch, rollout_loss, rollout_passes,
                                     sample_rollout, step_on)
from ftune.stages.rl.state import GrpoState, record_rollout, run_card
from ftune.train import loop, outputs, steps
from ftune.train.reference import frozen_start
from ftune.train.stage import Data, Extras, Kept, Loss, Pass, Setup, Step

SMOKE_PROMPTS = 4


def load_data(recipe: Recipe, tokenizer, formatter, base_dir: Path, smoke: bool) -> Data:
    """Prompts, and (read, not run) the rewards that will score their completions."""
    train, held_out, report = load_prompts(recipe, formatter, base_dir=base_dir)
    rewards.check_rewards(recipe, base_dir, (train, held_out))
    return Data(train, held_out, report)


def micro_batches(recipe: Recipe, train: PromptSet, *, world: int, epoch: int) -> list[list[int]]:
    """An epoch's global micro-batches of prompt indices. With grpo.iterations > 1 each optimizer
    step's micro-batches come that many times in a row: the same completions train each time."""
    batches = steps.pair_micro_batches(recipe, len(train), world=world, epoch=epoch)
    repeat, per_step = recipe.grpo.iterations, recipe.training.gradient_accumulation_steps
    if repeat == 1:
        return batches
    if world > 1:  # a short micro-batch is dropped for every process alike: drop it before repeating
        batches = [b for b in batches if len(b) == recipe.training.batch_size * world]
    whole = len(batches) - len(batches) % per_step
    return [b for s in range(0, whole, per_step) for _ in range(repeat) for b in batches[s: s + per_step]]


def start(setup: Setup) -> Step:
    """Bind the run's sampling backend, rewards, reference and state to the loop's calls."""
    recipe, grpo, tokenizer = setup.recipe, setup.recipe.grpo, setup.tokenizer
    setup.ctx.accelerator.unwrap_model(setup.scorer).temperature = grpo.temperature  # log-probs of what was sampled
    scoring = rewards.load_rewards(recipe, setup.base_dir, reward_model=lambda spec, run_dir: _reward_model(spec, run_dir, setup))
    stops = outputs.generation_config(setup.model, tokenizer, setup.formatter).eos_token_id
    backend = TransformersBackend(setup.model, pad_id=tokenizer.pad_token_id, stop_ids=stops if isinstance(stops, list) else [stops],
                                  max_length=recipe.data.max_length)
    # The sampling RNG: its own generator, one per process, kept in every checkpoint.
    state = GrpoState.start(recipe.training.seed * 7919 + setup.ctx.rank)
    reference = None
    if grpo.beta > 0:  # the model as training started: its fresh adapter switched off, or its starting weights swapped in
        fresh = not grpo.init_from and adapters.starts_as_identity(recipe.adapter)
        reference = setup.model.disable_adapter if fresh else frozen_start(setup.model)
    run = GrpoTraining(setup, backend, scoring, reference, state)
    return Step(run.passes, run.loss, run.evaluate, Extras(kept=Kept(run.save, run.restore), figures=run.figures, card=run.card))


@dataclass
class GrpoTraining:
    """One run's GRPO as the loop calls it; each method hands over to a function of rl/rollout.py or rl/state.py."""

    setup: Setup
    backend: TransformersBackend
    scoring: list[rewards.Reward]
    reference: Callable | None  # a context that swaps the reference model in (beta > 0)
    state: GrpoState
    step: RolloutStep | None = None  # the optimizer step being taken

    def passes(self, micro_batches: list[list[int]]) -> list[Pass]:
        """One optimizer step's passes: over fresh completions, or, within grpo.iterations, the last ones again."""
        grpo, state = self.setup.recipe.grpo, self.state
        if state.used % grpo.iterations == 0:  # else: the next step on the same completions
            state.rollout = self.sample(micro_batches)
        self.step = step_on(state.rollout, micro_batches, group=grpo.num_generations, iteration=state.used % grpo.iterations,
                            ctx=self.setup.ctx)
        state.used += 1
        return [p for micro_batch in micro_batches for p in rollout_passes(self.step, micro_batch, self.setup.data.train, self.setup.budget)]

    def sample(self, micro_batches: list[list[int]]) -> Rollout:
        """Sample, score and weigh this process's completions for the step(s) ahead."""
        setup, grpo, train = self.setup, self.setup.recipe.grpo, self.setup.data.train
        made = sample_rollout(self.backend, setup.tokenizer, self.scoring, train, micro_batches, grpo=grpo, rng=self.state.rng,
                              sampling=Sampling(grpo.max_completion_length, grpo.temperature, grpo.top_p), ctx=setup.ctx)
        if self.reference is not None:
            made = replace(made, ref=reference_logps(setup.scorer, self.reference, made, train, budget=setup.budget,
                                                     device=setup.ctx.device))
        record_rollout(self.state, made, train.text(made.owner[0]), grpo=grpo, is_main=setup.ctx.is_main)
        return made

    def loss(self, completions: list[int]) -> Loss:
        return rollout_loss(self.step, completions, scorer=self.setup.scorer, prompts=self.setup.data.train,
                            grpo=self.setup.recipe.grpo, device=self.setup.ctx.device)

    def evaluate(self) -> dict | None:
        recipe, held_out = self.setup.recipe, self.setup.data.eval
        return mean_reward(self.backend, self.setup.tokenizer, self.scoring, held_out, stop=self.setup.stop,
                           count=min(len(held_out), recipe.evaluation.max_eval_samples or len(held_out)),
                           chunk=recipe.training.batch_size * recipe.grpo.num_generations,
                           max_new_tokens=recipe.grpo.max_completion_length)

    def save(self) -> dict:
        """The run's state; its rollout only while steps are still to train on it."""
        return self.state.to_checkpoint(with_rollout=self.state.used % self.setup.recipe.grpo.iterations != 0)

    def restore(self, saved: dict) -> None:
        self.state = GrpoState.from_checkpoint(saved, prompts=len(self.setup.data.train))

    def figures(self) -> dict:
        return dict(self.state.rollout.figures) if self.state.rollout is not None else {}

    def card(self) -> tuple[str, list[tuple[str, str]]]:
        return run_card(self.state, self.setup.recipe.grpo.temperature)


@torch.no_grad()
def mean_reward(backend, tokenizer, scoring: list[rewards.Reward], held_out: PromptSet, *, count: int, chunk: int,
                max_new_tokens: int, stop: Callable[[], bool]) -> dict | None:
    """Mean reward, overall and each reward's, of greedy completions to the first `count` held-out prompts,
    `chunk` prompts a call; None once `stop()` says so."""
    totals, per_all = [], {}
    for first in range(0, count, chunk):
        if stop():
            return None
        part = list(range(first, min(first + chunk, count)))
        made = backend.generate([held_out.ids[p] for p in part], 1, Sampling(max_new_tokens, greedy=True), seed=0)
        got, per = rewards.score(scoring, reward_batch(held_out, part, made, tokenizer), 1)
        totals += got
        for name, values in per.items():
            per_all.setdefault(name, []).extend(v for v in values if v is not None)
    return {"eval_reward": sum(totals) / max(len(totals), 1),
            **{f"eval_reward_{k}": sum(v) / len(v) for k, v in per_all.items() if v}}


def _reward_model(spec, run_dir: Path, setup: Setup):
    """A reward model trained by `ftune rm`: its score of the prompt and the completion, as a conversation."""
    from ftune.modeling import reward_model

    model = reward_model.load(run_dir, device=setup.ctx.device, trust_remote_code=setup.recipe.base_model.trust_remote_code)

    def call(batch: rewards.Batch) -> list[float]:
        conversations = [(*_as_messages(p), {"role": "assistant", "content": c}) for p, c in zip(batch.prompts, batch.completions)]
        return list(model.score(conversations))

    return call


def _as_messages(given) -> tuple[dict, ...]:
    return ({"role": "user", "content": given},) if isinstance(given, str) else tuple(given)


def show_data(data: Data, say) -> None:
    loop.show_report("prompts", data.report, [("train / eval prompts", f"{len(data.train)} / {len(data.eval)}"),
                                              ("too long", f"{data.report.truncated} cut, {data.report.dropped_too_long} dropped")], say)


def describe(recipe: Recipe) -> str:
    g, tc = recipe.grpo, recipe.training
    prompts = tc.batch_size * tc.gradient_accumulation_steps * recipe.distributed.num_processes
    # e.g. 4 prompts a step x 8 generations = 32 completions a step, of at most 128 tokens
    return (f"{g.loss} ({g.num_generations} generations a prompt: {prompts * g.num_generations} completions a step, of at "
            f"most {g.max_completion_length} tokens; temperature {g.temperature:g}" + (f", beta {g.beta:g}" if g.beta else "")
            + (f", {g.iterations} steps a batch" if g.iterations > 1 else "") + ")")


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    return loop.fit(recipe_path, overrides, smoke=smoke, resume=resume, overwrite=overwrite,
                    stage="grpo", unit="prompts", rate="completions", smoke_size=SMOKE_PROMPTS,
                    continues="grpo.init_from", scorer=CompletionScorer,
                    data=load_data, show=show_data, micro_batches=micro_batches, start=start, describe=describe,
                    eval_prompts=lambda held_out: ((np.array(ids), [IGNORE] * len(ids)) for ids in held_out.ids))

"""A rollout: one step's batch of completions for this process, sampled, scored and weighed once
(`sample_rollout`), then trained on for grpo.iterations optimizer steps: each step cuts it into
passes (`rollout_passes`) and takes each pass's policy loss (`rollout_loss`).

A rollout's completions are prompt-major (prompt p's num_generations completions in a row) and
named by their index in it. A pass packs whole prompt + completion sequences into one row
(batches.py), as many as the token budget holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ftune.data.prompts import PromptSet
from ftune.recipe import GrpoSection
from ftune.stages.rl import losses, rewards
from ftune.stages.rl.batches import packed_row
from ftune.stages.rl.generation import Completion, Sampling
from ftune.train import training
from ftune.train.stage import Loss, Pass


@dataclass(frozen=True)
class Rollout:
    owner: list[int]  # each completion's prompt: its index in the training PromptSet
    ids: list[list[int]]  # each completion's tokens
    texts: list[str]  # ... decoded, as the rewards read them
    rewards: list[float]  # each completion's weighted total
    per_reward: dict[str, list[float | None]]  # each reward's own values (None: it does not apply)
    advantages: torch.Tensor  # one per completion
    keep: torch.Tensor  # 1.0: trains; 0.0: left out (truncated with mask_truncated, a flat group with drop_zero_variance)
    figures: dict  # the step's reward and length figures over every process, logged beside the loss
    # the log-probs the batch's first step saw, filled by it (grpo.iterations > 1): later steps' importance ratios
    old: dict[int, torch.Tensor] = field(default_factory=dict)
    ref: dict[int, torch.Tensor] | None = None  # the reference model's log-probs (beta > 0)

    def tokens(self, c: int) -> int:
        return len(self.ids[c])


@dataclass(frozen=True)
class RolloutStep:
    """One optimizer step on a rollout: which completions each micro-batch trains, and what its loss needs."""

    rollout: Rollout
    slices: dict[tuple[int, ...], list[int]]  # a micro-batch's prompts -> its completions
    first: tuple[int, ...]  # the step's first micro-batch
    iteration: int  # 0: the batch's first step, whose policy is still the one that sampled
    token_scale: float  # dapo: the step's kept completions / its kept tokens, over every process


def sample_rollout(backend, tokenizer, scoring: list[rewards.Reward], prompts: PromptSet, micro_batches: list[list[int]], *,
                   grpo: GrpoSection, sampling: Sampling, rng: torch.Generator, ctx) -> Rollout:
    """Sample num_generations completions of each prompt (one seed a micro-batch, drawn from `rng`), score and weigh them."""
    group = grpo.num_generations
    owner = [p for micro_batch in micro_batches for p in micro_batch for _ in range(group)]
    made = [c for mb in micro_batches for c in backend.generate([prompts.ids[p] for p in mb], group, sampling,
                                                                seed=int(torch.randint(2**62, (1,), generator=rng)))]
    batch = reward_batch(prompts, owner, made, tokenizer)
    totals, per = rewards.score(scoring, batch, group)
    adv, flat = losses.advantages(torch.tensor(totals), group, grpo.scale_rewards)
    keep = torch.ones(len(made))
    if grpo.mask_truncated:
        keep *= torch.tensor([0.0 if c.truncated else 1.0 for c in made])
    if grpo.drop_zero_variance:
        keep *= (~flat).repeat_interleave(group).float()
    figures = step_figures(ctx, batch, totals, per, flat, [c.truncated for c in made], group)
    return Rollout(owner, [c.ids for c in made], batch.completions, totals, per, adv, keep, figures)


def reward_batch(prompts: PromptSet, owner: list[int], made: list[Completion], tokenizer) -> rewards.Batch:
    """Completions as the rewards read them, each beside its prompt's data row."""
    return rewards.Batch([prompts.given[p] for p in owner], [tokenizer.decode(c.ids, skip_special_tokens=True) for c in made],
                         _columns([prompts.columns[p] for p in owner]), [len(c.ids) for c in made], [prompts.places[p] for p in owner])


@torch.no_grad()
def reference_logps(scorer, reference, rollout: Rollout, prompts: PromptSet, *, budget: int | None, device) -> dict[int, torch.Tensor]:
    """Every completion's tokens' log-probs under the reference model (`reference()`: a context that swaps it in)."""
    out = {}
    scorer.eval()
    try:
        with reference():
            for part in split(rollout, prompts, list(range(len(rollout.ids))), budget):
                logps, _ = scorer(**packed(rollout, prompts, part, device))
                out.update(zip(part, logps.float().cpu().split([rollout.tokens(c) for c in part])))
    finally:
        scorer.train()
    return out


def step_on(rollout: Rollout, micro_batches: list[list[int]], *, group: int, iteration: int, ctx) -> RolloutStep:
    """The step's view of `rollout`, whose completions came from these micro-batches in this order."""
    slices, at = {}, 0
    for mb in micro_batches:
        slices[tuple(mb)] = list(range(at, at + len(mb) * group))
        at += len(mb) * group
    # dapo's mean is over the step's tokens: as a mean over its completions, each token weighs completions / tokens
    trained = [c for c in range(len(rollout.ids)) if rollout.keep[c] > 0]
    token_scale = ctx.sum(len(trained)) / max(ctx.sum(sum(rollout.tokens(c) for c in trained)), 1)
    return RolloutStep(rollout, slices, tuple(micro_batches[0]), iteration, token_scale)


def rollout_passes(step: RolloutStep, micro_batch: list[int], prompts: PromptSet, budget: int | None) -> list[Pass]:
    """A micro-batch's completions that train, in passes; each counts its kept completions."""
    rollout, mine = step.rollout, step.slices[tuple(micro_batch)]
    trained = [c for c in mine if rollout.keep[c] > 0] or mine[:1]  # a left-out micro-batch still runs backward (on 0)
    counts = [int(rollout.keep[c] > 0) for c in trained]
    if tuple(micro_batch) == step.first and not bool(rollout.keep.any()):
        counts[0] = 1  # nothing this step trains: its loss is 0 over 1, not 0 over 0
    out, at = [], 0
    for part in split(rollout, prompts, trained, budget):
        out.append(Pass(part, sum(counts[at: at + len(part)])))
        at += len(part)
    return out


def rollout_loss(step: RolloutStep, completions: list[int], *, scorer, prompts: PromptSet, grpo: GrpoSection, device) -> Loss:
    """The variant's policy loss of one pass's completions, with clip ratio, entropy and (beta > 0) KL beside it."""
    rollout = step.rollout
    logps, entropy = scorer(**packed(rollout, prompts, completions, device))
    lengths = [rollout.tokens(c) for c in completions]
    first = step.iteration == 0
    old = None if first else torch.cat([rollout.old[c] for c in completions])
    ref = torch.cat([rollout.ref[c] for c in completions]) if rollout.ref is not None else None
    result = losses.policy_loss(grpo.loss, logps, lengths, rollout.advantages[completions], rollout.keep[completions], old=old,
                                ref=ref, eps_low=grpo.epsilon_low, eps_high=grpo.epsilon_high, beta=grpo.beta,
                                max_length=grpo.max_completion_length, token_scale=step.token_scale)
    if first and grpo.iterations > 1:
        rollout.old.update(zip(completions, logps.detach().float().cpu().split(lengths)))
    figures = {"clip_ratio": (result.clipped, result.clip_units), "entropy": (float(entropy.sum()), float(entropy.numel()))}
    if grpo.beta > 0:
        figures["kl"] = (result.kl, result.tokens)
    return Loss(result.sum, figures)


def packed(rollout: Rollout, prompts: PromptSet, completions: list[int], device) -> dict:
    """The scorer's input: each completion after its prompt, in one row."""
    return packed_row([prompts.ids[rollout.owner[c]] for c in completions], [rollout.ids[c] for c in completions], device)


def split(rollout: Rollout, prompts: PromptSet, completions: list[int], budget: int | None) -> list[list[int]]:
    """Completions in passes of whole prompt + completion sequences, at most `budget` tokens each."""
    sizes = [len(prompts.ids[rollout.owner[c]]) + rollout.tokens(c) for c in completions]
    return training.split_passes(completions, sizes, budget, padded=False)


def step_figures(ctx, batch: rewards.Batch, totals: list[float], per: dict, flat: torch.Tensor, truncated: list[bool],
                 group: int) -> dict:
    """The step's reward and length figures over every process. A std is the mean of the groups' own
    (what the advantages see); a reward's figures skip the completions it gave None."""
    n, groups = ctx.sum(len(totals)), ctx.sum(len(flat))
    out = {"reward": ctx.sum(sum(totals)) / n, "reward_std": ctx.sum(_group_std(totals, group)[0]) / groups}
    for name, values in per.items():
        scored = [v for v in values if v is not None]
        stds, counted = _group_std(values, group)
        count, counted = ctx.sum(len(scored)), ctx.sum(counted)
        out[f"reward_{name}"] = ctx.sum(sum(scored)) / count if count else None
        out[f"reward_{name}_std"] = ctx.sum(stds) / counted if counted else None
    longest = max(batch.tokens)
    if ctx.world > 1:
        longest = int(ctx.accelerator.gather(torch.tensor([longest], device=ctx.device)).max())
    out.update(zero_variance_share=ctx.sum(float(flat.sum())) / groups, truncated_share=ctx.sum(sum(truncated)) / n,
               completion_length=ctx.sum(sum(batch.tokens)) / n, completion_length_max=longest)
    return out


def _group_std(values: list, group: int) -> tuple[float, int]:
    """(sum of each group's std, groups with two values or more), None values left out."""
    total, counted = 0.0, 0
    for start in range(0, len(values), group):
        scored = [v for v in values[start: start + group] if v is not None]
        if len(scored) > 1:
            total += float(torch.tensor(scored, dtype=torch.float64).std())
            counted += 1
    return total, counted


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows' columns as one list per column name (None where a row lacks it): the reward functions' keywords."""
    names = dict.fromkeys(k for r in rows for k in r)
    return {name: [r.get(name) for r in rows] for name in names}

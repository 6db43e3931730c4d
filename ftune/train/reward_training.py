"""Training a reward model (`ftune rm`): its model to train, its pairs, loss, figures and run card.

The model (modeling/reward_model.py) is the base with a one-output score head; here it is built
for training: memory savers, attention sample by sample, and an adapter, fresh or an SFT run's.

Loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected - margin) per pair, the margin 0 unless
rm.use_margin, plus rm.center_coefficient x (r_chosen + r_rejected)^2, which keeps rewards near
zero (Eisenstein et al. 2023; TRL's center_rewards_coefficient). `ftune eval` on a reward model
reports the same held-out figures (commands/scoring.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ftune.data.pairs import PairSet, encode_pairs
from ftune.data.rendering import IGNORE
from ftune.errors import FtuneError
from ftune.modeling import adapters, attention, models
from ftune.modeling.reward_model import TASK_TYPE, continue_adapter
from ftune.recipe import Recipe
from ftune.train import training

FIGURES = ("reward_accuracy", "reward_margin", "reward_mean")


def build_model(recipe: Recipe, model_path: str, dtype, *, adapter_from: Path | None = None):
    """The base with a one-output score head, and its adapter: a fresh one, or an SFT run's
    (`adapter_from`) continued with a new head; fully trainable with adapter.method none."""
    base = recipe.base_model
    model = models.load_model(model_path, dtype=dtype, quantization=recipe.quantization, trust_remote_code=base.trust_remote_code,
                              attn_implementation=base.attn_implementation, score_head=True)
    model.config.use_cache = False
    if base.attn_implementation == "auto":
        attention.enable(model, recipe.data.max_length)  # chosen and rejected are packed: attention sample by sample
    model = training.memory_savers(model, recipe)
    if recipe.adapter.method == "none":
        return model
    if adapter_from is not None:
        return continue_adapter(model, adapter_from)
    return adapters.attach(model, recipe.adapter, model_path, task_type=TASK_TYPE)


# --------------------------------------------------------------------------- data


def encode(formatter, loaded, recipe: Recipe, report) -> PairSet:
    """Pairs tokenized as DPO tokenizes them (prompt masked, each answer labelled), with each pair's
    margin when rm.use_margin; a row whose margin is not a number is a bad row (data.on_bad_row)."""
    samples = loaded.samples
    if recipe.rm.use_margin:
        samples = []
        for sample, place in zip(loaded.samples, loaded.places):
            try:
                samples.append(_with_margin(sample))
            except ValueError as exc:
                if recipe.data.on_bad_row == "error":
                    raise FtuneError(str(exc), place=place, hint="fix the row, or set data.on_bad_row: skip") from None
                report.skipped_count += 1
                if len(report.skipped) < 20:
                    report.skipped.append(f"{place}: {exc}")
    return encode_pairs(formatter, samples, method="dpo", max_length=recipe.data.max_length,
                        max_prompt_length=recipe.rm.max_prompt_length, report=report, with_margins=recipe.rm.use_margin)


def _with_margin(sample):
    value = sample.margin
    if value is None:
        raise ValueError("missing field 'margin' (rm.use_margin reads every pair's margin)")
    if isinstance(value, str):  # CSV has no numbers
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"field 'margin' must be a number, not {sample.margin!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field 'margin' must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or abs(value) > 1e6:
        raise ValueError(f"field 'margin' must be a finite number of reasonable size, not {value!r}")
    return replace(sample, margin=float(value))


def whole_sequences(pairs: PairSet):
    """Each held-out sequence with no label: eval_prompts.jsonl then holds the whole texts the
    merge's parity check scores (chosen and rejected alternate, so lines 2i and 2i+1 are a pair)."""
    for i in range(len(pairs.sequences)):
        ids, _ = pairs.sequences.sample(i)
        yield ids, np.full(len(ids), IGNORE)


# --------------------------------------------------------------------------- loss and figures


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor | None = None, center: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) + center x (r_chosen + r_rejected)^2."""
    difference = chosen - rejected - (margins if margins is not None else 0.0)
    losses = -F.logsigmoid(difference)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


def pair_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, tuple[float, float]]:
    """FIGURES as (sum, weight): the share of pairs whose chosen answer scores higher (a tie is
    wrong, as TRL counts it), the mean r_chosen - r_rejected, and the mean reward of all answers."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    n = float(len(chosen))
    return {"reward_accuracy": (float((chosen > rejected).sum()), n),
            "reward_margin": (float((chosen - rejected).sum()), n),
            "reward_mean": (float(chosen.sum() + rejected.sum()), 2 * n)}


class StepSpread:
    """The standard deviation of one optimizer step's rewards over every process, sqrt(E[r^2] - E[r]^2),
    from the sums each pass `add`s; `start` begins a step (in the stage's passes), `figures` ends it
    (Extras.figures: every process calls it, for the sums it exchanges)."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.start()

    def start(self) -> None:
        self.count = self.total = self.squares = 0.0

    def add(self, rewards: torch.Tensor) -> None:
        values = rewards.detach().double()
        self.count += len(values)
        self.total += float(values.sum())
        self.squares += float((values * values).sum())

    def figures(self) -> dict[str, float]:
        count, total, squares = (self.ctx.sum(v) for v in (self.count, self.total, self.squares))
        if not count:
            return {}
        mean = total / count
        return {"reward_std": math.sqrt(max(squares / count - mean * mean, 0.0))}


@torch.no_grad()
def score_pairs(rewards, count: int, batch_pairs: int, stop=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(chosen, rejected) rewards of pairs 0..count-1, `batch_pairs` at a time through
    `rewards(pairs) -> (chosen, rejected)`; None when `stop()` asked to stop part-way."""
    chosen, rejected = [], []
    for start in range(0, count, batch_pairs):
        if stop is not None and stop():
            return None
        c, r = rewards(list(range(start, min(start + batch_pairs, count))))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    empty = torch.zeros(0)
    return (torch.cat(chosen) if chosen else empty), (torch.cat(rejected) if rejected else empty)


def held_out_figures(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor | None, center: float,
                     prefix: str = "eval_") -> dict[str, float]:
    """The loss, pairwise accuracy, mean margin and reward mean and std over a whole set of pairs."""
    both = torch.cat([chosen, rejected])
    out = {"loss": float(pair_losses(chosen, rejected, margins, center).mean()),
           **{k: total / weight for k, (total, weight) in pair_figures(chosen, rejected).items()},
           "reward_std": float(both.std(unbiased=False)), "pairs": len(chosen)}
    return {prefix + k: v for k, v in out.items()}


def worst_pairs(chosen: torch.Tensor, rejected: torch.Tensor, n: int) -> list[tuple[int, float, float]]:
    """The `n` pairs with the lowest r_chosen - r_rejected: (pair, r_chosen, r_rejected), worst first."""
    order = torch.argsort(chosen - rejected)[:n].tolist()
    return [(i, float(chosen[i]), float(rejected[i])) for i in order]


# --------------------------------------------------------------------------- the run card


def card(tokenizer, pairs, worst: list[tuple[int, float, float]]) -> tuple[str, list[tuple[str, str]]]:
    """The run card's held-out pairs scored worst, as (title, [(prompt, how each answer scored)])."""
    items = []
    for pair, chosen, rejected in worst:
        prompt, chosen_text = _prompt_and_answer(tokenizer, pairs.sequences, 2 * pair)
        rejected_text = _prompt_and_answer(tokenizer, pairs.sequences, 2 * pair + 1)[1]
        items.append((prompt, f"margin {chosen - rejected:+.3f}: chosen {chosen:+.3f} «{chosen_text}»; "
                              f"rejected {rejected:+.3f} «{rejected_text}»"))
    return "Held-out pairs scored worst (lowest r_chosen - r_rejected: mislabelled, or not learned yet)", items


def _prompt_and_answer(tokenizer, data, index: int, limit: int = 240) -> tuple[str, str]:
    """A sequence's prompt (its end, nearest the answer) and answer (its start), each on one line."""
    ids, labels = data.sample(index)
    trained = np.flatnonzero(labels != IGNORE)
    first = int(trained[0]) if len(trained) else len(ids)
    prompt = " ".join(tokenizer.decode(ids[:first].tolist(), skip_special_tokens=True).split())
    answer = " ".join(tokenizer.decode(ids[trained].tolist(), skip_special_tokens=True).split())
    return (prompt if len(prompt) <= limit else "…" + prompt[-limit:]), (answer if len(answer) <= limit else answer[:limit] + "…")

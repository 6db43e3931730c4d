"""Preference data as token sequences, per-sequence log-probabilities, and the objectives.

Pairs are stored as one `Encoded` of 2n sequences: 2i is the chosen answer of pair i,
2i+1 the rejected one. KTO examples are stored the same way: 2i is the example itself,
2i+1 the same prompt with the next example's answer, which estimates the KL term.
Only each sequence's final answer (and its end-of-turn token) is labelled.

Objectives follow their papers (and TRL's implementations of them):
- dpo: -log σ(β·(Δchosen − Δrejected)) with optional label smoothing (cDPO), Δ = log π − log π_ref
- ipo: (Δchosen − Δrejected − 1/(2β))², on per-token mean log-probs
- simpo: -log σ(β·(mean log π(chosen) − mean log π(rejected)) − γ), no reference
- cpo: -log σ(β·(log π(chosen) − log π(rejected))) + NLL(chosen), no reference
- orpo: NLL(chosen) − λ·log σ(log odds(chosen) − log odds(rejected)), per-token means, no reference
- kto: desirable 1 − σ(β·(Δ − z)), undesirable 1 − σ(β·(z − Δ)), z = max(0, batch KL estimate)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ftune.data.rendering import IGNORE, Formatter
from ftune.data.formats import Chat, Preference
from ftune.data.packing import Encoded, collate, pack

REFERENCE_FREE = {"simpo", "cpo", "orpo"}


@dataclass(frozen=True)
class PairSet:
    sequences: Encoded
    kto_labels: np.ndarray | None = None  # bool per example, KTO only
    margins: np.ndarray | None = None  # float32 per pair, for a reward model trained with rm.use_margin

    def __len__(self) -> int:
        return len(self.sequences) // 2


def encode_pairs(formatter: Formatter, samples: list[Preference], *, method: str, max_length: int,
                 max_prompt_length: int | None, report, with_margins: bool = False) -> PairSet:
    """Tokenize pairs (or KTO examples); pairs whose answer does not fit are dropped and counted.
    `with_margins` keeps the kept pairs' `margin` (numbers already: the caller checked them)."""
    examples: list[tuple[tuple, tuple, tuple, bool | None]] = []  # prompt, first, second, label
    if method == "kto":
        singles = []
        for s in samples:
            if s.label is None:
                singles += [(s.prompt, s.chosen, True), (s.prompt, s.rejected, False)]
            else:
                singles.append((s.prompt, s.chosen, s.label))
        for i, (prompt, answer, label) in enumerate(singles):
            mismatched = singles[(i + 1) % len(singles)][1]
            examples.append((prompt, answer, mismatched, label))
    else:
        examples = [(s.prompt, s.chosen, s.rejected, None) for s in samples]
    kept: list[tuple[list[int], list[int]]] = []
    labels: list[bool] = []
    margins: list[float] = []
    for index, (prompt, first, second, label) in enumerate(examples):
        encoded = [_encode(formatter, prompt, answer, max_length, max_prompt_length, report) for answer in (first, second)]
        # A pair whose answers differ only past max_length trains on two identical sequences:
        # no preference is left in it, so it is dropped as too long.
        if any(e is None for e in encoded) or (method != "kto" and encoded[0] == encoded[1]):
            report.dropped_too_long += 1
            continue
        kept += encoded
        labels.append(bool(label))
        if with_margins:
            margins.append(samples[index].margin)
    return PairSet(Encoded.from_lists(kept), np.array(labels) if method == "kto" else None,
                   np.array(margins, dtype=np.float32) if with_margins else None)


def _encode(formatter: Formatter, prompt, answer, max_length: int, max_prompt_length: int | None, report):
    ids, labels = formatter.encode(Chat(formatter.with_system(tuple(prompt)) + tuple(answer)), last_turn_only=True)
    first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if first is None:
        return None
    if max_prompt_length is not None and first > max_prompt_length:
        cut = first - max_prompt_length  # keep the end of the prompt, nearest the answer
        ids, labels = ids[cut:], labels[cut:]
        report.truncated += 1
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        report.truncated += 1
        if not any(label != IGNORE for label in labels[1:]):
            return None
    return ids, labels


def sequence_logps(scorer, data: Encoded, indices: list[int], *, max_length: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, and their count.

    The sequences are packed into rows (each attends only to itself); `scorer` is a
    `TokenLogProbs` (possibly wrapped by DDP/FSDP).
    """
    batch, places = packed_rows(data, indices, max_length=max_length, pad_id=pad_id, device=device)
    segment = torch.full_like(batch["input_ids"], -1)
    lengths = data.lengths()
    for j, (r, at) in enumerate(places):
        segment[r, at: at + int(lengths[indices[j]])] = j
    token_logps = scorer(**batch)
    owner = segment[batch["targets"] != IGNORE]
    sums = torch.zeros(len(indices), device=device, dtype=token_logps.dtype).index_add(0, owner, token_logps)
    counts = torch.zeros(len(indices), device=device, dtype=token_logps.dtype).index_add(0, owner, torch.ones_like(token_logps))
    return sums, counts


def packed_rows(data: Encoded, indices: list[int], *, max_length: int, pad_id: int, device) -> tuple[dict, list[tuple[int, int]]]:
    """Sequences `indices` packed into rows of at most `max_length` tokens (each attends only to
    itself): the batch on `device`, and where each sequence starts, as (row, column), in `indices` order."""
    local_rows = pack(data.lengths()[indices], max_length)
    rows = [[indices[j] for j in row] for row in local_rows]
    batch = {k: v.to(device) for k, v in collate(data, rows, pad_id, packed=True).items()}
    places: list[tuple[int, int]] = [(0, 0)] * len(indices)
    lengths = data.lengths()
    for r, row in enumerate(local_rows):
        at = 0
        for j in row:
            places[j] = (r, at)
            at += int(lengths[indices[j]])
    return batch, places


def preference_loss(pref, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None,
                    kto_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and rewards. `logps`, `counts`, `ref` hold [first, second] per pair, interleaved."""
    first, second = logps[0::2], logps[1::2]
    n_first, n_second = counts[0::2], counts[1::2]
    beta, method = pref.beta, pref.method
    if method in ("dpo", "ipo", "kto"):
        ref_first, ref_second = ref[0::2], ref[1::2]
    if method == "dpo":
        delta_c, delta_r = first - ref_first, second - ref_second
        z = beta * (delta_c - delta_r)
        losses = -F.logsigmoid(z) * (1 - pref.label_smoothing) - F.logsigmoid(-z) * pref.label_smoothing
        return losses, {"chosen": beta * delta_c.detach(), "rejected": beta * delta_r.detach()}
    if method == "ipo":
        delta_c, delta_r = (first - ref_first) / n_first, (second - ref_second) / n_second
        losses = (delta_c - delta_r - 1 / (2 * beta)) ** 2
        return losses, {"chosen": beta * delta_c.detach(), "rejected": beta * delta_r.detach()}
    if method == "simpo":
        mean_c, mean_r = first / n_first, second / n_second
        losses = -F.logsigmoid(beta * (mean_c - mean_r) - pref.simpo_gamma)
        return losses, {"chosen": beta * mean_c.detach(), "rejected": beta * mean_r.detach()}
    if method == "cpo":
        losses = -F.logsigmoid(beta * (first - second)) - first / n_first
        return losses, {"chosen": beta * first.detach(), "rejected": beta * second.detach()}
    if method == "orpo":
        mean_c, mean_r = first / n_first, second / n_second
        # log odds = log p − log(1 − p), with p the per-token mean probability
        log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c).clamp(max=1 - 1e-6)) - torch.log1p(-torch.exp(mean_r).clamp(max=1 - 1e-6)))
        losses = -mean_c - pref.orpo_lambda * F.logsigmoid(log_odds)
        return losses, {"chosen": beta * mean_c.detach(), "rejected": beta * mean_r.detach()}
    if method == "kto":
        delta = first - ref_first
        kl = (second - ref_second).mean().clamp(min=0).detach()
        desirable = kto_labels.bool()
        losses = torch.where(
            desirable,
            pref.kto_desirable_weight * (1 - torch.sigmoid(beta * (delta - kl))),
            pref.kto_undesirable_weight * (1 - torch.sigmoid(beta * (kl - delta))),
        )
        rewards = beta * delta.detach()
        return losses, {"reward": rewards, "desirable": desirable, "kl": kl.expand_as(rewards)}
    raise ValueError(method)


def reward_metrics(rewards: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    if "reward" in rewards:  # KTO: examples, not pairs
        good, r = rewards["desirable"], rewards["reward"]
        accuracy = ((r > 0) == good).float().mean()
        out = {"reward_accuracy": accuracy, "kl": rewards["kl"].mean()}
        if good.any():
            out["reward_desirable"] = r[good].mean()
        if (~good).any():
            out["reward_undesirable"] = r[~good].mean()
    else:
        margin = rewards["chosen"] - rewards["rejected"]
        out = {"reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean(),
               "reward_chosen": rewards["chosen"].mean(), "reward_rejected": rewards["rejected"].mean()}
    return {prefix + k: float(v) for k, v in out.items()}

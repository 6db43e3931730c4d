"""Per-sequence log-probabilities of preference pairs (data/pairs.py), and the objectives.

Objectives follow their papers (and TRL's implementations of them):
- dpo: -log σ(β·(Δchosen − Δrejected)) with optional label smoothing (cDPO), Δ = log π − log π_ref
- ipo: (Δchosen − Δrejected − 1/(2β))², on per-token mean log-probs
- simpo: -log σ(β·(mean log π(chosen) − mean log π(rejected)) − γ), no reference
- cpo: -log σ(β·(log π(chosen) − log π(rejected))) + NLL(chosen), no reference
- orpo: NLL(chosen) − λ·log σ(log odds(chosen) − log odds(rejected)), per-token means, no reference
- kto: desirable 1 − σ(β·(Δ − z)), undesirable 1 − σ(β·(z − Δ)), z = max(0, batch KL estimate)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftune.data.packing import Encoded
from ftune.data.pairs import packed_rows
from ftune.data.rendering import IGNORE

REFERENCE_FREE = {"simpo", "cpo", "orpo"}


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

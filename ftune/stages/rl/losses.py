"""GRPO's advantages and policy losses (grpo, dr_grpo, dapo, gspo), on flat per-token log-probs.

For completion i of a group, with reward r_i, the advantage is A_i = r_i - mean(group), divided
by the group's std (scale "group"), the step's std ("batch") or nothing ("none"); a group whose
rewards are all equal has A = 0 exactly. Per token t of completion i, with the importance
ratio rho = exp(logp - logp_old) (1 when each batch of completions trains one step, where
logp_old is logp without its gradient):

    l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it,
    k3_it = exp(ref - logp) - (ref - logp) - 1          (the KL estimator, when beta > 0)

and the step's loss is the mean of each completion's contribution over the step's completions:

    grpo     (1/|o_i|) sum_t l_it
    dr_grpo  sum_t l_it / L_max                          (L_max = max_completion_length)
    dapo     sum_t l_it x (completions / tokens of the step): the mean over every token of the step
    gspo     -min(s_i A_i, clip(s_i) A_i) + beta (1/|o_i|) sum_t k3_it,  s_i = exp((1/|o_i|) sum_t (logp - logp_old))

so every variant counts completions, and dapo's mean over tokens is exact however the step's
completions fall into passes and processes. Completions left out (truncated with
mask_truncated, zero-variance groups dropped) count nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo")
STD_EPS = 1e-4  # keeps a group with a tiny spread from blowing its advantages up


def advantages(rewards: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage per completion, whether each group's rewards are all equal) for rewards in
    consecutive groups of `group`."""
    r = rewards.double().view(-1, group)
    flat = r.max(dim=1).values == r.min(dim=1).values
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        centered = centered / (r.std() + STD_EPS) if r.numel() > 1 else centered
    centered[flat] = 0.0  # exactly zero, not a rounding error's worth of signal
    return centered.view(-1).float(), flat


@dataclass(frozen=True)
class PolicyLoss:
    sum: torch.Tensor  # the completions' contributions summed (with its graph)
    clipped: float  # tokens (gspo: completions) whose clipped term was the smaller one, among the kept
    clip_units: float  # ... out of this many
    kl: float  # sum of k3 over the kept tokens (0 when beta is 0)
    tokens: float  # kept tokens


def policy_loss(variant: str, logps: torch.Tensor, lengths: list[int], adv: torch.Tensor, keep: torch.Tensor, *,
                old: torch.Tensor | None = None, ref: torch.Tensor | None = None, eps_low: float = 0.2,
                eps_high: float | None = None, beta: float = 0.0, max_length: int = 1, token_scale: float = 1.0) -> PolicyLoss:
    """The loss of completions whose tokens' log-probs are `logps` (flat, completion after completion,
    `lengths` long); `adv` and `keep` (1.0 or 0.0) per completion; `old` and `ref` like `logps`.
    `token_scale`: dapo only, the step's kept completions / its kept tokens (see the module's note)."""
    eps_high = eps_low if eps_high is None else eps_high
    device = logps.device
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    n = torch.tensor(lengths, device=device, dtype=logps.dtype)
    keep = keep.to(device=device, dtype=logps.dtype)
    adv = adv.to(device=device, dtype=logps.dtype)

    def per_completion(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(lengths), device=device, dtype=values.dtype).index_add(0, seq, values)

    log_ratio = logps - (logps.detach() if old is None else old.to(device))
    k3 = torch.zeros_like(logps)
    if beta > 0:
        delta = ref.to(device) - logps
        k3 = torch.exp(delta) - delta - 1
    kept_tokens = keep[seq]
    kl, tokens = float((k3.detach() * kept_tokens).sum()), float(kept_tokens.sum())
    if variant == "gspo":
        s = torch.exp(per_completion(log_ratio) / n)
        unclipped, clipped = s * adv, torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv
        contribution = -torch.minimum(unclipped, clipped) + beta * per_completion(k3) / n
        hit = (clipped < unclipped).float() * keep
        return PolicyLoss((contribution * keep).sum(), float(hit.sum()), float(keep.sum()), kl, tokens)
    ratio = torch.exp(log_ratio)
    unclipped, clipped = ratio * adv[seq], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[seq]
    per_token = -torch.minimum(unclipped, clipped) + beta * k3
    summed = per_completion(per_token)
    contribution = {"grpo": summed / n, "dr_grpo": summed / max_length, "dapo": summed * token_scale}[variant]
    hit = (clipped < unclipped).float() * kept_tokens
    return PolicyLoss((contribution * keep).sum(), float(hit.sum()), tokens, kl, tokens)

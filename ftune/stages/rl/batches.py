"""Completions as training input: packed rows and the scorer that reads their tokens' log-probs.

A forward pass packs whole sequences (prompt + completion, no padding) into one row, with
position ids restarting at each; ftune's packed attention (attention.py) keeps every sequence
to itself. Only completion tokens are targets, so the output head runs on them alone.
"""

from __future__ import annotations

import torch

from ftune.data.rendering import IGNORE
from ftune.train import training


def packed_row(prompts: list[list[int]], completions: list[list[int]], device) -> dict:
    """One row holding each prompt + completion; targets are the completion tokens, in order."""
    ids, positions, targets = [], [], []
    for prompt, completion in zip(prompts, completions):
        tokens = prompt + completion
        ids += tokens
        positions += range(len(tokens))
        # position j predicts token j + 1: the completion's tokens, from the prompt's last position on
        targets += [IGNORE] * (len(prompt) - 1) + completion + [IGNORE]
    as_row = lambda values: torch.tensor([values], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "targets": as_row(targets)}


class CompletionScorer(torch.nn.Module):
    """Log-probability (at the sampling temperature) and entropy of every target token.

    The module accelerate wraps for DDP/FSDP: every forward and backward goes through it.
    Entropy is a metric only and carries no gradient.
    """

    def __init__(self, model, temperature: float = 1.0):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, input_ids, position_ids, targets):
        decoder, head, softcap = training.causal_lm_parts(self.model)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        keep = targets != IGNORE
        logits = head(hidden[keep]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logps = torch.log_softmax(logits / self.temperature, dim=-1)
        with torch.no_grad():
            entropy = -(logps.exp() * logps).sum(-1)
        return logps.gather(-1, targets[keep][:, None]).squeeze(-1), entropy

"""Sampling completions: the one interface GRPO generates through, and its transformers backend.

A backend takes tokenized prompts and returns `n` completions of each, prompt-major (prompt
0's n completions, then prompt 1's), each cut after its first stop token. All n x prompts
sequences run as one batch through `generate` with its KV cache: the prompt is encoded once
per sequence and each new token costs one cached decoding step.

Sampling is seeded by the caller, one seed per call, drawn from the run's own sampling
generator (kept in every checkpoint), so a resumed run samples exactly what the
uninterrupted one did, and dropout or any other use of torch's global RNG cannot shift it.

A vLLM backend would sit behind the same `generate`; it is not here (no GPU to prove it on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftune.modeling import attention


@dataclass(frozen=True)
class Completion:
    ids: list[int]  # the completion's tokens, its stop token included when it has one
    truncated: bool  # it reached max_new_tokens without a stop token


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


class TransformersBackend:
    """`model.generate` on the model being trained (its adapter applied, no copy)."""

    def __init__(self, model, *, pad_id: int, stop_ids: list[int], max_length: int):
        self.model, self.pad_id, self.stop_ids, self.max_length = model, pad_id, list(stop_ids), max_length

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling, *, seed: int) -> list[Completion]:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.repeat_interleave(n, 0).to(device), mask.repeat_interleave(n, 0).to(device)
        # An explicit config: the model's own generation_config (top_k 50, repetition penalties...)
        # would change the distribution the loss assumes.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
            temperature=1.0 if sampling.greedy else sampling.temperature, top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0, min_p=0.0, repetition_penalty=1.0, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
        )
        was_training = self.model.training
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        packed = getattr(inner.config, "_attn_implementation", None) == attention.NAME
        attention.disable(self.model)  # a KV cache and padding: transformers' own attention
        self.model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            self.model.train(was_training)
            if packed:
                attention.enable(self.model, self.max_length)
        return [_cut(row, self.stop_ids) for row in out[:, width:].tolist()]


def _cut(row: list[int], stops: list[int]) -> Completion:
    """Up to and with the first stop token (generate pads the rows that stopped early); none: truncated."""
    for i, token in enumerate(row):
        if token in stops:
            return Completion(row[: i + 1], False)
    return Completion(row, True)

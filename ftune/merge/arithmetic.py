"""The numbers of a merge, one weight at a time, in float32: LoRA, rsLoRA, DoRA, VeRA, IA3, and QLoRA's 4-bit base.

Done here rather than by peft's `merge_and_unload`, which needs the whole model in memory;
tests check every formula against `merge_and_unload`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ftune.recipe import QuantizationSection

BNB_BLOCKSIZE = 64  # bitsandbytes' Params4bit default; transformers' BitsAndBytesConfig does not change it


@dataclass
class LoraWeight:
    """The adapter's change to one base weight: W + scale * B @ A, then DoRA's rescaling if any."""

    adapter_key: str  # e.g. base_model.model.model.layers.0.self_attn.q_proj, for messages
    embedding: bool
    fan_in_fan_out: bool
    scale: float = 0.0
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


def lora_rank_and_scale(config: dict, module: str) -> tuple[int, float]:
    """(r, scale) of one module: the adapter's r and lora_alpha, or their per-module patterns.

    LoRA scales B @ A by alpha / r; rsLoRA by alpha / sqrt(r), so that raising r does not
    shrink each update (r=64, alpha=16: 0.25 for LoRA, 2.0 for rsLoRA).
    """
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def round_through_4bit(weight: torch.Tensor, quantization: QuantizationSection, train_dtype: str) -> torch.Tensor:
    """The weight as QLoRA training saw it: quantized by bitsandbytes with the run's settings, then dequantized."""
    import bitsandbytes.functional as bnbf
    import torch

    packed, state = bnbf.quantize_4bit(
        weight.to(getattr(torch, train_dtype)).contiguous(),
        blocksize=BNB_BLOCKSIZE,
        compress_statistics=quantization.double_quant,
        quant_type=quantization.quant_type,
    )
    return bnbf.dequantize_4bit(packed, state)


def apply_lora(weight: torch.Tensor, lora: LoraWeight) -> torch.Tensor:
    """W + scale * B @ A in float32; with DoRA, each output's norm is then set to the learned magnitude.

    DoRA as peft defines it (tuners/lora/dora.py, variants.py): W' = m / ||W + dW|| * (W + dW),
    the norm taken per output feature: rows of a Linear weight (out, in), columns of an
    Embedding weight (vocab, dim). Done in place on one float32 copy, so a 152k x 3584
    embedding costs 2.2 GB once, not three times.
    """
    import torch

    merged = weight.to(torch.float32, copy=True)
    a, b = lora.a.float(), lora.b.float()  # Linear: B @ A is (out, in); Embedding: (dim, vocab)
    if lora.embedding or lora.fan_in_fan_out:
        merged.addmm_(a.T, b.T, alpha=lora.scale)
    else:
        merged.addmm_(b, a, alpha=lora.scale)
    if lora.magnitude is not None:
        per_column = lora.embedding or lora.fan_in_fan_out
        norm = torch.linalg.norm(merged, dim=0 if per_column else 1)
        factor = lora.magnitude.float() / norm
        merged.mul_(factor.view(1, -1) if per_column else factor.view(-1, 1))
    return merged


def add_lora_bias(bias: torch.Tensor, lora: LoraWeight) -> torch.Tensor:
    """peft's lora_bias: B has a bias, scaled like B @ A, that adds to the base layer's bias."""
    return bias.float() + lora.bias.float() * lora.scale


@dataclass
class Ia3Weight:
    """IA3's change to one base weight: a learned vector scaling the layer's output, or for a
    feed-forward layer its input, as peft stores it: (out, 1), or (1, in) when feed-forward."""

    adapter_key: str
    feedforward: bool
    fan_in_fan_out: bool
    vector: torch.Tensor


def apply_ia3(weight: torch.Tensor, ia3: Ia3Weight) -> torch.Tensor:
    """W' = W ⊙ l in float32, l broadcast over W's rows or columns, as peft's IA3 merge does.

    Why it folds: a Linear computes y = W x (+ b). Scaling its output, l ⊙ (W x + b) =
    (diag(l) W) x + l ⊙ b: each row of W, and the bias, times its entry of l. Scaling its
    input, W (l ⊙ x) = (W diag(l)) x: each column of W times its entry, the bias unchanged.
    A Linear weight is (out, in), so an (out, 1) vector scales rows and a (1, in) one columns;
    GPT-2's Conv1D stores (in, out), hence the transpose with fan_in_fan_out.
    """
    import torch

    vector = ia3.vector.float()
    return weight.to(torch.float32, copy=True).mul_(vector.T if ia3.fan_in_fan_out else vector)


def scale_ia3_bias(bias: torch.Tensor, ia3: Ia3Weight) -> torch.Tensor:
    """l ⊙ b for a layer whose output IA3 scales (a feed-forward layer's bias is not scaled)."""
    return bias.float() * ia3.vector.float().reshape(bias.shape)


def vera_as_lora(adapter_key: str, fan_in_fan_out: bool, lambda_b: torch.Tensor, lambda_d: torch.Tensor,
                 vera_a: torch.Tensor, vera_b: torch.Tensor, fan_in: int, fan_out: int) -> LoraWeight:
    """VeRA's update as a LoRA one: ΔW = diag(λ_b) B diag(λ_d) A = (λ_b ⊙ B)(λ_d ⊙ A), scale 1.

    A (r, max in) and B (max out, r) are shared by every adapted layer and sliced to this one's
    in and out features, as peft's VeRA layer does in its forward and its merge.
    """
    a = lambda_d.float().unsqueeze(-1) * vera_a[:, :fan_in].float()
    b = lambda_b.float().unsqueeze(-1) * vera_b[:fan_out, :].float()
    return LoraWeight(adapter_key, False, fan_in_fan_out, scale=1.0, a=a, b=b)

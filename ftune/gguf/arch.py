"""Per-architecture facts: which llama.cpp graph runs a Hugging Face model, and what it expects.

For each supported Hugging Face class this says: the GGUF architecture name, the metadata
keys llama.cpp reads for it, and the few places where llama.cpp wants weights laid out
differently from transformers:

- rope pairing: transformers rotates each head's dimension i together with i + d/2
  ("rotate_half"). llama.cpp's llama graph rotates neighbours (2i, 2i+1), so q_proj and
  k_proj rows are reordered per head to pair the same numbers. Qwen, Gemma and Phi-3 run
  with llama.cpp's NEOX rope, which already pairs like transformers.
- Gemma (1, 2, 3) keeps RMSNorm weights as (w - 1) and multiplies by (1 + w); llama.cpp
  multiplies by w, so 1 is added once here.
- Phi-3 keeps q, k, v in one matrix and gate, up in one: llama.cpp's phi3 graph reads both
  fused, so they pass through unchanged.

Tensor names come from gguf's own mapping (`gguf.get_tensor_name_map`), so a name that maps
to nothing is a tensor llama.cpp would not load: an error, never a silent drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftune.errors import FtuneError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGUFWriter


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    """The `architectures[0]` entry of config.json."""
    gguf_arch: str
    """llama.cpp's architecture name (general.architecture)."""
    interleave_rope: bool
    """Reorder q/k rows from transformers' half-split rope to llama.cpp's neighbour pairs."""
    norm_offset: float
    """Added to every RMSNorm weight (Gemma stores w - 1)."""
    activations: tuple[str, ...]
    """config.hidden_act values whose function llama.cpp's graph computes for this architecture."""
    rope_types: tuple[str, ...]
    """rope_parameters['rope_type'] values this export reproduces for this architecture."""


_SILU = ("silu", "swish")
ARCHITECTURES: dict[str, Architecture] = {
    a.hf_class: a
    for a in [
        Architecture("LlamaForCausalLM", "llama", True, 0.0, _SILU, ("default", "linear", "llama3")),
        Architecture("MistralForCausalLM", "llama", True, 0.0, _SILU, ("default", "linear")),
        Architecture("Qwen2ForCausalLM", "qwen2", False, 0.0, _SILU, ("default", "linear", "yarn")),
        Architecture("Qwen3ForCausalLM", "qwen3", False, 0.0, _SILU, ("default", "linear", "yarn")),
        Architecture("GemmaForCausalLM", "gemma", False, 1.0, ("gelu_pytorch_tanh", "gelu"), ("default",)),
        Architecture("Gemma2ForCausalLM", "gemma2", False, 1.0, ("gelu_pytorch_tanh",), ("default",)),
        Architecture("Gemma3ForCausalLM", "gemma3", False, 1.0, ("gelu_pytorch_tanh",), ("default",)),
        Architecture("Phi3ForCausalLM", "phi3", False, 0.0, _SILU, ("default", "longrope")),
    ]
}
# Tensors transformers keeps that are not weights (old checkpoints saved rope caches).
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias")


def architecture_for(config: Any, place: str) -> Architecture:
    """The Architecture of a transformers config, or an error naming the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            arch = ARCHITECTURES[name]
            check_config(arch, config, place)
            return arch
    found = ", ".join(names) or f"model_type '{getattr(config, 'model_type', '?')}'"
    raise FtuneError(
        f"cannot export {found} to GGUF: not a supported architecture",
        place=place,
        hint="supported: " + ", ".join(f"{a.hf_class} ({_family(a)})" for a in ARCHITECTURES.values()),
    )


def _family(arch: Architecture) -> str:
    return {"LlamaForCausalLM": "Llama, SmolLM", "MistralForCausalLM": "Mistral"}.get(arch.hf_class, arch.hf_class.removesuffix("ForCausalLM"))


def check_config(arch: Architecture, config: Any, place: str) -> None:
    """Refuse configs whose forward pass llama.cpp's graph for `arch` would not reproduce."""
    # Gemma 2 and 3 name their MLP activation hidden_activation (hidden_act is a leftover).
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in arch.activations:
        raise FtuneError(
            f"{arch.hf_class} with hidden_act '{act}': llama.cpp's {arch.gguf_arch} graph computes {arch.activations[0]}",
            place=place,
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in arch.rope_types:
        raise FtuneError(
            f"{arch.hf_class} with rope scaling '{rope_type}' is not supported for GGUF export",
            place=place,
            hint="supported rope types for this architecture: " + ", ".join(arch.rope_types),
        )
    if arch.gguf_arch in ("gemma2", "gemma3"):
        # llama.cpp scales attention by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B
        # layouts it recognises by layer count; transformers by 1/sqrt(query_pre_attn_scalar).
        big = config.num_hidden_layers == {"gemma2": 46, "gemma3": 62}[arch.gguf_arch]
        llama_cpp_scalar = config.hidden_size // config.num_attention_heads if big else head_dim(config)
        if getattr(config, "query_pre_attn_scalar", llama_cpp_scalar) != llama_cpp_scalar:
            raise FtuneError(
                f"query_pre_attn_scalar {config.query_pre_attn_scalar}: llama.cpp's {arch.gguf_arch} graph scales attention by {llama_cpp_scalar}",
                place=place,
            )


def rope_parameters(config: Any) -> dict:
    """transformers 5 normalises rope settings (rope_theta, rope_scaling) into one dict."""
    params = getattr(config, "rope_parameters", None) or {}
    # Models with per-layer-type rope (sliding vs full attention) nest it; none supported here does.
    return dict(params.get("full_attention", params))


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_dims(arch: Architecture, config: Any) -> int:
    """Rotated dimensions per head (Phi-3 may rotate only part of each head)."""
    partial = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim(config) * partial)


def sliding_window_note(arch: Architecture, config: Any) -> str | None:
    """A warning when transformers limits attention to a window that llama.cpp's graph ignores."""
    window = getattr(config, "sliding_window", None)
    uses_it = getattr(config, "use_sliding_window", True) is not False
    if window and uses_it and window < config.max_position_embeddings and arch.gguf_arch in ("llama", "phi3"):
        return (
            f"transformers attends within a sliding window of {window} tokens; llama.cpp's {arch.gguf_arch} "
            f"graph attends to the whole context, so outputs differ beyond {window} tokens"
        )
    return None


def write_hparams(writer: GGUFWriter, arch: Architecture, config: Any, n_vocab: int) -> None:
    """The `<arch>.*` metadata keys llama.cpp's loader reads for this architecture."""
    import gguf

    rope = rope_parameters(config)
    n_head = config.num_attention_heads
    writer.add_vocab_size(n_vocab)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(rope_dims(arch, config))

    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
        for key, add in (
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    elif rope_type == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(_longrope_attention_factor(config, rope))
    # llama3 rope scaling has no keys: it is a per-frequency factor tensor (extra_tensors).

    if arch.gguf_arch in ("gemma2", "gemma3"):
        # Local (sliding-window) layers may rotate with their own base; which layers are local
        # is written out per layer rather than left to llama.cpp's default pattern.
        writer.add_sliding_window(config.sliding_window)
        if getattr(config, "layer_types", None):
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        if local.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(local["rope_theta"])
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)

    if arch.gguf_arch == "phi3":
        original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        writer.add_rope_scaling_orig_ctx_len(original or config.max_position_embeddings)
        # llama.cpp reads 0 as "no sliding window" (and ignores Phi-3's window anyway, see sliding_window_note).
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def _longrope_attention_factor(config: Any, rope: dict) -> float:
    """transformers' longrope attention scaling: sqrt(1 + ln(s) / ln(original context)), s = extension ratio."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
    scale = config.max_position_embeddings / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def extra_tensors(arch: Architecture, config: Any) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that transformers computes at load time (rope scaling factors)."""
    import numpy as np

    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "llama3":
        return {"rope_freqs.weight": _llama3_rope_factors(rope, rope_dims(arch, config))}
    if rope_type == "longrope":
        long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
        half = rope_dims(arch, config) // 2
        if not long_factors or not short_factors or len(long_factors) != half or len(short_factors) != half:
            raise FtuneError(f"longrope needs long_factor and short_factor lists of {half} numbers in rope_scaling")
        return {
            "rope_factors_long.weight": np.asarray(long_factors, dtype=np.float32),
            "rope_factors_short.weight": np.asarray(short_factors, dtype=np.float32),
        }
    return {}


def _llama3_rope_factors(rope: dict, dims: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope stretch as the divisor llama.cpp applies per frequency.

    transformers divides each inverse frequency by `factor` for long wavelengths, leaves short
    ones alone, and blends in between; llama.cpp divides by the tensor written here.
    """
    import numpy as np

    base = rope.get("rope_theta", 10000.0)
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))
    return divisor.astype(np.float32)


def tensor_name_map(arch: Architecture, config: Any) -> Any:
    """gguf's transformers-to-llama.cpp name table for this architecture (slow to build: once per export)."""
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch)
    return gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)


def gguf_tensor_name(arch: Architecture, config: Any, name_map: Any, hf_name: str) -> str | None:
    """llama.cpp's name for a transformers tensor; None for tensors it does not use."""
    if hf_name.endswith(SKIPPED_SUFFIXES):
        return None
    if hf_name == "lm_head.weight" and _tied(config):
        return None  # llama.cpp reuses token_embd as the output projection
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise FtuneError(
            f"tensor '{hf_name}' has no place in llama.cpp's {arch.gguf_arch} model",
            hint="the checkpoint holds weights this architecture does not have (an unmerged adapter, or another model type)",
        )
    return mapped


def _tied(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def prepare_tensor(arch: Architecture, config: Any, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Lay a transformers tensor out the way llama.cpp's graph for `arch` reads it."""
    if arch.interleave_rope and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        tensor = _interleave_rope_rows(tensor, config.num_attention_heads, rope_dims(arch, config))
    elif arch.interleave_rope and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        tensor = _interleave_rope_rows(tensor, n_kv, rope_dims(arch, config))
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        tensor = tensor.float() + arch.norm_offset
    return tensor


def _interleave_rope_rows(weight: torch.Tensor, n_heads: int, dims: int) -> torch.Tensor:
    """Reorder each head's rows from (x0..x_{d/2-1}, y0..y_{d/2-1}) to (x0, y0, x1, y1, ...).

    transformers rotates row i with row i + d/2 of a head; llama.cpp rotates rows 2i and 2i+1.
    With this order both rotate the same pairs, so q·k and the output are unchanged.
    """
    rows = weight.shape[0]
    per_head = rows // n_heads
    if dims != per_head:
        raise FtuneError(f"partial rotary embeddings ({dims} of {per_head} dims) are not supported for this architecture")
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, per_head // 2, *rest).transpose(1, 2).reshape(rows, *rest)

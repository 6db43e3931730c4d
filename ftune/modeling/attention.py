"""Attention for packed rows: every packed sample attends to itself only, computed sample by sample.

transformers handles packed rows (position ids restarting at 0, no attention mask) by
building a block-diagonal mask and running SDPA over the whole row with it: the kernel
computes every block below the diagonal, including those between different samples that
the mask then throws away, and grouped-query models first copy their key and value heads
up to the query heads. Here each sample runs as its own causal SDPA call on the key/value
heads as they are: less arithmetic (a row of four 128-token samples does a quarter of the
work of one 512-token sequence), and neither the copies nor the mask are kept for backward.

Registered with transformers as `ftune_packed` (attention and mask), and used for training
only, on decoder families whose layers hand `position_ids` to their attention and use
plain causal attention (no sliding window shorter than the rows, no soft-capping); see
`supports`. Anything else (a padding mask, a KV cache, no position ids) runs transformers'
own SDPA path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "ftune_packed"
# Causal decoders whose layers pass position_ids on to the attention function (checked in
# their transformers modeling code) and whose attention is plain scaled dot product.
FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"}


def supports(config, max_length: int) -> bool:
    """Whether `config`'s model can train with packed attention on rows of `max_length` tokens."""
    if config.model_type not in FAMILIES or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_length:
        return False
    return not getattr(config, "attn_logit_softcapping", None)


def enable(model, max_length: int) -> bool:
    """Switch `model` (a transformers causal LM, possibly peft-wrapped) to packed attention if it supports it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports(inner.config, max_length):
        return False
    _register()
    inner.set_attn_implementation(NAME)
    return True


def disable(model) -> None:
    """Back to transformers' SDPA (for generation: nothing packed, and a KV cache)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) == NAME:
        inner.set_attn_implementation("sdpa")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_mask)


def packed_mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding (the attention finds the samples from the position ids);
    transformers' SDPA mask otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sample: a sample starts where its position is 0."""
    rows = []
    for positions in position_ids.tolist():
        starts = [i for i, p in enumerate(positions) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        rows.append(list(zip(starts, starts[1:] + [len(positions)])))
    return rows


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA per packed sample. query: (batch, heads, length, dim); key, value: (batch, kv heads, length, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    length = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != length or length == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    position_ids = position_ids.expand(query.shape[0], -1)
    groups = query.shape[1] // key.shape[1]
    rows = []
    for b, spans in enumerate(segments(position_ids)):
        parts = [
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1)
            for s, e in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None

"""Write the merged weights: each tensor computed from the base and the adapter, streamed into shards.

Each output shard's header is written first, from the plan, and its tensors are appended as
they are merged, so peak memory is about the largest tensor plus the adapter, never a shard
or the whole model (a 7B model in bf16 is 14 GB; its largest tensor, the embedding, is
0.25-1 GB).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.artifacts.ownership import write_json
from ftune.errors import FtuneError
from ftune.guards import textio
from ftune.guards.weights import FLOAT_KINDS, INDEX_FILE, ITEMSIZE, SINGLE_FILE
from ftune.merge.arithmetic import add_lora_bias, apply_ia3, apply_lora, round_through_4bit, scale_ia3_bias
from ftune.merge.plan import Plan

if TYPE_CHECKING:
    import torch

MAX_SHARD_BYTES = 4 * 2**30
SAFETENSORS_KIND = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_weights(plan: Plan, out: Path, dtype: str, max_shard_bytes: int, say: Callable[[str], None]) -> None:
    """Compute each output tensor from the base and the adapter and stream it into shards."""
    out_kind = SAFETENSORS_KIND[dtype]
    shards: list[list[tuple[str, str, str]]] = [[]]  # per shard: (output key, base key, safetensors dtype)
    sizes = [0]
    for out_key, base_key in plan.outputs:
        base = plan.tensors[base_key]
        kind = out_kind if base.dtype in FLOAT_KINDS else base.dtype
        if kind not in ITEMSIZE:
            raise FtuneError(f"base tensor {base_key} has dtype {kind}, which ftune merge does not write", place=str(base.file))
        nbytes = math.prod(plan.shapes[out_key]) * ITEMSIZE[kind]
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append((out_key, base_key, kind))
        sizes[-1] += nbytes

    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map = {}
    for name, shard, size in zip(names, shards, sizes):
        _write_safetensors(out / name, shard, plan, dtype)
        weight_map.update({out_key: name for out_key, _, _ in shard})
        say(f"  {name}: {len(shard)} tensors, {size / 2**20:.1f} MiB")
    if count > 1:
        write_json(out / INDEX_FILE, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})


def _write_safetensors(path: Path, entries: list[tuple[str, str, str]], plan: Plan, dtype: str) -> None:
    """One safetensors file, written tensor by tensor as each is merged.

    The header (names, dtypes, shapes, offsets) is known from the plan before any tensor is
    computed, so no shard is ever held whole in memory: the peak is one tensor, not one shard,
    where `safetensors.torch.save_file` would need the whole dict of tensors at once.
    """
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for out_key, _, kind in entries:
        nbytes = math.prod(plan.shapes[out_key]) * ITEMSIZE[kind]
        header[out_key] = {"dtype": kind, "shape": list(plan.shapes[out_key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = textio.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so tensor data starts aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for out_key, base_key, kind in entries:
            tensor = merged_tensor(plan, out_key, base_key)
            if tensor.is_floating_point():
                tensor = tensor.to(getattr(torch, dtype))
            # Raw little-endian bytes, as safetensors stores them, through a uint8 view (no copy).
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            start, end = header[out_key]["data_offsets"]
            if tuple(tensor.shape) != plan.shapes[out_key] or data.nbytes != end - start:
                raise RuntimeError(f"merged {out_key} is {tensor.dtype} {tuple(tensor.shape)}, planned {kind} {plan.shapes[out_key]}")
            handle.write(memoryview(data))
            del tensor, data


def merged_tensor(plan: Plan, out_key: str, base_key: str) -> torch.Tensor:
    """One output tensor: the base's (or the adapter's whole replacement), rounded if QLoRA, then the adapter's change."""
    from safetensors import safe_open

    if out_key in plan.replace:
        weight = plan.replace[out_key]
    else:
        # A tied head written apart starts from the base embedding, not from a trained copy of it:
        # during training it shared the original weight, not the modules_to_save copy. One tensor
        # at a time, the file closed after, so the mapped base never piles up in memory.
        with safe_open(plan.tensors[base_key].file, framework="pt") as handle:
            weight = handle.get_tensor(base_key)
    if out_key in plan.rounded and out_key not in plan.replace:
        weight = round_through_4bit(weight, plan.quantization, plan.train_dtype)
    if out_key in plan.lora:
        weight = apply_lora(weight, plan.lora[out_key])
    if out_key in plan.ia3:
        weight = apply_ia3(weight, plan.ia3[out_key])
    owner = plan.lora.get(out_key.removesuffix(".bias") + ".weight") if out_key.endswith(".bias") else None
    if owner is not None and owner.bias is not None:
        weight = add_lora_bias(weight, owner)
    scaled = plan.ia3.get(out_key.removesuffix(".bias") + ".weight") if out_key.endswith(".bias") else None
    if scaled is not None and not scaled.feedforward:  # IA3 scales the output, bias included
        weight = scale_ia3_bias(weight, scaled)
    return weight

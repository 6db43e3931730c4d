"""The merge plan: every output tensor, where its base comes from, and what the adapter changes in it
(LoRA, DoRA and VeRA as B @ A added to the weight, IA3 as a vector scaling it).

Made from the adapter's tensors and the base's safetensors headers, before any base weight
is read: each adapter tensor is checked against the base's shape, tied weights the adapter
changed on one side are written apart, and with QLoRA the weights bitsandbytes rounded to 4
bits during training are marked to be rounded the same way.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.errors import FtuneError
from ftune.guards.weights import TensorInfo, tensor_index
from ftune.merge.arithmetic import Ia3Weight, LoraWeight, lora_rank_and_scale, vera_as_lora
from ftune.merge.source import Source

if TYPE_CHECKING:
    import torch

    from ftune.recipe import QuantizationSection

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft key suffixes of LoRA factors; anything else an adapter file holds is a whole tensor
# (modules_to_save, or embedding layers peft saved because they were adapted).
LORA_PARTS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "a",
    ".lora_embedding_B": "b",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
IA3_PART = ".ia3_l"
VERA_PARTS = {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"}
VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")  # the random matrices every VeRA layer slices
PARTS = {"LORA": tuple(LORA_PARTS), "IA3": (IA3_PART,), "VERA": (*VERA_PARTS, *VERA_SHARED)}
TRUST_HINT = "if you trust its author, pass --trust-remote-code (a run directory's files never turn it on)"
RETRAINED_HINT = "the adapter was trained on a different model; pass the model it was trained on with --base"


@dataclass
class Plan:
    """What to write: every output tensor, where its base comes from and what changes it."""

    tensors: dict[str, TensorInfo]  # checkpoint key -> its file, dtype and shape in the base
    shapes: dict[str, tuple[int, ...]]  # every weight of the model, tied ones included
    outputs: list[tuple[str, str]]  # (output key, checkpoint key it starts from)
    lora: dict[str, LoraWeight]  # weight key -> adapter change
    replace: dict[str, torch.Tensor]  # weight key -> whole tensor from the adapter
    rounded: set[str]  # weight keys rounded through 4 bits first (QLoRA, --onto quantized)
    quantization: QuantizationSection | None  # the run's 4-bit settings, for rounding
    train_dtype: str  # the dtype training loaded the base in, before quantizing it
    untied: list[str] = field(default_factory=list)  # tied keys written apart, the adapter changed one side
    classifier: str | None = None  # a reward model's class (e.g. LlamaForSequenceClassification): config.json's architecture
    ia3: dict[str, Ia3Weight] = field(default_factory=dict)  # weight key -> IA3 scaling


def plan_merge(src: Source, *, rounded_base: bool) -> Plan:
    """Read the adapter and the base's safetensors headers; check that they fit, tensor by tensor."""
    tensors = tensor_index(Path(src.base_path))
    meta = _meta_model(src)
    head = {k: tuple(v.shape) for k, v in meta.state_dict().items() if k.startswith("score.")} if src.scores else {}
    if src.scores:  # a reward model: the base's decoder without its LM head, and the score head the adapter trained
        tensors = {k: v for k, v in tensors.items() if k in meta.state_dict()}
    tied = dict(meta.all_tied_weights_keys)  # e.g. {"lm_head.weight": "model.embed_tokens.weight"}
    missing = [k for k in meta.state_dict() if k not in tensors and k not in tied and k not in head]
    if missing:
        raise FtuneError(
            f"the base checkpoint has no tensor {missing[0]} ({len(missing)} of the model's tensors are missing)",
            place=src.base_path,
            hint="transformers renames or fuses this architecture's weights on load (e.g. mixture-of-experts "
            "models); ftune merge streams checkpoints as stored and does not support it",
        )
    shapes = {key: info.shape for key, info in tensors.items()}
    shapes.update({target: tensors[source].shape for target, source in tied.items() if source in tensors})
    shapes.update(head)

    lora, ia3, replace = read_adapter(src, shapes)
    if any(k not in replace for k in head):
        raise FtuneError("this reward model's adapter holds no trained score head (score.weight)", place=str(src.adapter_dir),
                         hint="an `ftune rm` adapter saves its head with it (modules_to_save); was it saved by another tool?")
    tensors.update({k: TensorInfo(src.adapter_dir / ADAPTER_WEIGHTS, "F32", shape) for k, shape in head.items()})
    touched = set(lora) | set(ia3) | set(replace)
    outputs = [(key, key) for key in tensors if key not in tied]
    untied = []
    for target, source in tied.items():
        # peft adapts each side of a tied pair on its own (an embedding's LoRA changes the
        # lookup, not the output head), so the merged model keeps them apart when either changed.
        if target in touched or source in touched:
            untied.append(target)
            outputs.append((target, source))
    return Plan(
        tensors=tensors,
        shapes=shapes,
        outputs=outputs,
        lora=lora,
        replace=replace,
        rounded=_bnb_quantized_weights(meta) if rounded_base else set(),
        quantization=src.quantization,
        train_dtype=src.train_dtype,
        untied=untied,
        ia3=ia3,
        classifier=type(meta).__name__ if src.scores else None,
    )


def read_adapter(src: Source, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, LoraWeight], dict[str, Ia3Weight], dict]:
    """The adapter's changes keyed by base weight name, each checked against the base's shape:
    (LoRA-like updates, IA3 scalings, whole replacement tensors)."""
    path = src.adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FtuneError(f"no {ADAPTER_WEIGHTS} in {src.adapter_dir}", hint="ftune does not read pickle-based adapter_model.bin")
    config = src.adapter_config
    tensors = _load_tensors(path)
    kind = config.get("peft_type")
    _check_parts(tensors, kind, path)
    if kind == "IA3":
        ia3, rest = _read_ia3(tensors, config, shapes, path)
        return {}, ia3, _replacements(rest, shapes, path)
    if kind == "VERA":
        vera, rest = _read_vera(tensors, config, shapes, path)
        return vera, {}, _replacements(rest, shapes, path)
    lora: dict[str, LoraWeight] = {}
    rest = {}
    for adapter_key, tensor in tensors.items():
        name = adapter_key.removeprefix("base_model.model.")
        suffix = next((s for s in LORA_PARTS if name.endswith(s)), None)
        if suffix is None:
            rest[adapter_key] = tensor
            continue
        module = name.removesuffix(suffix)
        entry = lora.setdefault(
            f"{module}.weight",
            LoraWeight(f"base_model.model.{module}", "embedding" in suffix, bool(config.get("fan_in_fan_out"))),
        )
        setattr(entry, LORA_PARTS[suffix], tensor)

    for key, entry in lora.items():
        _check_known(key, entry.adapter_key, shapes, path)
        if entry.a is None or entry.b is None:
            raise FtuneError(f"{entry.adapter_key} has only one of its two LoRA factors", place=str(path))
        module = key.removesuffix(".weight")
        r, entry.scale = lora_rank_and_scale(config, module)
        _check_lora_shapes(key, entry, shapes[key], r, path)
        if entry.bias is not None and f"{module}.bias" not in shapes:
            raise FtuneError(f"{entry.adapter_key} has a LoRA bias but the base layer {module} has none", place=str(path))
    return lora, {}, _replacements(rest, shapes, path)


def _replacements(tensors: dict, shapes: dict, path: Path) -> dict:
    """Whole tensors the adapter trained (modules_to_save), keyed by the base weight they replace."""
    replace = {}
    for adapter_key, tensor in tensors.items():
        key = adapter_key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        _check_known(key, adapter_key, shapes, path)
        if tuple(tensor.shape) != shapes[key]:
            raise FtuneError(
                f"adapter tensor {adapter_key} has shape {tuple(tensor.shape)}, but base weight {key} has shape {shapes[key]}",
                place=str(path),
                hint="the adapter was trained on a different model (or a resized vocabulary); pass the model it was trained on with --base",
            )
        replace[key] = tensor
    return replace


def _check_parts(tensors: dict, kind: str, path: Path) -> None:
    """Every adapter tensor belongs to the method adapter_config.json names (the files come from one adapter)."""
    for adapter_key in tensors:
        for other, suffixes in PARTS.items():
            if other != kind and adapter_key.endswith(suffixes):
                raise FtuneError(f"adapter_config.json says peft_type {kind}, but {adapter_key} is a {other} tensor",
                                 place=str(path), hint="the adapter's config and weights do not belong together")


def _fans(base_shape: tuple[int, ...], fan_in_fan_out: bool, adapter_key: str, place: Path) -> tuple[int, int]:
    """(in, out) features of a Linear weight (out, in), or of GPT-2's Conv1D (in, out)."""
    if len(base_shape) != 2:
        raise FtuneError(f"{adapter_key} adapts a {len(base_shape)}-d weight; ftune merges Linear layers only", place=str(place))
    return (base_shape[0], base_shape[1]) if fan_in_fan_out else (base_shape[1], base_shape[0])


def _read_ia3(tensors: dict, config: dict, shapes: dict, path: Path) -> tuple[dict[str, Ia3Weight], dict]:
    """IA3 vectors: (1, in) on the feed-forward modules, whose input they scale, (out, 1) elsewhere."""
    import re

    feedforward = config.get("feedforward_modules") or []
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    ia3: dict[str, Ia3Weight] = {}
    rest = {}
    for adapter_key, tensor in tensors.items():
        name = adapter_key.removeprefix("base_model.model.")
        if not name.endswith(IA3_PART):
            rest[adapter_key] = tensor
            continue
        module = name.removesuffix(IA3_PART)
        key = f"{module}.weight"
        _check_known(key, adapter_key, shapes, path)
        # peft's rule (IA3Model._check_target_module_feedforward): a regex matches the whole name, a list its end.
        is_ff = (bool(re.fullmatch(feedforward, module)) if isinstance(feedforward, str)
                 else any(module.endswith(t) for t in feedforward))
        fan_in, fan_out = _fans(shapes[key], fan_in_fan_out, adapter_key, path)
        expected = (1, fan_in) if is_ff else (fan_out, 1)
        if tuple(tensor.shape) != expected:
            raise FtuneError(
                f"{adapter_key} has shape {tuple(tensor.shape)}, which does not fit base weight {key} of shape {shapes[key]} "
                f"as a {'feed-forward' if is_ff else 'non-feed-forward'} layer (expected {expected})",
                place=str(path), hint=RETRAINED_HINT + " (or adapter_config.json's feedforward_modules was edited)",
            )
        ia3[key] = Ia3Weight(f"base_model.model.{module}", is_ff, fan_in_fan_out, tensor)
    return ia3, rest


def _read_vera(tensors: dict, config: dict, shapes: dict, path: Path) -> tuple[dict[str, LoraWeight], dict]:
    """VeRA's two vectors per layer and the shared matrices, as one LoRA-like update per weight."""
    vera_a, vera_b = (tensors.get(k) for k in VERA_SHARED)
    if vera_a is None or vera_b is None:
        raise FtuneError("the VeRA adapter was saved without its shared projection matrices (save_projection: false)",
                         place=str(path), hint="ftune merges VeRA adapters saved with save_projection=True, as ftune saves them")
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    parts: dict[str, dict] = {}
    rest = {}
    for adapter_key, tensor in tensors.items():
        name = adapter_key.removeprefix("base_model.model.")
        suffix = next((s for s in VERA_PARTS if name.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(name.removesuffix(suffix), {})[VERA_PARTS[suffix]] = tensor
        elif adapter_key not in VERA_SHARED:
            rest[adapter_key] = tensor
    r = vera_a.shape[0] if vera_a.ndim == 2 else -1
    lora: dict[str, LoraWeight] = {}
    for module, found in parts.items():
        key, adapter_key = f"{module}.weight", f"base_model.model.{module}"
        _check_known(key, adapter_key, shapes, path)
        if len(found) != 2:
            raise FtuneError(f"{adapter_key} has only one of its two VeRA vectors", place=str(path))
        fan_in, fan_out = _fans(shapes[key], fan_in_fan_out, adapter_key, path)
        expected = {"lambda_d": (r,), "lambda_b": (fan_out,)}
        wrong = [f"{n} {tuple(found[n].shape)} (expected {shape})" for n, shape in expected.items() if tuple(found[n].shape) != shape]
        if vera_a.ndim != 2 or vera_b.ndim != 2 or vera_a.shape[1] < fan_in or vera_b.shape[0] < fan_out or vera_b.shape[1] != r:
            wrong.append(f"shared matrices A {tuple(vera_a.shape)} and B {tuple(vera_b.shape)} (at least ({r}, {fan_in}) and ({fan_out}, {r}))")
        if wrong:
            raise FtuneError(f"{adapter_key}: {'; '.join(wrong)} do not fit base weight {key} of shape {shapes[key]}",
                             place=str(path), hint=RETRAINED_HINT)
        lora[key] = vera_as_lora(adapter_key, fan_in_fan_out, found["lambda_b"], found["lambda_d"], vera_a, vera_b, fan_in, fan_out)
    return lora, rest


def _load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise FtuneError(f"not a readable safetensors file ({exc})", place=str(path)) from None


def _check_lora_shapes(key: str, entry: LoraWeight, base_shape: tuple[int, ...], r: int, place: Path) -> None:
    """Base (out, in) for Linear, (vocab, dim) for Embedding; A is (r, in), B is (out, r)."""
    if len(base_shape) != 2:
        raise FtuneError(f"{entry.adapter_key} adapts a {len(base_shape)}-d weight; ftune merges Linear and Embedding layers only", place=str(place))
    if entry.embedding or entry.fan_in_fan_out:  # stored (in, out): (vocab, dim), or GPT-2's Conv1D
        fan_in, fan_out = base_shape
    else:
        fan_out, fan_in = base_shape
    expected = {"lora A": (r, fan_in), "lora B": (fan_out, r)}
    found = {"lora A": tuple(entry.a.shape), "lora B": tuple(entry.b.shape)}
    if entry.magnitude is not None:
        expected["DoRA magnitude"] = (fan_out,)
        found["DoRA magnitude"] = tuple(entry.magnitude.shape)
    for part, shape in expected.items():
        if found[part] != shape:
            raise FtuneError(
                f"{entry.adapter_key} {part} has shape {found[part]}, which does not fit base weight {key} "
                f"of shape {base_shape} (expected {shape})",
                place=str(place),
                hint=RETRAINED_HINT,
            )


def _check_known(key: str, adapter_key: str, shapes: dict, place: Path) -> None:
    if key not in shapes:
        close = difflib.get_close_matches(key, list(shapes), n=1)
        raise FtuneError(
            f"the adapter changes {adapter_key}, but the base model has no weight {key}"
            + (f" (closest: {close[0]})" if close else ""),
            place=str(place),
            hint=RETRAINED_HINT,
        )


def _meta_model(src: Source):
    """The base architecture with no weights (meta device): its tied weights and module types."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ftune.modeling.models import model_config

    config = model_config(src.base_path, trust_remote_code=src.trust_remote_code, trust_hint=TRUST_HINT)
    if src.scores:
        config.num_labels = 1  # a reward model: one score
    try:
        with torch.device("meta"):
            auto = AutoModelForSequenceClassification if src.scores else AutoModelForCausalLM
            return auto.from_config(config, trust_remote_code=src.trust_remote_code)
    except (ValueError, KeyError, ImportError, OSError) as exc:
        raise FtuneError(f"cannot build the model of {src.base_path}: {exc}") from None


def _bnb_quantized_weights(meta) -> set[str]:
    """The weights bitsandbytes turned into 4 bits when training loaded this base, by transformers' own rule.

    That is every linear layer but the output head, tied weights and the model's fp32 modules;
    rounding all of them (not only the adapted ones) reproduces the model the adapter was trained on.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(meta, None, meta._keep_in_fp32_modules)
    return {
        f"{name}.weight"
        for name, module in meta.named_modules()
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)
    }

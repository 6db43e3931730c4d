"""`ftune merge`: fold a LoRA or DoRA adapter into its base model, shard by shard, and prove it.

`merge_to_dir` reads top to bottom:
1. find the adapter and its base: a run directory records both (and whether the base was
   4-bit during training); a bare adapter names its base in adapter_config.json.
2. plan: read the adapter, check every tensor against the base's shapes, decide which tied
   weights must be written apart and which weights QLoRA training saw rounded to 4 bits.
3. write: read the base's safetensors one tensor at a time, merge it, and append it to an
   output shard whose header was written first, so peak memory is about the largest tensor
   plus the adapter, never a shard or the whole model (a 7B model in bf16 is 14 GB; its
   largest tensor, the embedding, is 0.25-1 GB).
4. verify: run the same prompts through the adapter loaded the way it was trained and
   through the merged directory loaded by plain transformers; compare logits and greedy
   continuations, write parity.json, and fail when they differ by more than the tolerance.

The arithmetic is done here, in float32, rather than by peft's `merge_and_unload`, because
that needs the whole model in memory; tests check it against `merge_and_unload`.
"""

from __future__ import annotations

import difflib
import gc
import io
import json
import math
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.errors import FtuneError
from ftune.runs import ADAPTER_DIR, CHECKPOINTS_DIR, RUN_FILE, atomic_dir, package_versions, read_run, write_json

if TYPE_CHECKING:
    import torch

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ONTO = ("quantized", "original")
MAX_SHARD_BYTES = 4 * 2**30
BNB_BLOCKSIZE = 64  # bitsandbytes' Params4bit default; transformers' BitsAndBytesConfig does not change it
PROMPTS_FILE = "eval_prompts.jsonl"
MAX_PROMPTS = 8
MAX_PROMPT_TOKENS = 128  # 8 prompts x 128 positions x a 150k vocabulary x 4 bytes = 0.6 GB of kept logits
GREEDY_TOKENS = 16
BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one sentence.",
    "Give me three tips for a job interview.",
]
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
# LoRA initialisations that rewrite the base weights during training: the saved adapter then
# only fits that rewritten base, unless peft converted it when saving.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SAFETENSORS_KIND = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_KINDS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class Tolerance:
    """How far the merged model may be from the adapter before the merge is called wrong."""

    max_logit_diff: float  # as a fraction of the reference's largest |logit| (at least 1)
    min_top1_agreement: float
    greedy_must_match: bool


# float32 differs only by summation order, (W + BA)x against Wx + B(Ax): SmolLM2-135M measures
# 9e-5 on logits of up to 38, about 2e-6 of the scale. In 16 bits every weight is rounded, so
# logits move by a few percent and near ties flip: casting SmolLM2-135M itself from float32 to
# bf16 moves logits by 1.6 (4% of 38) and changes 2.7% of top-1 tokens. The 16-bit limits sit
# above that noise; the float32 limit is what proves the arithmetic.
TOLERANCES = {
    "float32": Tolerance(max_logit_diff=1e-4, min_top1_agreement=1.0, greedy_must_match=True),
    "float16": Tolerance(max_logit_diff=0.05, min_top1_agreement=0.95, greedy_must_match=False),
    "bfloat16": Tolerance(max_logit_diff=0.10, min_top1_agreement=0.90, greedy_must_match=False),
}


class ParityError(FtuneError):
    """The merged model was written but does not behave like the adapter."""

    exit_code = 3


@dataclass(frozen=True)
class Source:
    """The adapter to merge, its base model, and how the adapter was trained."""

    adapter_dir: Path
    run_dir: Path | None
    base_path: str  # a local Hugging Face model directory
    trust_remote_code: bool
    train_dtype: str  # torch dtype name the adapter was trained in
    quantization: dict | None  # run.json's quantization section when the base was 4-bit in training
    adapter_config: dict
    base_config: dict  # the base's config.json
    prompts_file: Path | None


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


@dataclass
class Plan:
    """What to write: every output tensor, where its base comes from and what changes it."""

    files: dict[str, Path]  # checkpoint key -> safetensors file holding it
    kinds: dict[str, str]  # checkpoint key -> safetensors dtype (F32, BF16, ...)
    shapes: dict[str, tuple[int, ...]]
    outputs: list[tuple[str, str]]  # (output key, checkpoint key it starts from)
    lora: dict[str, LoraWeight]  # weight key -> adapter change
    replace: dict[str, torch.Tensor]  # weight key -> whole tensor from the adapter
    rounded: set[str]  # weight keys rounded through 4 bits first (QLoRA, --onto quantized)
    quantization: dict | None  # the run's 4-bit settings, for rounding
    train_dtype: str  # the dtype training loaded the base in, before quantizing it
    untied: list[str] = field(default_factory=list)  # tied keys written apart, the adapter changed one side


def is_run_or_adapter(path: Path) -> bool:
    """True for an ftune run directory or a PEFT adapter directory (what `merge_to_dir` accepts)."""
    path = Path(path)
    return (path / RUN_FILE).is_file() or (path / "adapter_config.json").is_file()


def merge_to_dir(
    source: Path,
    out: Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    onto: str = "quantized",
    verify: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Merge the adapter of `source` (a run or adapter directory) into its base and write a model to `out`.

    Returns the parity report ({} with verify=False). Raises FtuneError for inputs that do not
    fit, and ParityError (after writing) when the merged model does not behave like the adapter.
    """
    say = echo or (lambda _text: None)
    onto = _choice(onto, ONTO, "--onto")
    src = read_source(Path(source), base)
    out_dtype = DTYPES[_choice(dtype, DTYPES, "--dtype")] if dtype else _config_dtype(src.base_config)
    rounded_base = src.quantization is not None and onto == "quantized"

    plan = plan_merge(src, rounded_base=rounded_base)
    say(
        f"merging {src.adapter_dir} into {src.base_path}"
        + (" (base rounded through 4 bits, as in training)" if rounded_base else "")
        + f" as {out_dtype}: {len(plan.lora)} adapted weights, {len(plan.replace)} replaced"
    )
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        write_weights(plan, tmp, out_dtype, max_shard_bytes, say)
        _write_config(src.base_config, tmp, out_dtype, untie=bool(plan.untied))
        _copy_support_files(src, tmp)
        write_json(tmp / "merge.json", _provenance(src, plan, onto, out_dtype, rounded_base))
        report: dict = {}
        if verify:
            report = verify_parity(src, tmp, out_dtype, rounded_base=rounded_base, say=say)
            write_json(tmp / "parity.json", report)
    if report:
        say(render_report(report))
        if not report["passed"]:
            raise ParityError(
                "the merged model does not behave like the adapter (outside tolerance)",
                place=str(Path(out) / "parity.json"),
                hint="16 bits lose precision: compare with --dtype fp32"
                if report["precision"] != "float32"
                else "in float32 this points to a broken adapter or base file, or a bug in ftune; please report it with parity.json",
            )
    say(f"wrote {out}")
    return report


# --- 1. the adapter and its base -------------------------------------------------------------


def read_source(source: Path, base: str | None) -> Source:
    """Find the adapter directory and its base model from a run directory or a bare adapter."""
    from ftune.models import resolve_model_path

    if not source.is_dir():
        raise FtuneError(f"{source} does not exist or is not a directory")
    run_dir: Path | None = None
    if (source / RUN_FILE).is_file():
        run_dir = source
        adapter_dir = source / ADAPTER_DIR
    elif (source / "adapter_config.json").is_file():
        adapter_dir = source
        # A checkpoint inside a run: the run still knows the base and the quantization.
        if source.parent.name == CHECKPOINTS_DIR and (source.parent.parent / RUN_FILE).is_file():
            run_dir = source.parent.parent
    else:
        raise FtuneError(
            f"{source} is neither an ftune run directory (no {RUN_FILE}) nor a PEFT adapter directory (no adapter_config.json)",
            hint="pass a run directory written by `ftune sft` or `ftune dpo`, or a directory saved by peft's save_pretrained",
        )
    run = read_run(run_dir) if run_dir else None
    if run is not None and _run_value(run, "adapter", "method", run_dir) == "none":
        raise FtuneError(
            "nothing to merge: this run trained the whole model, not an adapter",
            place=str(run_dir),
            hint=f"{run_dir / 'model'} is already a standalone model directory",
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        status = run.get("status", "unknown") if run else "unknown"
        raise FtuneError(f"no adapter at {adapter_dir} (run status: {status})", hint="merge a finished run, or one of its checkpoints")
    adapter_config = _read_json(adapter_dir / "adapter_config.json")
    _check_adapter_config(adapter_config, adapter_dir / "adapter_config.json")

    trust_remote_code = False
    try:
        if base is not None:
            base_path = resolve_model_path(base)
        elif run is not None:
            recorded = _run_value(run, "base_model", "path", run_dir)
            trust_remote_code = bool(_run_value(run, "base_model", "trust_remote_code", run_dir))
            if recorded and (Path(recorded) / "config.json").is_file():
                base_path = str(recorded)
            else:  # the run moved to another machine: find the base again by name
                name = _run_value(run, "base_model", "name", run_dir)
                base_path = resolve_model_path(name, revision=_run_value(run, "base_model", "revision", run_dir))
        else:
            name = adapter_config.get("base_model_name_or_path")
            if not name:
                raise FtuneError("adapter_config.json does not name its base model (base_model_name_or_path)")
            base_path = resolve_model_path(name, revision=adapter_config.get("revision"))
    except FtuneError as exc:
        raise FtuneError(exc.message, place=f"base model of {source}", hint=exc.hint or "pass the base model with --base") from None

    config = _read_json(Path(base_path) / "config.json")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise FtuneError(
            f"the base model {base_path} is a pre-quantized ({method}) checkpoint; merging needs full-precision weights",
            hint="pass the original full-precision model with --base",
        )
    quantization = None
    if run is not None and run.get("quantization", {}).get("load_in_4bit"):
        quantization = run["quantization"]
    train_dtype = run.get("dtype") if run is not None else None
    if train_dtype in (None, "auto"):
        train_dtype = _config_dtype(config)
    prompts = run_dir / PROMPTS_FILE if run_dir is not None else None
    return Source(
        adapter_dir=adapter_dir,
        run_dir=run_dir,
        base_path=base_path,
        trust_remote_code=trust_remote_code,
        train_dtype=train_dtype,
        quantization=quantization,
        adapter_config=adapter_config,
        base_config=config,
        prompts_file=prompts if prompts is not None and prompts.is_file() else None,
    )


def _check_adapter_config(config: dict, place: Path) -> None:
    """Refuse adapters whose forward pass is not plain LoRA or DoRA: merging them here would be wrong."""
    import dataclasses

    from peft import LoraConfig

    if config.get("peft_type") != "LORA":
        raise FtuneError(f"ftune merges LoRA and DoRA adapters; this one is {config.get('peft_type')}", place=str(place))
    variants = [
        f.name
        for f in dataclasses.fields(LoraConfig)
        if f.metadata.get("is_lora_variant") and f.name != "use_dora" and config.get(f.name)
    ]
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise FtuneError(
            f"the adapter was initialised with {init}, which rewrites the base weights during training, "
            "and was saved without converting it back to a plain LoRA",
            place=str(place),
            hint="save it with peft's path_initial_model_for_weight_conversion, which makes it fit the original base",
        )
    for name in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if config.get(name):
            variants.append(name)
    if variants:
        raise FtuneError(f"ftune merge does not support adapters with {', '.join(variants)}", place=str(place))


# --- 2. the plan -----------------------------------------------------------------------------


def plan_merge(src: Source, *, rounded_base: bool) -> Plan:
    """Read the adapter and the base's safetensors headers; check that they fit, tensor by tensor."""
    files, kinds, shapes = _checkpoint_index(Path(src.base_path))
    meta = _meta_model(src)
    tied = dict(meta.all_tied_weights_keys)  # e.g. {"lm_head.weight": "model.embed_tokens.weight"}
    missing = [k for k in meta.state_dict() if k not in shapes and k not in tied]
    if missing:
        raise FtuneError(
            f"the base checkpoint has no tensor {missing[0]} ({len(missing)} of the model's tensors are missing)",
            place=src.base_path,
            hint="transformers renames or fuses this architecture's weights on load (e.g. mixture-of-experts "
            "models); ftune merge streams checkpoints as stored and does not support it",
        )
    model_shapes = dict(shapes)
    model_shapes.update({target: shapes[source] for target, source in tied.items() if source in shapes})

    lora, replace = read_adapter(src, model_shapes)
    touched = set(lora) | set(replace)
    outputs = [(key, key) for key in files if key not in tied]
    untied = []
    for target, source in tied.items():
        # peft adapts each side of a tied pair on its own (an embedding's LoRA changes the
        # lookup, not the output head), so the merged model keeps them apart when either changed.
        if target in touched or source in touched:
            untied.append(target)
            outputs.append((target, source))
    rounded = _bnb_quantized_weights(meta) if rounded_base else set()
    return Plan(
        files=files,
        kinds=kinds,
        shapes=model_shapes,
        outputs=outputs,
        lora=lora,
        replace=replace,
        rounded=rounded,
        quantization=src.quantization,
        train_dtype=src.train_dtype,
        untied=untied,
    )


def read_adapter(src: Source, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, LoraWeight], dict]:
    """The adapter's changes keyed by base weight name, each checked against the base's shape."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    path = src.adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise FtuneError(f"no adapter_model.safetensors in {src.adapter_dir}", hint="ftune does not read pickle-based adapter_model.bin")
    config = src.adapter_config
    tensors = load_file(path)
    lora: dict[str, LoraWeight] = {}
    replace = {}
    for adapter_key, tensor in tensors.items():
        name = adapter_key.removeprefix("base_model.model.")
        suffix = next((s for s in LORA_PARTS if name.endswith(s)), None)
        if suffix is None:
            key = name.replace(".base_layer.", ".")
            _check_known(key, adapter_key, shapes, path)
            if tuple(tensor.shape) != shapes[key]:
                raise _shape_error(adapter_key, tensor.shape, key, shapes[key], path)
            replace[key] = tensor
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
        r = config.get("rank_pattern", {}).get(get_pattern_key(list(config.get("rank_pattern", {})), module), config["r"])
        alpha = config.get("alpha_pattern", {}).get(get_pattern_key(list(config.get("alpha_pattern", {})), module), config["lora_alpha"])
        entry.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        _check_lora_shapes(key, entry, shapes[key], r, path)
        if entry.bias is not None and f"{module}.bias" not in shapes:
            raise FtuneError(f"{entry.adapter_key} has a LoRA bias but the base layer {module} has none", place=str(path))
    return lora, replace


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
                hint="the adapter was trained on a different model; pass the model it was trained on with --base",
            )


def _check_known(key: str, adapter_key: str, shapes: dict, place: Path) -> None:
    if key not in shapes:
        close = difflib.get_close_matches(key, list(shapes), n=1)
        raise FtuneError(
            f"the adapter changes {adapter_key}, but the base model has no weight {key}"
            + (f" (closest: {close[0]})" if close else ""),
            place=str(place),
            hint="the adapter was trained on a different model; pass the model it was trained on with --base",
        )


def _shape_error(adapter_key: str, shape, key: str, base_shape, place: Path) -> FtuneError:
    return FtuneError(
        f"adapter tensor {adapter_key} has shape {tuple(shape)}, but base weight {key} has shape {tuple(base_shape)}",
        place=str(place),
        hint="the adapter was trained on a different model (or a resized vocabulary); pass the model it was trained on with --base",
    )


def _checkpoint_index(base: Path) -> tuple[dict[str, Path], dict[str, str], dict[str, tuple[int, ...]]]:
    """Every tensor of the base's safetensors files: its file, dtype and shape, read from headers only."""
    from safetensors import safe_open

    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index)["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    elif (base / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise FtuneError(
            f"{base} has no safetensors weights (model.safetensors or model.safetensors.index.json)",
            hint="ftune does not read pickle-based .bin files; convert the checkpoint to safetensors first",
        )
    files, kinds, shapes = {}, {}, {}
    for name in names:
        with safe_open(base / name, framework="pt") as handle:
            names_in_file = handle.keys()
            for key in names_in_file:
                part = handle.get_slice(key)
                files[key] = base / name
                kinds[key] = part.get_dtype()
                shapes[key] = tuple(part.get_shape())
    return files, kinds, shapes


def _meta_model(src: Source):
    """The base architecture with no weights (meta device): its tied weights and module types."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(src.base_path, trust_remote_code=src.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=src.trust_remote_code)
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


# --- 3. writing ------------------------------------------------------------------------------


def write_weights(plan: Plan, out: Path, dtype: str, max_shard_bytes: int, say: Callable[[str], None]) -> None:
    """Compute each output tensor from the base and the adapter and stream it into shards."""
    out_kind = SAFETENSORS_KIND[dtype]
    shards: list[list[tuple[str, str, str]]] = [[]]  # per shard: (output key, base key, safetensors dtype)
    sizes = [0]
    for out_key, base_key in plan.outputs:
        kind = out_kind if plan.kinds[base_key] in FLOAT_KINDS else plan.kinds[base_key]
        if kind not in SAFETENSORS_ITEMSIZE:
            raise FtuneError(f"base tensor {base_key} has dtype {kind}, which ftune merge does not write", place=str(plan.files[base_key]))
        nbytes = math.prod(plan.shapes[out_key]) * SAFETENSORS_ITEMSIZE[kind]
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append((out_key, base_key, kind))
        sizes[-1] += nbytes

    count = len(shards)
    names = ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    weight_map = {}
    for name, shard, size in zip(names, shards, sizes):
        _write_safetensors(out / name, shard, plan, dtype)
        weight_map.update({out_key: name for out_key, _, _ in shard})
        say(f"  {name}: {len(shard)} tensors, {size / 2**20:.1f} MiB")
    if count > 1:
        write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})


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
        nbytes = math.prod(plan.shapes[out_key]) * SAFETENSORS_ITEMSIZE[kind]
        header[out_key] = {"dtype": kind, "shape": list(plan.shapes[out_key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
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
    """One output tensor: the base's (or the adapter's whole replacement), rounded if QLoRA, plus the adapter."""
    from safetensors import safe_open

    if out_key in plan.replace:
        weight = plan.replace[out_key]
    else:
        # A tied head written apart starts from the base embedding, not from a trained copy of it:
        # during training it shared the original weight, not the modules_to_save copy. One tensor
        # at a time, the file closed after, so the mapped base never piles up in memory.
        with safe_open(plan.files[base_key], framework="pt") as handle:
            weight = handle.get_tensor(base_key)
    if out_key in plan.rounded and out_key not in plan.replace:
        weight = round_through_4bit(weight, plan)
    if out_key in plan.lora:
        weight = apply_lora(weight, plan.lora[out_key])
    owner = plan.lora.get(out_key.removesuffix(".bias") + ".weight") if out_key.endswith(".bias") else None
    if owner is not None and owner.bias is not None:  # peft's lora_bias: B has a bias, scaled like B @ A
        weight = weight.float() + owner.bias.float() * owner.scale
    return weight


def round_through_4bit(weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The weight as QLoRA training saw it: quantized by bitsandbytes with the run's settings, then dequantized."""
    import bitsandbytes.functional as bnbf
    import torch

    quant = plan.quantization
    packed, state = bnbf.quantize_4bit(
        weight.to(getattr(torch, plan.train_dtype)).contiguous(),
        blocksize=BNB_BLOCKSIZE,
        compress_statistics=quant["double_quant"],
        quant_type=quant["quant_type"],
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


def _write_config(config: dict, out: Path, dtype: str, *, untie: bool) -> None:
    """The base's config.json, edited rather than rebuilt, so custom fields and auto_map survive."""
    config = dict(config)
    # transformers 5 reads `dtype`; 4.x (what many serving stacks pin) reads `torch_dtype`.
    config["dtype"] = dtype
    config["torch_dtype"] = dtype
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    write_json(out / "config.json", config)


def _copy_support_files(src: Source, out: Path) -> None:
    """Tokenizer and chat template, and generation config (the run's, as trained), and remote code if any.

    Copied as files, not loaded and saved again, so the merged model carries exactly the
    tokenizer the adapter was trained with; the parity check then loads it from `out`.
    """
    from transformers import AutoConfig, GenerationConfig

    base = Path(src.base_path)
    tokenizer_dir = src.adapter_dir if (src.adapter_dir / "tokenizer_config.json").is_file() else base
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    if (tokenizer_dir / "additional_chat_templates").is_dir():
        shutil.copytree(tokenizer_dir / "additional_chat_templates", out / "additional_chat_templates")
    if not (out / "tokenizer_config.json").is_file():
        raise FtuneError(f"no tokenizer in {src.adapter_dir} or {base} (tokenizer_config.json)")
    # The run's generation config stops at the chat template's end-of-turn token; the base's may not.
    for folder in (src.adapter_dir, base):
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", out / "generation_config.json")
            break
    else:
        model_config = AutoConfig.from_pretrained(base, trust_remote_code=src.trust_remote_code)
        GenerationConfig.from_model_config(model_config).save_pretrained(out)
    if src.base_config.get("auto_map"):
        for code in base.glob("*.py"):
            shutil.copyfile(code, out / code.name)


def _provenance(src: Source, plan: Plan, onto: str, dtype: str, rounded_base: bool) -> dict:
    from ftune import __version__

    return {
        "ftune_version": __version__,
        "stage": "merge",
        "source": str(src.run_dir or src.adapter_dir),
        "adapter": str(src.adapter_dir),
        "base_model": src.base_path,
        "dtype": dtype,
        "onto": "quantized" if rounded_base else "original",
        "onto_requested": onto,
        "quantization": src.quantization,
        "adapted_weights": len(plan.lora),
        "replaced_weights": sorted(plan.replace),
        "rounded_through_4bit": len(plan.rounded),
        "untied": plan.untied,
        "versions": package_versions(),
    }


# --- 4. parity -------------------------------------------------------------------------------


def verify_parity(src: Source, merged_dir: Path, dtype: str, *, rounded_base: bool, say: Callable[[str], None]) -> dict:
    """Compare the adapter, loaded as it was trained, with the merged directory loaded by plain transformers.

    One model is in memory at a time; the reference's logits are kept for the comparison.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.models import load_tokenizer

    tokenizer = load_tokenizer(str(merged_dir))
    prompts = _prompts(src, tokenizer)
    qlora = src.quantization is not None
    if qlora and rounded_base:
        reference_name = f"adapter on the 4-bit base, as trained ({src.train_dtype})"
    elif qlora:
        reference_name = f"adapter on the full-precision base ({src.train_dtype})"
    elif src.run_dir is not None:
        reference_name = f"adapter on the base, as trained ({src.train_dtype})"
    else:  # a bare adapter does not say how it was trained
        reference_name = f"adapter on the base ({src.train_dtype})"
    say(f"verifying on {len(prompts)} prompts: {reference_name} against the merged model ({dtype})")
    reference = _run_prompts(_adapter_model(src, quantized=qlora and rounded_base), prompts, tokenizer)
    # The model went with _run_prompts' frame; collect in case (remote) code left a cycle, since
    # two 7B models at once would not fit where one does.
    gc.collect()
    trained = None
    if qlora and not rounded_base:
        say("  and against the adapter on the 4-bit base it was trained on, to measure what --onto original shifts")
        trained = _run_prompts(_adapter_model(src, quantized=True), prompts, tokenizer)
        gc.collect()
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype), trust_remote_code=src.trust_remote_code)
    merged = _run_prompts(merged_model.to(_device()), prompts, tokenizer)

    precision = _lower_precision(src.train_dtype, dtype)
    comparison = _compare(reference, merged, tokenizer, TOLERANCES[precision])
    report = {
        "passed": comparison.pop("passed"),
        "reference": reference_name,
        "merged_dtype": dtype,
        "precision": precision,
        **comparison,
    }
    if trained is not None:
        shift = _compare(trained, merged, tokenizer, TOLERANCES[precision])
        report["shift_from_trained_4bit_model"] = {k: v for k, v in shift.items() if k not in ("passed", "limits", "prompts")}
    return report


def _prompts(src: Source, tokenizer) -> list[list[int]]:
    """The run's held-out samples (already in the chat template), else built-in questions in the template."""
    texts = []
    if src.prompts_file is not None:
        for number, line in enumerate(src.prompts_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FtuneError("expected a JSON object with a 'text' field", place=f"{src.prompts_file}:{number}") from None
    if not texts:
        for question in BUILTIN_PROMPTS:
            if tokenizer.chat_template:
                messages = [{"role": "user", "content": question}]
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            else:
                texts.append(question)
    # The texts carry their special tokens already (the chat template wrote them).
    return [tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS] for text in texts[:MAX_PROMPTS]]


def _adapter_model(src: Source, *, quantized: bool):
    """The base with the adapter on top, unmerged; in 4 bits through bitsandbytes when `quantized`."""
    from peft import PeftModel

    from ftune.models import load_model, pick_dtype
    from ftune.recipe import QuantizationSection

    quantization = QuantizationSection.model_validate(src.quantization) if quantized else None
    model = load_model(src.base_path, dtype=pick_dtype(src.train_dtype), quantization=quantization, trust_remote_code=src.trust_remote_code)
    for module in model.modules():
        # bitsandbytes' CPU inference kernel (AVX512-BF16) repacks 4-bit weights and multiplies in
        # bf16, which training never does; keep the dequantize-then-matmul path that training uses.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if not quantized:  # load_model already placed a 4-bit model
        model = model.to(_device())
    return PeftModel.from_pretrained(model, src.adapter_dir)


def _run_prompts(model, prompts: list[list[int]], tokenizer) -> list[dict]:
    """Per prompt: float32 logits at every prompt position, and the greedy continuation.

    A plain loop over the KV cache rather than `generate`: the prompt's forward pass gives both
    the logits and the first token, and no generation_config of the model's can turn on sampling.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    results = []
    with torch.inference_mode():
        for ids in prompts:
            output = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            logits = output.logits[0].float().cpu()
            greedy = [int(logits[-1].argmax())]
            while len(greedy) < GREEDY_TOKENS and greedy[-1] != tokenizer.eos_token_id:
                step = torch.tensor([[greedy[-1]]], device=device)
                output = model(input_ids=step, past_key_values=output.past_key_values, use_cache=True)
                greedy.append(int(output.logits[0, -1].argmax()))
            results.append({"logits": logits, "greedy": greedy})
    return results


def _compare(reference: list[dict], merged: list[dict], tokenizer, tolerance: Tolerance) -> dict:
    rows = []
    for ref, got in zip(reference, merged):
        agree = (ref["logits"].argmax(-1) == got["logits"].argmax(-1)).float()
        rows.append(
            {
                "tokens": int(agree.numel()),
                "max_abs_logit_diff": (ref["logits"] - got["logits"]).abs().max().item(),
                "top1_agreement": agree.mean().item(),
                "greedy_match": ref["greedy"] == got["greedy"],
                "reference_continuation": tokenizer.decode(ref["greedy"]),
                "merged_continuation": tokenizer.decode(got["greedy"]),
            }
        )
    positions = sum(row["tokens"] for row in rows)
    scale = max(max(ref["logits"].abs().max().item() for ref in reference), 1.0)
    summary = {
        "max_abs_logit_diff": max(row["max_abs_logit_diff"] for row in rows),
        "logit_scale": scale,
        "top1_agreement": sum(row["top1_agreement"] * row["tokens"] for row in rows) / positions,
        "greedy_matches": sum(row["greedy_match"] for row in rows),
        "prompt_count": len(rows),
        "greedy_tokens": GREEDY_TOKENS,
    }
    limits = {
        "max_abs_logit_diff": tolerance.max_logit_diff * scale,
        "min_top1_agreement": tolerance.min_top1_agreement,
        "greedy_must_match": tolerance.greedy_must_match,
    }
    passed = (
        math.isfinite(summary["max_abs_logit_diff"])
        and summary["max_abs_logit_diff"] <= limits["max_abs_logit_diff"]
        and summary["top1_agreement"] >= limits["min_top1_agreement"]
        and (summary["greedy_matches"] == len(rows) or not tolerance.greedy_must_match)
    )
    return {"passed": passed, **summary, "limits": limits, "prompts": rows}


def render_report(report: dict) -> str:
    """The parity report as a table (rich), one row per prompt and a total."""
    from rich.console import Console
    from rich.table import Table

    limits = report["limits"]
    table = Table()
    for column in ("prompt", "tokens", "max |logit diff|", "top-1 agree", f"greedy {GREEDY_TOKENS}"):
        table.add_column(column, justify="right" if column != "prompt" else "left")
    for number, row in enumerate(report["prompts"], start=1):
        table.add_row(
            str(number),
            str(row["tokens"]),
            f"{row['max_abs_logit_diff']:.2e}",
            f"{row['top1_agreement']:.1%}",
            "same" if row["greedy_match"] else "differs",
        )
    table.add_section()
    table.add_row(
        "all",
        str(sum(row["tokens"] for row in report["prompts"])),
        f"{report['max_abs_logit_diff']:.2e}",
        f"{report['top1_agreement']:.1%}",
        f"{report['greedy_matches']}/{report['prompt_count']} same",
    )
    table.add_row(
        "limit",
        "",
        f"{limits['max_abs_logit_diff']:.2e}",
        f">= {limits['min_top1_agreement']:.0%}",
        "all same" if limits["greedy_must_match"] else "-",
    )
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None)
    console.print(f"parity: the merged model ({report['merged_dtype']}) against the {report['reference']}")
    console.print(table)
    verdict = "PASS" if report["passed"] else "FAIL"
    console.print(f"{verdict}: merged model {'matches' if report['passed'] else 'does not match'} the adapter ({report['precision']} tolerance)")
    shift = report.get("shift_from_trained_4bit_model")
    if shift:
        console.print(
            f"--onto original shifts outputs from the 4-bit model the adapter was trained on: max |logit diff| "
            f"{shift['max_abs_logit_diff']:.2e}, top-1 agreement {shift['top1_agreement']:.1%}, "
            f"greedy {shift['greedy_matches']}/{shift['prompt_count']} same (information, not checked)"
        )
    return buffer.getvalue().rstrip()


# --- small helpers ---------------------------------------------------------------------------


def _choice(value: str, choices, option: str) -> str:
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    raise FtuneError(
        f"{option} must be one of {', '.join(choices)}, not {value!r}" + (f" (did you mean {close[0]}?)" if close else "")
    )


def _config_dtype(config: dict) -> str:
    """The dtype a base's config.json declares (float32 when it declares none we write)."""
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in DTYPES.values() else "float32"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _lower_precision(*dtypes: str) -> str:
    for name in ("bfloat16", "float16"):
        if name in dtypes:
            return name
    return "float32"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FtuneError(f"unreadable JSON ({exc})", place=str(path)) from None


def _run_value(run: dict, section: str, key: str, run_dir: Path | None):
    try:
        return run[section][key]
    except (KeyError, TypeError):
        raise FtuneError(f"{RUN_FILE} has no {section}.{key}", place=str(run_dir), hint="was it written by an older ftune?") from None

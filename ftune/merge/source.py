"""What to merge: the adapter, its base model, and how the adapter was trained.

A run directory records all of it in run.json (the base, its dtype, whether it was 4-bit in
training); a checkpoint's adapter inside a run finds the run above it; a bare PEFT adapter
names its base in adapter_config.json. Nothing here is loaded or written: only JSON is read.

`trust_remote_code` is the user's, from the command line: a run directory may come from
anywhere, so a flag in its run.json never decides whether Python shipped with it runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune.artifacts import run_checks
from ftune.artifacts.ownership import RUN_FILE
from ftune.artifacts.runs import ADAPTER_DIR, CHECKPOINTS_DIR, Run, read_run
from ftune.errors import FtuneError
from ftune.guards import textio

if TYPE_CHECKING:
    from ftune.recipe import QuantizationSection

ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype -> torch dtype name
# LoRA initialisations that rewrite the base weights during training: the saved adapter then
# only fits that rewritten base, unless peft converted it when saving.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class Source:
    """The adapter to merge, its base model, and how the adapter was trained."""

    adapter_dir: Path
    run_dir: Path | None
    base_path: str  # a local Hugging Face model directory
    trust_remote_code: bool  # from the command line only
    train_dtype: str  # torch dtype name the adapter was trained in
    quantization: QuantizationSection | None  # the run's 4-bit settings, when the base was 4-bit in training
    adapter_config: dict
    base_config: dict  # the base's config.json
    prompts_file: Path | None  # the run's held-out prompts, for parity
    scores: bool = False  # a reward model's adapter (peft task SEQ_CLS): merged into a sequence-classification model


def is_run_or_adapter(path: Path) -> bool:
    """True for an ftune run directory or a PEFT adapter directory (what `merge_to_dir` accepts)."""
    path = Path(path)
    return (path / RUN_FILE).is_file() or (path / ADAPTER_CONFIG).is_file()


def read_source(source: Path, base: str | None, *, trust_remote_code: bool = False) -> Source:
    """Find the adapter directory and its base model from a run directory or a bare adapter."""
    source = Path(source)
    run_dir, adapter_dir = _locate(source)
    run = read_run(run_dir) if run_dir else None
    if run is not None:
        run_checks.check_kind(run, "merge")
        if run.completed and run.adapter_method != "none" and adapter_dir == run.adapter_dir and not adapter_dir.is_dir():
            run_checks.check_adapter(adapter_dir, run_dir=run.dir)  # a finished run's adapter folder gone: damage, named
    if run is not None and run.adapter_method == "none":
        raise FtuneError(
            "nothing to merge: this run trained the whole model, not an adapter",
            place=str(run.dir),
            hint=f"{run.model_dir} is already a standalone model directory",
        )
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        status = run.status if run else "unknown"
        raise FtuneError(f"no adapter at {adapter_dir} (run status: {status})", hint="merge a finished run, or one of its checkpoints")
    adapter_config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    check_adapter_config(adapter_config, adapter_dir / ADAPTER_CONFIG)

    base_path = _base_path(source, base, run, adapter_config)
    config = read_json_object(Path(base_path) / "config.json")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(config["quantization_config"], dict) else "?"
        raise FtuneError(
            f"the base model {base_path} is a pre-quantized ({method}) checkpoint; merging needs full-precision weights",
            hint="pass the original full-precision model with --base",
        )
    train_dtype = run.dtype if run is not None else None
    if train_dtype in (None, "auto"):
        train_dtype = config_dtype(config)
    elif train_dtype not in DTYPES.values():
        raise FtuneError(f"dtype is {train_dtype!r}, not one of {', '.join(DTYPES.values())}", place=str(run.dir / RUN_FILE))
    prompts = run.eval_prompts_file if run is not None and run.eval_prompts_file.is_file() else None
    return Source(
        adapter_dir=adapter_dir,
        run_dir=run.dir if run is not None else None,
        base_path=base_path,
        trust_remote_code=trust_remote_code,
        train_dtype=train_dtype,
        quantization=_quantization(run) if run is not None else None,
        adapter_config=adapter_config,
        base_config=config,
        prompts_file=prompts,
        scores=adapter_config.get("task_type") == "SEQ_CLS",
    )


def _locate(source: Path) -> tuple[Path | None, Path]:
    """(the run directory if there is one, the adapter directory) for what the user named."""
    if not source.is_dir():
        raise FtuneError(f"{source} does not exist or is not a directory")
    if (source / RUN_FILE).is_file():
        return source, source / ADAPTER_DIR
    in_run = source.parent.name == CHECKPOINTS_DIR and (source.parent.parent / RUN_FILE).is_file()
    if (source / ADAPTER_CONFIG).is_file():
        # A checkpoint inside a run: the run still knows the base and the quantization.
        return (source.parent.parent if in_run else None), source
    if in_run:
        raise FtuneError(
            f"{source} is a training checkpoint (optimizer state and trainable weights), not a saved adapter",
            hint="resume the run to finish it (the training command with --resume), then merge the run directory",
        )
    raise FtuneError(
        f"{source} is neither an ftune run directory (no {RUN_FILE}) nor a PEFT adapter directory (no {ADAPTER_CONFIG})",
        hint="pass a run directory written by `ftune sft` or `ftune dpo`, or a directory saved by peft's save_pretrained",
    )


def _base_path(source: Path, base: str | None, run: Run | None, adapter_config: dict) -> str:
    """The base model's local directory: --base, else the run's (found again by name if it moved), else the adapter's."""
    from ftune.modeling.models import resolve_model_path, run_base_path

    try:
        if base is not None:
            return resolve_model_path(base)
        if run is not None:
            return run_base_path(run)
        name, revision = adapter_config.get("base_model_name_or_path"), adapter_config.get("revision")
        if not isinstance(name, str) or not name:
            raise FtuneError(f"{ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
        return resolve_model_path(name, revision=revision if isinstance(revision, str) else None)
    except FtuneError as exc:
        raise FtuneError(exc.message, place=f"base model of {source}", hint=exc.hint or "pass the base model with --base") from None


def check_adapter_config(config: dict, place: Path) -> None:
    """Refuse adapters whose forward pass is not plain LoRA, rsLoRA, DoRA, VeRA or IA3: merging them here
    would be wrong; and virtual-token adapters (prompt, prefix tuning), which have no weights to merge."""
    from peft import LoraConfig

    refuse_unmergeable(config, place)
    kind = config.get("peft_type")
    if kind in ("IA3", "VERA"):
        _check_flags(config, place)
        if kind == "VERA" and config.get("save_projection") is False:
            raise FtuneError("the VeRA adapter was saved without its shared projection matrices (save_projection: false)",
                             place=str(place), hint="ftune merges VeRA adapters saved with save_projection=True, as ftune saves them")
        for name in ("layer_replication", "target_parameters", "trainable_token_indices"):
            if config.get(name):
                raise FtuneError(f"ftune merge does not support adapters with {name}", place=str(place))
        return
    if kind != "LORA":
        raise FtuneError(f"ftune merges LoRA, DoRA, VeRA and IA3 adapters; this one is {kind}", place=str(place))
    _check_numbers(config, place)
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


def _check_numbers(config: dict, place: Path) -> None:
    """r and lora_alpha (and their per-module patterns) are what the arithmetic divides by and scales with."""

    def number(value: Any, *, whole: bool) -> bool:
        kinds = int if whole else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value > 0

    for key, whole in (("r", True), ("lora_alpha", False)):
        if not number(config.get(key), whole=whole):
            raise FtuneError(f"{key} must be a positive {'whole ' if whole else ''}number, not {config.get(key)!r}", place=str(place))
    for key, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(number(v, whole=whole) for v in pattern.values()):
            raise FtuneError(f"{key} must map module names to positive numbers", place=str(place))
    _check_flags(config, place)


def _check_flags(config: dict, place: Path) -> None:
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise FtuneError(f"{key} must be true or false, not {config.get(key)!r}", place=str(place))


def refuse_unmergeable(config: dict, place: Path, command: str = "merge") -> None:
    """An adapter of virtual tokens (prompt, prefix tuning) has no weights to merge: say why, and what to do instead."""
    from ftune.modeling.adapters import unmergeable

    refusal = unmergeable(config, str(Path(place).parent))
    if refusal is not None:
        why, instead = refusal
        raise FtuneError(f"ftune {command}: {why}", place=str(place), hint=instead)


def refuse_unmergeable_source(source: Path, command: str) -> None:
    """The same refusal, early, for a run or adapter directory (before any output is prepared)."""
    try:
        _run_dir, adapter_dir = _locate(Path(source))
        config = read_json_object(adapter_dir / ADAPTER_CONFIG)
    except FtuneError:
        return  # not an adapter after all, or a damaged one: the command's own checks say so
    refuse_unmergeable(config, adapter_dir / ADAPTER_CONFIG, command)


def _quantization(run: Run) -> QuantizationSection | None:
    """The run's 4-bit settings, checked as the recipe checked them (rounding and the 4-bit reference use them)."""
    from pydantic import ValidationError

    from ftune.recipe import QuantizationSection

    if run.quantization is None:
        return None
    try:
        return QuantizationSection.model_validate(run.quantization)
    except ValidationError as exc:
        problem = exc.errors()[0]
        key = ".".join(str(part) for part in ("quantization", *problem["loc"]))
        raise FtuneError(f"{key}: {problem['msg']}", place=str(run.dir / RUN_FILE)) from None


def config_dtype(config: dict) -> str:
    """The dtype a base's config.json declares (float32 when it declares none we write)."""
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in DTYPES.values() else "float32"


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, with a clear error naming the file otherwise."""
    if not path.exists():
        raise FtuneError(f"{path} does not exist")
    try:
        data = textio.load_file(path)  # depth-bounded, NaN refused: read back, not trusted
    except FtuneError as exc:
        raise FtuneError(f"unreadable JSON ({exc.message.removeprefix('unreadable JSON: ').removeprefix('invalid JSON: ')})",
                         place=exc.place) from None
    if not isinstance(data, dict):
        raise FtuneError(f"expected a JSON object, not {type(data).__name__}", place=str(path))
    return data

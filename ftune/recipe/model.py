"""The whole recipe and the rules that join its sections, each kept with its YAML key."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, model_validator

from ftune.recipe.data import FORMAT_COLUMNS, DataSection, DataSource
from ftune.recipe.rl import REWARD_FIELDS, GrpoSection, RewardSection
from ftune.recipe.sections import (
    VIRTUAL_TOKEN_METHODS,
    AdapterSection,
    BaseModelSection,
    CrossFieldError,
    DistributedSection,
    EvaluationSection,
    OutputSection,
    PreferenceSection,
    QuantizationSection,
    RMSection,
    Section,
    TrainingSection,
)

MAX_EPOCH_SAMPLES = 1 << 24  # a mixture epoch's samples, drawn and batched in memory: ~1 GiB of indices and batches


class Recipe(Section):
    stage: Literal["sft", "dpo", "rm", "grpo"] = Field(description="What this recipe trains: sft, dpo, rm (a reward model) or grpo.")
    base_model: BaseModelSection = Field(description="The model being fine-tuned.")
    data: DataSection = Field(description="Where the data comes from and how it becomes tokens.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="LoRA, DoRA, or full fine-tuning.")
    quantization: QuantizationSection = Field(
        default_factory=QuantizationSection, description="4-bit loading of the base model (QLoRA)."
    )
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation settings.")
    preference: PreferenceSection | None = Field(None, description="Preference-tuning settings (stage: dpo).")
    rm: RMSection | None = Field(None, description="Reward-model settings (stage: rm).")
    grpo: GrpoSection | None = Field(None, description="Online RL settings: sampling, loss, KL (stage: grpo).")
    rewards: list[RewardSection] | None = Field(
        None, min_length=1, description="stage: grpo: what scores each completion: a list of rewards, summed with their weights."
    )
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="What is measured.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Several processes or machines, through Hugging Face accelerate."
    )
    output: OutputSection = Field(description="Where the run is written.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        problems: list[tuple[str, str]] = []
        if self.quantization.load_in_4bit and self.adapter.method == "none":
            problems.append(("quantization.load_in_4bit", "QLoRA needs an adapter: set adapter.method to lora, dora or another adapter method"))
        problems += _adapter_problems(self)
        problems += _sft_data_problems(self)
        problems += _grpo_problems(self)
        problems += _rm_problems(self)
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
        if self.data.train_on == "all" and self.data.turns != "all":
            problems.append(("data.turns", f"turns: {self.data.turns} chooses assistant turns to train, but train_on: all "
                             "trains every token; use train_on: assistant"))
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
        for split in ("train", "eval"):
            for i, source in enumerate(getattr(self.data, split)):
                problems += _column_problems(source, ("data", split, i, "columns"))
        epoch, tc = self.data.epoch_samples, self.training
        rows = (tc.max_steps * tc.batch_size * tc.gradient_accumulation_steps * self.distributed.num_processes
                if tc.max_steps is not None else None)  # what the steps use, at most
        if epoch is not None and epoch > MAX_EPOCH_SAMPLES and (rows is None or rows > MAX_EPOCH_SAMPLES):
            # An epoch's sample indices are drawn and batched in memory (dozens of bytes each) before the first
            # step; with max_steps the epoch is cut to what the steps use (steps.epoch_samples).
            problems.append(("data.epoch_samples", f"{epoch:,} samples in one epoch would be held in memory before training "
                             f"starts; at most {MAX_EPOCH_SAMPLES:,}: train as long with more epochs (training.epochs; each draws "
                             "afresh), or set training.max_steps (an epoch is then cut to what the steps use)"))
        if problems:
            raise CrossFieldError(problems)
        return self


def _rm_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """stage: rm needs its section and pairs (not KTO's unpaired examples); the rm section is its alone."""
    if recipe.stage != "rm":
        return [("rm", f"an rm section only applies to stage: rm, not {recipe.stage}")] if recipe.rm is not None else []
    problems = []
    if recipe.rm is None:
        problems.append(("rm", "stage: rm needs an rm section (at least `rm: {}`)"))
    if recipe.preference is not None:
        problems.append(("preference", "stage: rm reads its settings from rm: (init_from, center_coefficient, ...), not preference:"))
    if recipe.adapter.method in VIRTUAL_TOKEN_METHODS:
        problems.append(("adapter.method", f"stage: rm scores packed pairs through the decoder itself, which "
                         f"{recipe.adapter.method}'s virtual tokens never enter; use lora, dora, lora_plus, vera, ia3 or none"))
    formats = {s.format for s in [*recipe.data.train, *recipe.data.eval]} - {"auto", "preference"}
    if formats:
        problems.append(("data.train", f"stage: rm trains on preference pairs (prompt/chosen/rejected), not {', '.join(sorted(formats))}"))
    return problems


def _grpo_problems(recipe: Recipe) -> list[tuple[tuple | str, str]]:
    """stage: grpo needs its sections and prompt data; each reward reads only its own type's fields."""
    problems: list[tuple[tuple | str, str]] = []
    formats = {s.format for s in [*recipe.data.train, *recipe.data.eval]}
    if recipe.stage != "grpo":
        for key in ("grpo", "rewards"):
            if getattr(recipe, key) is not None:
                problems.append((key, f"a {key} section only applies to stage: grpo"))
        if "prompts" in formats:
            problems.append(("data.train", f"prompts data (no answers) only trains stage: grpo, not {recipe.stage}"))
        return problems
    if recipe.grpo is None:
        problems.append(("grpo", "stage: grpo needs a grpo section (at least `grpo: {}`)"))
    if not recipe.rewards:
        problems.append(("rewards", "stage: grpo needs at least one reward, e.g. `rewards: [{type: exact_answer, column: answer}]`"))
    if recipe.preference is not None:
        problems.append(("preference", "a preference section only applies to stage: dpo; grpo's settings are under grpo:"))
    bad = formats - {"auto", "prompts"}
    if bad:
        problems.append(("data.train", f"stage: grpo reads prompts (a prompt column, or messages ending with a user turn), "
                         f"not {', '.join(sorted(bad))} data; set format: prompts or leave it auto"))
    grpo = recipe.grpo or GrpoSection()
    if grpo.max_completion_length >= recipe.data.max_length:
        problems.append(("grpo.max_completion_length", f"{grpo.max_completion_length} leaves no room for the prompt in "
                         f"data.max_length ({recipe.data.max_length}, prompt + completion); raise data.max_length"))
    if grpo.beta > 0 and recipe.adapter.method == "none":
        problems.append(("grpo.beta", "a KL penalty needs the starting model beside the trained one; with full fine-tuning "
                         "that is a second copy of the model, which ftune does not keep: use an adapter, or beta: 0"))
    if grpo.init_from and recipe.adapter.method == "none":
        problems.append(("grpo.init_from", "init_from continues an adapter; adapter.method: none cannot"))
    names: dict[str, int] = {}
    for i, reward in enumerate(recipe.rewards or []):
        for key in ("column", "pattern", "regex", "target", "function", "timeout_s", "run"):
            if key in reward.model_fields_set and key not in REWARD_FIELDS[reward.type]:
                users = [t for t, keys in REWARD_FIELDS.items() if key in keys]
                problems.append((("rewards", i, key), f"'{key}' applies to type: {' or '.join(users)}, not {reward.type}"))
        required = {"format": "regex", "function": "function", "reward_model": "run"}.get(reward.type)
        if required and getattr(reward, required) is None:
            problems.append((("rewards", i, "type"), f"type: {reward.type} needs `{required}`"))
        if reward.label in names:
            problems.append((("rewards", i), f"two rewards are named '{reward.label}' (rewards[{names[reward.label]}] and "
                             f"rewards[{i}]); give one a `name:`"))
        names.setdefault(reward.label, i)
    return problems


def _column_problems(source: DataSource, at: tuple) -> list[tuple[tuple, str]]:
    """`columns:` maps each ftune column to a different one of the user's columns."""
    known = FORMAT_COLUMNS.get(source.format) or tuple(dict.fromkeys(c for cs in FORMAT_COLUMNS.values() for c in cs))
    problems: list[tuple[tuple, str]] = []
    mapped_from: dict[str, str] = {}
    for ours, theirs in source.columns.items():
        if ours not in known:
            suggestion = difflib.get_close_matches(ours, known, n=1, cutoff=0.6)
            hint = f"did you mean '{suggestion[0]}'?" if suggestion else f"known columns{'' if source.format == 'auto' else ' of ' + source.format}: {', '.join(known)}"
            problems.append(((*at, ours), f"'{ours}' is not a column ftune reads (the key is ftune's name, the value yours); {hint}"))
        if theirs in mapped_from:
            problems.append(((*at, ours), f"your column '{theirs}' is mapped twice, to '{mapped_from[theirs]}' and to '{ours}'"))
        mapped_from.setdefault(theirs, ours)
    return problems




def _adapter_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Rules between the adapter and the other sections."""
    problems: list[tuple[str, str]] = []
    method = recipe.adapter.method
    if method in VIRTUAL_TOKEN_METHODS and recipe.stage == "sft" and recipe.data.packing:
        problems.append(("data.packing", f"{method} puts its virtual tokens before each sample, and packed samples share a "
                         "row; set data.packing: false"))
    if method == "prefix_tuning" and recipe.training.gradient_checkpointing:
        problems.append(("training.gradient_checkpointing", "prefix_tuning does not work with gradient checkpointing (peft "
                         "refuses it: the virtual keys and values live in the attention cache, which recomputing a layer "
                         "fills again); set gradient_checkpointing: false"))
    return problems


def _sft_data_problems(recipe: Recipe) -> list[tuple[str | tuple, str]]:
    """Data settings only the SFT pipeline has (token-length filters, weighted mixtures, parallel tokenization)."""
    if recipe.stage == "sft":
        return []
    data, problems = recipe.data, []
    for key in ("min_tokens", "max_tokens"):
        if getattr(data.filters, key) is not None:
            problems.append((f"data.filters.{key}", f"applies to stage: sft (tokens as rendered for training), not {recipe.stage}"))
    problems += [(("data", "train", i, "weight"), f"weighted mixtures apply to stage: sft, not {recipe.stage}")
                 for i, source in enumerate(data.train) if source.weight is not None]
    if data.num_proc is not None:
        problems.append(("data.num_proc", f"applies to stage: sft (its data is tokenized in parallel), not {recipe.stage}"))
    return problems

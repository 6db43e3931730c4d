"""One measured TRL run for scripts/bench.py, in its own process: SFTTrainer, DPOTrainer or RewardTrainer.

    python scripts/bench_trl.py SPEC.json

SPEC holds: kind ("sft", "dpo" or "rm"), model_dir, data (a JSONL file in TRL's conversational
prompt/completion or prompt/chosen/rejected form), steps (optimizer steps, the first one
is warm-up), batch_size, max_length, learning_rate, lora {r, alpha, dropout}, packing
(sft), beta (dpo), seed, output_dir.

Everything not set from SPEC is TRL's default, except `bf16=False`: the benchmark trains in
float32 on both sides, and TRL defaults to bf16 autocast. TRL's other defaults stay,
notably `gradient_checkpointing=True`.

Prints one line `BENCH_RESULT {json}` with per-step end times (perf_counter, after the
optimizer step), per-step trained tokens (labels that are not -100 after the shift, as
the loss sees them), processed token slots, and peak resident memory (VmHWM).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def vm_hwm_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class CountingCollator:
    """Wraps the trainer's collator and records what each batch holds, in the order built."""

    def __init__(self, inner, kind: str):
        self.inner, self.kind = inner, kind
        self.batches: list[dict] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        if self.kind == "sft":
            # The fused head scores position t against labels[t + 1]; -100 carries no loss.
            trained = int((batch["labels"][:, 1:] != -100).sum())
            real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            self.batches.append({"trained": trained, "slots": batch["input_ids"].numel(), "real": real})
        elif self.kind == "rm":
            # RewardTrainer: chosen rows then rejected rows, padded to the longest; every real token is scored through.
            real = int(batch["attention_mask"].sum())
            self.batches.append({"pairs": len(examples), "trained": real, "slots": batch["input_ids"].numel(), "real": real})
        else:
            # DPO: chosen rows then rejected rows, padded to the longest; completion_mask marks answers.
            self.batches.append({"pairs": len(examples), "trained": int(batch["completion_mask"][:, 1:].sum()),
                                 "slots": batch["input_ids"].numel(), "real": int(batch["attention_mask"].sum())})
        return batch


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.hwm_at_last_step = float("nan")

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.cpu.append(usage.ru_utime + usage.ru_stime)
            if state.global_step == spec["steps"]:
                self.hwm_at_last_step = vm_hwm_mib()

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec["kind"] == "rm":  # a one-output sequence-classification model; SEQ_CLS trains and saves its score head
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    lora = LoraConfig(r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"], lora_dropout=spec["lora"]["dropout"],
                      target_modules="all-linear", task_type="SEQ_CLS" if spec["kind"] == "rm" else "CAUSAL_LM")
    common = {"output_dir": spec["output_dir"], "max_steps": spec["steps"], "per_device_train_batch_size": spec["batch_size"],
              "learning_rate": spec["learning_rate"], "max_length": spec["max_length"], "seed": spec["seed"], "bf16": False}
    if spec["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        extra = {"packing": True, "padding_free": True} if spec.get("packing") else {}
        args = SFTConfig(**common, **extra)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    elif spec["kind"] == "rm":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common)
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=spec["beta"])
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    # Set after construction: SFTTrainer refuses a custom collator with padding-free, and
    # this one only counts and passes the batch through.
    counter = CountingCollator(trainer.data_collator, spec["kind"])
    trainer.data_collator = counter
    clock = StepClock()
    trainer.add_callback(clock)
    hwm_before_training = vm_hwm_mib()
    trainer.train()
    settings = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "learning_rate", "lr_scheduler_type",
                                               "warmup_steps", "max_grad_norm", "optim", "max_length")}
    settings.update({k: getattr(args, k) for k in ("packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss")
                     if hasattr(args, k)})
    if spec["kind"] == "dpo":
        settings.update({k: getattr(args, k) for k in ("beta", "loss_type", "precompute_ref_log_probs")})
    if spec["kind"] == "rm":
        settings.update({k: getattr(args, k) for k in ("center_rewards_coefficient", "disable_dropout", "pad_to_multiple_of")})
    settings["attn_implementation"] = model.config._attn_implementation
    result = {
        "step_ends": clock.ends,
        "step_cpu_s": clock.cpu,
        "batches": counter.batches[: spec["steps"]],
        "hwm_before_training_mib": hwm_before_training,
        "hwm_at_last_step_mib": clock.hwm_at_last_step,
        "hwm_mib": vm_hwm_mib(),
        "threads": torch.get_num_threads(),
        "settings": {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)) for k, v in settings.items()},
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

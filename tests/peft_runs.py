"""Run directories made with peft directly (no training): what `ftune sft` leaves, with an adapter whose
random non-zero lora_B (and DoRA magnitudes, and modules_to_save copies) visibly changes the model, so a
merge that drops or mis-scales anything changes the logits (tests/test_merge.py, test_merge_package.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ["What is the capital of France?", "Name a prime number."]


def make_run(
    root: Path,
    base: Path,
    *,
    method: str = "lora",
    rslora: bool = False,
    load_in_4bit: bool = False,
    target_modules: list[str] | str = "all-linear",
    modules_to_save: list[str] | None = None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    seed: int = 0,
) -> Path:
    """A run directory as `ftune sft` leaves it, with an adapter that visibly changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = {"load_in_4bit": load_in_4bit, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}
    extra = {}
    if load_in_4bit:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **extra)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        use_dora=method == "dora",
        use_rslora=rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "lora_B" in name or "lora_embedding_B" in name:
            param.data = noise * 0.2
        elif "lora_magnitude_vector" in name:
            param.data = param.data * (1 + 0.3 * noise)
        elif "modules_to_save" in name:
            param.data = param.data + 0.1 * noise
    run = root / "run"
    peft_model.save_pretrained(run / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(run / "adapter")
    run_json = {
        "ftune_version": "0.1.0",
        "stage": "sft",
        "status": "completed",
        "base_model": {"name": str(base), "path": str(base), "revision": None, "trust_remote_code": False},
        "adapter": {"method": method, "r": 4, "alpha": 8, "rslora": rslora},
        "quantization": quantization,
        "dtype": "float32",
        "global_step": 1,
        "versions": {},
    }
    (run / "run.json").write_text(json.dumps(run_json))
    with open(run / "eval_prompts.jsonl", "w", encoding="utf-8") as handle:
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            handle.write(json.dumps({"text": text}) + "\n")
    return run

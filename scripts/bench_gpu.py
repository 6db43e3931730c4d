"""The GPU part of `make bench`, run only when torch.cuda.is_available(): a 1B and an 8B Llama, random weights.

    python scripts/bench_gpu.py          # on its own, prints the Markdown
    python scripts/bench_gpu.py --tiny   # the same plumbing with tiny models, on CPU (a check of this script)

- 1B (Llama-3.2-1B shape, bf16 LoRA r 16 on all linear layers): trained and real tokens per
  second of ftune's `sft` stage, and the share of the GPU's bf16 matmul peak (measured here
  with torch.matmul) that it reaches, at 4N FLOPs per real token (2N forward, 2N backward
  to the activations; the frozen weights get no weight gradient), 6N with gradient
  checkpointing (one more forward).
- 8B (Llama-3.1-8B shape) QLoRA: peak GPU memory (torch.cuda.max_memory_allocated and
  reserved) of ftune's `sft` stage in 4-bit NF4 with gradient checkpointing.

Weights are random (they do not change the arithmetic), written once as safetensors with
the demo model's tokenizer; vocabulary rows beyond the tokenizer's are simply never used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
            "rope_theta": 500000.0, "max_position_embeddings": 8192}
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
            "rope_theta": 500000.0, "max_position_embeddings": 8192}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 2048}

# Per run: rows x tokens per step, steps (the first is warm-up), QLoRA, gradient checkpointing.
SIZES = {
    "1b": {"batch_size": 8, "max_length": 2048, "steps": 11, "qlora": False, "checkpointing": False},
    "8b-qlora": {"batch_size": 2, "max_length": 2048, "steps": 4, "qlora": True, "checkpointing": True},
}
TINY_SIZES = {
    "1b": {"batch_size": 2, "max_length": 256, "steps": 3, "qlora": False, "checkpointing": False},
    "8b-qlora": {"batch_size": 2, "max_length": 256, "steps": 3, "qlora": True, "checkpointing": True},
}


def bf16_peak(n: int = 8192, tries: int = 10) -> dict:
    """Best bf16 TFLOP/s of n x n torch.matmul on the GPU (2 n^3 FLOPs each)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(tries):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return {"n": n, "tries": tries, "tflops": 2 * n**3 / min(times) / 1e12, "device": torch.cuda.get_device_name(0)}


def random_model(path: Path, shape: dict, *, device: str, dtype_name: str) -> int:
    """Write a randomly initialised Llama with the demo tokenizer to `path`; return its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftune.modeling.models import demo_model_dir, load_tokenizer

    tokenizer = load_tokenizer(str(demo_model_dir()))
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="5GB")
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def write_recipe(path: Path, model_dir: Path, data: Path, out: Path, *, dtype: str, batch_size: int, max_length: int,
                 steps: int, qlora: bool, checkpointing: bool) -> Path:
    recipe = {
        "stage": "sft",
        "base_model": {"name": str(model_dir), "dtype": dtype},
        "data": {"train": [{"path": str(data)}], "eval_fraction": 0.0, "max_length": max_length},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"load_in_4bit": qlora},
        "training": {"learning_rate": 2.0e-4, "batch_size": batch_size, "max_steps": steps, "logging_steps": 1,
                     "gradient_checkpointing": checkpointing},
        "evaluation": {"prompts": []},
        "output": {"dir": str(out)},
    }
    path.write_text(json.dumps(recipe, indent=2))
    return path


def run(tmp: Path, *, tiny: bool = False) -> dict:
    """Both GPU measurements; each training run in its own process (bench_ftune.py)."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_common as bench

    tmp.mkdir(parents=True, exist_ok=True)
    device, dtype = ("cpu", "float32") if tiny else ("cuda", "bfloat16")
    out: dict = {"peak": None if tiny else bf16_peak(), "runs": {}}
    from ftune.modeling.models import demo_model_dir

    rows, _ = bench.sft_rows(2000, 2048, demo_model_dir())
    data = bench.write_jsonl(tmp / "alpaca.jsonl", [row for row, _ in rows])
    for name, size in (TINY_SIZES if tiny else SIZES).items():
        shape = TINY if tiny else (LLAMA_8B if name.startswith("8b") else LLAMA_1B)
        model_dir = tmp / f"model-{name}"
        start = time.perf_counter()
        params = random_model(model_dir, shape, device=device, dtype_name=dtype)
        bench.say(f"GPU {name}: {params / 1e9:.2f}B random parameters written in {time.perf_counter() - start:.0f} s")
        recipe = write_recipe(tmp / f"{name}.yaml", model_dir, data, tmp / f"run-{name}", dtype=dtype,
                              batch_size=size["batch_size"], max_length=size["max_length"], steps=size["steps"],
                              qlora=size["qlora"], checkpointing=size["checkpointing"])
        raw = bench.run_child("bench_ftune.py", {"kind": "sft", "recipe": str(recipe)}, tmp / f"{name}.log")
        figures = bench.summarize_ftune_sft(raw)
        flops_per_token = (6 if size["checkpointing"] else 4) * params
        figures.update({"params": params, "shape": shape, **size, "flops_per_token": flops_per_token,
                        "cuda_peak_mib": raw.get("cuda_peak_mib"), "cuda_reserved_mib": raw.get("cuda_reserved_mib"),
                        "achieved_tflops": flops_per_token * figures["real_tokens_per_s"] / 1e12})
        if out["peak"]:
            figures["share_of_peak"] = figures["achieved_tflops"] / out["peak"]["tflops"]
        out["runs"][name] = figures
        bench.say(f"GPU {name}: {figures['tokens_per_s']:,.0f} trained tokens/s, {figures['achieved_tflops']:.1f} TFLOP/s, "
                  f"peak {figures['cuda_peak_mib'] or 0:,.0f} MiB allocated")
        subprocess.run(["rm", "-rf", str(model_dir)], check=False)
    return out


def markdown(result: dict) -> list[str]:
    peak = result.get("peak")
    lines = []
    if peak:
        lines.append(f"{peak['device']}: bf16 matmul peak measured {peak['tflops']:.0f} TFLOP/s (best of {peak['tries']} x {peak['n']}^2).")
        lines.append("")
    lines += ["| model | params | batch x length | grad. ckpt | trained tokens/s | real tokens/s | FLOPs/token | TFLOP/s | share of peak | peak GPU MiB (allocated / reserved) |",
              "|---|---:|---|---|---:|---:|---|---:|---:|---|"]
    for name, r in result["runs"].items():
        share = f"{100 * r['share_of_peak']:.0f}%" if "share_of_peak" in r else "-"
        mem = f"{r['cuda_peak_mib']:,.0f} / {r['cuda_reserved_mib']:,.0f}" if r.get("cuda_peak_mib") is not None else "-"
        lines.append(f"| {name}{' (QLoRA NF4)' if r['qlora'] else ''} | {r['params'] / 1e9:.2f}B | {r['batch_size']} x {r['max_length']} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {r['tokens_per_s']:,.0f} | {r['real_tokens_per_s']:,.0f} | "
                     f"{'6N' if r['checkpointing'] else '4N'} | {r['achieved_tflops']:.1f} | {share} | {mem} |")
    lines += ["", ("FLOPs/token: 4N for LoRA (2N forward, 2N backward to the activations), 6N with gradient checkpointing "
              "(one recomputed forward); N counts every parameter; attention scores are left out.")]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: checks this script's plumbing")
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (use --tiny to check the plumbing on CPU)")
    with tempfile.TemporaryDirectory(prefix="ftune-bench-gpu-") as tmp:
        result = run(Path(tmp), tiny=args.tiny)
    print(json.dumps(result, indent=2, default=str))
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()

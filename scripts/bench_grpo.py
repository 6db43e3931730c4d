"""GRPO side of `make bench`: completions per second and peak memory, ftune's `grpo` against TRL's GRPOTrainer.

    python scripts/bench_grpo.py                       # both sides, interleaved, medians over --repeats
    python scripts/bench_grpo.py --steps 4 --repeats 2 --json out.json

Same on both sides: the demo model, the shipped arithmetic prompts with the demo recipe's
system prompt, the same two rewards (exact answer, answer format; the same Python code),
prompts per step, num_generations, max_completion_length, LoRA (r 16, alpha 32, all linear
layers, dropout 0), learning rate, float32. TRL keeps its GRPOConfig defaults for everything
else (loss_type dapo, scale_rewards group, beta 0, temperature 1, top_p 1, top_k 0); ftune runs
loss dapo too. Each run is its own process (its peak RSS is its own); the first optimizer step
is warm-up, and the timed window runs from its end to the end of the last step. Completions
per second = completions sampled (and trained on) in the window / its seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "ftune" / "demo_data" / "arithmetic.jsonl"
SYSTEM = "Solve the problem. Reply with only the final number inside <answer></answer>, for example <answer>12</answer>."
FORMAT = r"^\s*<answer>\s*-?\d+\s*</answer>\s*$"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR = 1.0e-6  # TRL's GRPOConfig default learning rate


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_ftune(spec: dict) -> dict:
    import yaml

    from ftune.stages import grpo

    folder = Path(spec["dir"])
    recipe = {
        "stage": "grpo", "base_model": {"name": "demo"},
        "data": {"train": [{"path": str(DATA)}], "eval_fraction": 0.0, "max_length": 256, "system_prompt": SYSTEM},
        "grpo": {"num_generations": spec["generations"], "max_completion_length": spec["length"], "loss": "dapo"},
        "rewards": [{"type": "exact_answer", "column": "answer"}, {"type": "format", "regex": FORMAT, "weight": 0.5}],
        "adapter": {"method": "lora", **LORA},
        "training": {"learning_rate": LR, "batch_size": spec["prompts"], "max_steps": spec["steps"] + 1, "warmup_ratio": 0.0,
                     "seed": spec["seed"]},
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = grpo.run(path, overwrite=True)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in logged if "completions_per_s" in m]
    per_step = spec["prompts"] * spec["generations"]
    # completions_per_s is cumulative since the first step started: recover each step's end time
    ends = [m["step"] * per_step / m["completions_per_s"] for m in logged]
    window = ends[-1] - ends[0]
    return {"completions_per_s": spec["steps"] * per_step / window, "seconds": window, "peak_rss_mib": vm_hwm_mib(),
            "reward_mean": statistics.mean(m["reward"] for m in logged)}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ftune.modeling.models import demo_model_dir
    from ftune.stages.rl.rewards import extract_answer, same_answer
    import re

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}],
                                  "answer": r["answer"]} for r in rows])
    fmt = re.compile(FORMAT, re.DOTALL)

    def exact_answer(prompts, completions, answer, **kwargs):
        return [1.0 if same_answer(extract_answer(c[0]["content"]), a) else 0.0 for c, a in zip(completions, answer)]

    def answer_format(prompts, completions, **kwargs):
        return [1.0 if fmt.search(c[0]["content"]) else 0.0 for c in completions]

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    per_step = spec["prompts"] * spec["generations"]
    args = GRPOConfig(output_dir=spec["dir"], per_device_train_batch_size=per_step, num_generations=spec["generations"],
                      max_completion_length=spec["length"], learning_rate=LR, max_steps=spec["steps"] + 1, seed=spec["seed"],
                      reward_weights=[1.0, 0.5], logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                      bf16=False)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(demo_model_dir()), reward_funcs=[exact_answer, answer_format], args=args,
                          train_dataset=dataset, peft_config=lora)
    trainer.add_callback(Clock())
    trainer.train()
    window = ends[-1] - ends[0]
    return {"completions_per_s": spec["steps"] * per_step / window, "seconds": window, "peak_rss_mib": vm_hwm_mib()}


def run_side(side: str, spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "FTUNE_NO_PROGRESS": "1"})
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after 1 warm-up step (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side; medians are reported (default 1)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    parser.add_argument("--generations", type=int, default=8, help="num_generations (default 8)")
    parser.add_argument("--length", type=int, default=64, help="max_completion_length (default 64)")
    parser.add_argument("--sides", nargs="*", default=["ftune", "trl"], choices=["ftune", "trl"])
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, spec = args.child[0], json.loads(args.child[1])
        print("RESULT " + json.dumps((child_ftune if side == "ftune" else child_trl)(spec)), flush=True)
        return
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="ftune-bench-grpo-") as tmp:
        for repeat in range(args.repeats):
            for side in args.sides:  # interleaved: A, B, A, B
                folder = Path(tmp) / f"{side}-{repeat}"
                folder.mkdir()
                spec = {"dir": str(folder), "steps": args.steps, "prompts": args.prompts, "generations": args.generations,
                        "length": args.length, "seed": 42 + repeat}
                results[side].append(run_side(side, spec))
                print(f"{side} run {repeat + 1}: {results[side][-1]}", flush=True)
    summary = {side: {k: statistics.median(r[k] for r in runs) for k in ("completions_per_s", "peak_rss_mib")} for side, runs in results.items()}
    if "ftune" in summary and "trl" in summary:
        summary["speedup"] = summary["ftune"]["completions_per_s"] / summary["trl"]["completions_per_s"]
        summary["memory_ratio"] = summary["ftune"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"]
    report = {"settings": vars(args) | {"json": str(args.json)}, "runs": results, "summary": summary, "load": os.getloadavg()}
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

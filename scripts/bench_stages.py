"""The training parts of scripts/bench.py: ftune's sft, dpo and rm stages against TRL's SFTTrainer,
DPOTrainer and RewardTrainer, with the settings both sides share, each side run `repeats` times,
interleaved, every run in its own process (scripts/bench_ftune.py, scripts/bench_trl.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

import bench_report
from bench_common import (
    LORA, _step_figures, dpo_rows, medians, run_child, say, sft_rows, summarize_ftune_sft, summarize_trl, write_jsonl,
)

# The settings both sides share; each is passed by name to ftune's recipe and to TRL's config (LoRA: bench_common.LORA).
SFT_LR, DPO_LR, BETA = 2.0e-4, 5.0e-5, 0.1
RM_LR = 1.0e-4  # TRL's RewardConfig default
SEED = 42  # repeat i uses seed 42 + i on every side, so repeats draw different batches


# --------------------------------------------------------------------------- data


def write_recipe(path: Path, stage: str, model_dir: Path, data: Path, *, batch_size: int, max_length: int,
                 steps: int, learning_rate: float, seed: int, out: Path, checkpointing: bool = False) -> Path:
    """A recipe that trains `steps` optimizer steps with nothing else: no eval, checkpoints or sample answers."""
    recipe = {
        "stage": stage,
        "base_model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": [{"path": str(data)}], "eval_fraction": 0.0, "max_length": max_length},
        "adapter": {"method": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"], "target_modules": "all-linear"},
        "training": {"learning_rate": learning_rate, "batch_size": batch_size, "max_steps": steps, "logging_steps": 1, "seed": seed,
                     "gradient_checkpointing": checkpointing},
        "evaluation": {"prompts": []},
        "output": {"dir": str(out)},
    }
    if stage == "dpo":
        recipe["preference"] = {"method": "dpo", "beta": BETA}
    if stage == "rm":
        recipe["rm"] = {}  # TRL's defaults: no centering, no margins
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return path


# --------------------------------------------------------------------------- runs


def interleave(sides: dict, repeats: int, log_dir: Path) -> dict[str, list[dict]]:
    """Run each side `repeats` times as A, B, C, A, B, C, ...; every run in a fresh process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name, (script, make_spec, summarize) in sides.items():
            spec = make_spec(repeat)
            load = os.getloadavg()[0]
            raw = run_child(script, spec, log_dir / f"{slug(name)}-{repeat}.log")
            summary = summarize(raw)
            summary["load_1min_at_start"] = load
            results[name].append(summary)
            say(f"  {name} #{repeat + 1}: " + ", ".join(f"{k} {v:,.1f}" for k, v in summary.items()
                                                      if k in ("timed_s", "tokens_per_s", "pairs_per_s", "pairs_per_s_with_reference", "peak_rss_mib")))
    return results


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def summarize_ftune_dpo(batch_size: int, total_pairs: int):
    def summarize(raw: dict) -> dict:
        """As for SFT, from `pairs_per_s` = pairs so far / seconds since just before step 1, k * batch pairs at step k.

        ftune scores the reference log-probs inside the steps (each pair the first time a step
        reaches it), as TRL runs its reference forward inside every step, so both sides' step
        timings carry the same reference work; `reference_s` (time spent on a reference pass
        outside the steps) is 0, which leaves `pairs_per_s_with_reference` = `pairs_per_s`.
        """
        metrics = sorted(raw["metrics"], key=lambda m: m["step"])
        ends = [m["step"] * batch_size / m["pairs_per_s"] for m in metrics]
        seconds = ends[-1] - ends[0]
        batches = [{**b, "pairs": batch_size} for b in raw["batches"][1: len(metrics)]]
        cpu = raw["marks"][-1]["cpu_s"] - raw["marks"][0]["cpu_s"]
        out = _step_figures(batches, seconds, raw, cpu, extra={"hook_seconds": raw["marks"][-1]["t"] - raw["marks"][0]["t"],
                                                          "reference_s": raw["reference_s"], "reference_pairs": total_pairs})
        out["pairs_per_s_with_reference"] = out["pairs"] / (seconds + raw["reference_s"] * out["pairs"] / total_pairs)
        return out
    return summarize


def summarize_trl_dpo(raw: dict) -> dict:
    out = summarize_trl(raw)
    out["pairs_per_s_with_reference"] = out["pairs_per_s"]  # TRL's reference forward is inside each step
    return out


def bench_sft(tmp: Path, model_dir: Path, args) -> dict:
    kept, source = sft_rows(args.rows, args.max_length, model_dir)
    ftune_data = write_jsonl(tmp / "ftune.jsonl", [row for row, _, _ in kept])
    # TRL gets the very conversations ftune renders (system turn added by the chat template on
    # both sides), as conversational prompt/completion rows: TRL's completion-only loss then
    # trains the answer and what the template appends to it (<|im_end|> and a newline).
    trl_data = write_jsonl(tmp / "trl.jsonl", [{"prompt": list(chat.messages[:-1]), "completion": [chat.messages[-1]]}
                                                for _, chat, _ in kept])
    steps = 1 + args.steps
    # Every side's timed steps cover about the same number of samples: a packed step (ftune,
    # TRL packing) holds several samples per row, an unpacked one (TRL defaults) one.
    from ftune.data.packing import pack

    rows = pack(np.array([tokens for _, _, tokens in kept]), args.max_length)
    per_packed_step = len(kept) / len(rows) * args.batch_size
    unpacked_steps = 1 + max(args.steps, round(args.steps * per_packed_step / args.batch_size))
    say(f"SFT: {len(kept)} rows from {source}, {args.repeats} repeats; {steps} steps per packed run ({args.steps} timed, "
        f"about {per_packed_step:.0f} samples a step), {unpacked_steps} per unpacked run ({unpacked_steps - 1} timed)")

    def ftune_spec(checkpointing: bool):
        def make(repeat: int) -> dict:
            name = f"ftune{'-ckpt' if checkpointing else ''}-{repeat}"
            recipe = write_recipe(tmp / f"{name}.yaml", "sft", model_dir, ftune_data, batch_size=args.batch_size, max_length=args.max_length,
                                  steps=steps, learning_rate=SFT_LR, seed=SEED + repeat, out=tmp / f"run-{name}",
                                  checkpointing=checkpointing)
            return {"kind": "sft", "recipe": str(recipe)}
        return make

    def trl_spec(packing: bool):
        def make(repeat: int) -> dict:
            return {"kind": "sft", "model_dir": str(model_dir), "data": str(trl_data), "steps": steps if packing else unpacked_steps,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length, "learning_rate": SFT_LR, "lora": LORA, "packing": packing, "seed": SEED + repeat,
                    "output_dir": str(tmp / f"trl-{'packing' if packing else 'default'}-{repeat}")}
        return make

    sides = {"ftune": ("bench_ftune.py", ftune_spec(False), summarize_ftune_sft)}
    if args.with_checkpointing:
        sides[bench_report.FTUNE_CKPT] = ("bench_ftune.py", ftune_spec(True), summarize_ftune_sft)
    sides["TRL defaults"] = ("bench_trl.py", trl_spec(False), summarize_trl)
    sides["TRL packing"] = ("bench_trl.py", trl_spec(True), summarize_trl)
    runs = interleave(sides, args.repeats, tmp / "logs")
    out = {"rows": len(kept), "source": source, "samples_per_packed_step": per_packed_step, "unpacked_steps": unpacked_steps,
           "runs": runs, "medians": medians(runs)}
    if args.profile:
        # A run of its own: the profiler's overhead stays out of the figures above.
        say("SFT: profiling one more ftune run")
        table = tmp / "profile.txt"
        run_child("bench_ftune.py", {**ftune_spec(False)(args.repeats), "profile": str(table)}, tmp / "logs" / "ftune-profile.log")
        out["profile"] = table.read_text()
    return out


def bench_dpo(tmp: Path, model_dir: Path, args) -> dict:
    batch = max(1, args.batch_size // 2)
    steps = 1 + args.steps
    # Exactly the pairs the run trains on, each once: both sides score each pair's reference once.
    kept, source = dpo_rows(steps * batch, args.max_length, model_dir)
    if len(kept) < steps * batch:
        steps = len(kept) // batch
        kept = kept[: steps * batch]
    ftune_data = write_jsonl(tmp / "ftune.jsonl", [row for row, _ in kept])
    trl_data = write_jsonl(tmp / "trl.jsonl", [{"prompt": list(p.prompt), "chosen": list(p.chosen), "rejected": list(p.rejected)}
                                                for _, p in kept])
    say(f"DPO: {len(kept)} pairs from {source}, {steps} steps of {batch} pairs per run, {args.repeats} repeats")

    def ftune_spec(repeat: int) -> dict:
        recipe = write_recipe(tmp / f"ftune-{repeat}.yaml", "dpo", model_dir, ftune_data, batch_size=batch,
                              max_length=args.max_length, steps=steps, learning_rate=DPO_LR, seed=SEED + repeat,
                              out=tmp / f"ftune-run-{repeat}")
        return {"kind": "dpo", "recipe": str(recipe)}

    def trl_spec(repeat: int) -> dict:
        return {"kind": "dpo", "model_dir": str(model_dir), "data": str(trl_data), "steps": steps, "batch_size": batch,
                "max_length": args.max_length, "learning_rate": DPO_LR, "lora": LORA, "beta": BETA, "seed": SEED + repeat,
                "output_dir": str(tmp / f"trl-{repeat}")}

    sides = {
        "ftune": ("bench_ftune.py", ftune_spec, summarize_ftune_dpo(batch, len(kept))),
        "TRL defaults": ("bench_trl.py", trl_spec, summarize_trl_dpo),
    }
    runs = interleave(sides, args.repeats, tmp / "logs")
    return {"pairs": len(kept), "batch_size": batch, "source": source, "runs": runs, "medians": medians(runs)}


def bench_rm(tmp: Path, model_dir: Path, args) -> dict:
    """Reward models: ftune's `rm` stage against TRL's RewardTrainer defaults, on the pairs the DPO part uses."""
    batch = max(1, args.batch_size // 2)
    kept, source = dpo_rows((1 + args.steps) * batch, args.max_length, model_dir)
    steps = min(1 + args.steps, len(kept) // batch)
    ftune_data = write_jsonl(tmp / "ftune.jsonl", [row for row, _ in kept])
    trl_data = write_jsonl(tmp / "trl.jsonl", [{"prompt": list(p.prompt), "chosen": list(p.chosen), "rejected": list(p.rejected)}
                                                for _, p in kept])
    say(f"RM: {len(kept)} pairs from {source}, {steps} steps of {batch} pairs per run, {args.repeats} repeats")

    def ftune_spec(repeat: int) -> dict:
        recipe = write_recipe(tmp / f"ftune-{repeat}.yaml", "rm", model_dir, ftune_data, batch_size=batch, max_length=args.max_length,
                              steps=steps, learning_rate=RM_LR, seed=SEED + repeat, out=tmp / f"ftune-run-{repeat}")
        return {"kind": "rm", "recipe": str(recipe)}

    def trl_spec(repeat: int) -> dict:
        return {"kind": "rm", "model_dir": str(model_dir), "data": str(trl_data), "steps": steps, "batch_size": batch,
                "max_length": args.max_length, "learning_rate": RM_LR, "lora": LORA, "seed": SEED + repeat,
                "output_dir": str(tmp / f"trl-{repeat}")}

    # ftune's rm logs pairs_per_s as dpo does, with no reference pass: the DPO summary reads it as it is.
    sides = {"ftune": ("bench_ftune.py", ftune_spec, summarize_ftune_dpo(batch, len(kept))),
             "TRL defaults": ("bench_trl.py", trl_spec, summarize_trl)}
    runs = interleave(sides, args.repeats, tmp / "logs")
    return {"pairs": len(kept), "batch_size": batch, "source": source, "runs": runs, "medians": medians(runs)}

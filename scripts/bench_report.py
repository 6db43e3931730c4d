"""Targets and the Markdown report of scripts/bench.py: judge_targets(report), render_markdown(report)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
FTUNE_CKPT = "ftune + gradient checkpointing"
TARGETS = {
    "sft_vs_trl_default": 3.0,  # ftune tokens/s >= 3.0x TRL defaults
    "sft_vs_trl_packing": 1.5,  # ftune tokens/s >= 1.5x TRL with packing
    "dpo_vs_trl_default": 1.5,  # ftune pairs/s >= 1.5x TRL defaults
    "rm_vs_trl_default": 1.5,  # ftune reward-model pairs/s >= 1.5x TRL's RewardTrainer defaults, at no more memory
    "grpo_vs_trl_default": 1.5,  # ftune completions/s >= 1.5x TRL's GRPOTrainer defaults, at no more memory
    "data_prep_vs_trl": 2.0,  # ftune data preparation (`ftune inspect`) >= 2x faster than TRL's, same cores
    "data_prep_memory_vs_trl": 0.5,  # ... at <= half TRL's peak RSS
    "data_prep_scaling": 11.0,  # 1M rows cost <= 11x the time of 100k (10x the rows)
    "data_training_memory": 1.2,  # training RSS with a 1M-row cached set <= 1.2x that with 10k rows
}
PARTS = ("startup", "sft", "dpo", "rm", "grpo", "data", "data_baseline", "merge", "export", "gpu")


def fmt_load(load) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + f" (1, 5, 15 min; {os.cpu_count()} cores)"


def judge_targets(report: dict) -> list[dict]:
    """Each target with the measured value and met / missed (or not measured)."""
    out = []

    def add(name, goal, value, met):
        out.append({"target": name, "goal": goal, "measured": value, "status": "not measured" if met is None else ("met" if met else "missed")})

    sft = report.get("sft", {}).get("medians")
    if sft:
        f, d, p = sft["ftune"], sft["TRL defaults"], sft["TRL packing"]
        r = f["tokens_per_s"] / d["tokens_per_s"]
        add("SFT tokens/s vs TRL defaults", f">= {TARGETS['sft_vs_trl_default']}x", f"{r:.2f}x", r >= TARGETS["sft_vs_trl_default"])
        r = f["tokens_per_s"] / p["tokens_per_s"]
        add("SFT tokens/s vs TRL packing", f">= {TARGETS['sft_vs_trl_packing']}x", f"{r:.2f}x", r >= TARGETS["sft_vs_trl_packing"])
        for name, other in (("TRL defaults", d), ("TRL packing", p)):
            add(f"SFT peak memory vs {name}", "<= TRL's", f"{f['peak_rss_mib']:,.0f} vs {other['peak_rss_mib']:,.0f} MiB",
                f["peak_rss_mib"] <= other["peak_rss_mib"])
    else:
        add("SFT targets", "", "", None)
    dpo = report.get("dpo", {}).get("medians")
    if dpo:
        f, d = dpo["ftune"], dpo["TRL defaults"]
        r = f["pairs_per_s_with_reference"] / d["pairs_per_s"]
        add("DPO pairs/s vs TRL defaults (ftune's reference pass included)", f">= {TARGETS['dpo_vs_trl_default']}x", f"{r:.2f}x",
            r >= TARGETS["dpo_vs_trl_default"])
    else:
        add("DPO pairs/s vs TRL defaults", "", "", None)
    rm = report.get("rm", {}).get("medians")
    if rm:
        f, d = rm["ftune"], rm["TRL defaults"]
        r = f["pairs_per_s"] / d["pairs_per_s"]
        add("RM pairs/s vs TRL RewardTrainer defaults", f">= {TARGETS['rm_vs_trl_default']}x", f"{r:.2f}x", r >= TARGETS["rm_vs_trl_default"])
        add("RM peak memory vs TRL RewardTrainer defaults", "<= TRL's", f"{f['peak_rss_mib']:,.0f} vs {d['peak_rss_mib']:,.0f} MiB",
            f["peak_rss_mib"] <= d["peak_rss_mib"])
    else:
        add("RM targets", "", "", None)
    grpo = report.get("grpo", {}).get("summary", {})
    if "speedup" in grpo:
        r = grpo["speedup"]
        add("GRPO completions/s vs TRL GRPOTrainer defaults", f">= {TARGETS['grpo_vs_trl_default']}x", f"{r:.2f}x",
            r >= TARGETS["grpo_vs_trl_default"])
        f, t = grpo["ftune"]["peak_rss_mib"], grpo["trl"]["peak_rss_mib"]
        add("GRPO peak memory vs TRL GRPOTrainer defaults", "<= TRL's", f"{f:,.0f} vs {t:,.0f} MiB", f <= t)
    else:
        add("GRPO targets", "", "", None)
    out += _data_part().targets(report.get("data"), TARGETS)
    merge = report.get("merge", {}).get("parsed")
    if merge:
        f, p = merge["ftune"], merge["peft"]
        add(f"merge time vs peft merge_and_unload ({merge['seconds_column']})", "<= peft's",
            f"{f['seconds']:.1f} vs {p['seconds']:.1f} s", f["seconds"] <= p["seconds"])
        model = report["model"]
        limit = model["largest_shard_mib"] + model["adapter_fp32_mib"]
        add(f"merge memory ({merge['memory_column']})", f"<= one shard + adapter ({limit:,.0f} MiB)",
            f"{f['mib']:,.0f} MiB (peft: {p['mib']:,.0f})", f["mib"] <= limit)
    else:
        add("merge targets", "", "", None)
    return out


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (scripts/bench.py); the exact command and every raw figure are in `bench.json`.",
        "",
        f"- command: `{report['command']}` ({report['wall_s'] / 60:.1f} min)",
        f"- date: {report['started']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cpu_flags']}), {m['ram_gib']} GiB RAM"
        + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU"),
        f"- load average before: {fmt_load(report['load_before'])}; after: {fmt_load(report['load_after'])} "
        "(it includes the benchmark's own runs; what other processes used is on the next line)",
        f"- torch threads per measured process: **{report['threads']['threads']}** ({report['threads']['why']})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        (f"- fp32 matmul peak on this machine (best of {report['matmul_peak']['tries']} x {report['matmul_peak']['n']}^2 torch.matmul, "
         f"{report['matmul_peak']['threads']} thread(s)): "
        f"**{report['matmul_peak']['gflops']:.1f} GFLOP/s**"),
        "",
        "## Targets",
        "",
        "| target | goal | measured | status |",
        "|---|---|---|---|",
        *[f"| {t['target']} | {t['goal']} | {t['measured']} | **{t['status']}** |" for t in report["targets"]],
        "",
    ]
    if report.get("parts_from"):
        lines[6:6] = [("- parts measured in separate runs, each named under its heading: "
                       + ", ".join(sorted(report["parts_from"])))]
    sections = (_sourced(report, "sft", _sft_section(report)) + _sourced(report, "dpo", _dpo_section(report))
                + _sourced(report, "rm", _rm_section(report)) + _sourced(report, "grpo", _grpo_section(report))
                + _sourced(report, "data", _data_part().markdown(report.get("data"), baseline=False))
                + _sourced(report, "data_baseline", _data_part().markdown(report.get("data_baseline"), baseline=True))
                + _merge_export_section(report) + _startup_section(report) + _gpu_section(report))
    lines += sections
    lines += _method_section(report)
    return "\n".join(lines) + "\n"


def _data_part():
    """scripts/bench_data_report.py, which renders the data part (as bench_gpu.py renders its own)."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_data_report

    return bench_data_report


def _sourced(report: dict, part: str, lines: list[str]) -> list[str]:
    """A section, with the run it came from under its heading when that is not the report's own run."""
    source = report.get("parts_from", {}).get(part)
    if not source or not lines:
        return lines
    run = f"`{source['command']}`" if source.get("command") else "its command is not recorded"
    return lines[:2] + [f"From a separate run ({run}; {source.get('started') or 'date unknown'}; figures in `{source['file']}`).", ""] + lines[2:]


def _settings(report: dict, part: str) -> dict:
    """The settings of the run a part was measured in (another run's, for a part added with --add-part)."""
    return report.get("parts_from", {}).get(part, {}).get("settings") or report["settings"]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _sft_section(report: dict) -> list[str]:
    sft = report.get("sft")
    if not sft:
        return ["## SFT", "", "skipped", ""]
    med, s, model = sft["medians"], _settings(report, "sft"), report["model"]
    f = med["ftune"]
    peak = report["matmul_peak"]["gflops"]
    lines = [
        "## SFT: trained tokens per second and peak memory",
        "",
        (f"{sft['rows']} rows of `{Path(sft['source']).name}`, demo model ({model['params'] / 1e6:.1f}M parameters), "
        f"batch {s['batch_size']} rows, max length {s['max_length']}, float32, LoRA r {s['lora']['r']} / alpha {s['lora']['alpha']} "
        f"on all linear layers, lr {s['sft_learning_rate']}; 1 warm-up + {s['steps']} timed steps per packed run (about "
        f"{sft.get('samples_per_packed_step', 0):.0f} samples a step), 1 + {sft.get('unpacked_steps', 1 + s['steps']) - 1} for TRL defaults "
        f"(one sample per row), medians of {s['repeats']} runs per side."),
        "",
        "| side | trained tokens/s | ftune is | trained tokens per CPU-s | real tokens/s | token slots/step | peak RSS MiB | timed s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in med.items():
        lines.append(f"| {name} | {v['tokens_per_s']:,.1f} | {_ratio(f['tokens_per_s'], v['tokens_per_s'])} | "
                     f"{v['tokens_per_cpu_s']:,.1f} | {v['real_tokens_per_s']:,.1f} | "
                     f"{v['token_slots'] / max(v['timed_steps'], 1):,.0f} | {v['peak_rss_mib']:,.0f} | {v['timed_s']:.1f} |")
    lines += ["", ("Trained tokens per CPU-second divides by the user + system CPU time of the run's process over the same "
              "window, which leaves out time spent waiting for a core on a shared machine; the targets use wall-clock tokens/s.")]
    flops = 4 * model["params"] * f["real_tokens_per_s"]
    lines += [
        "",
        (f"Share of the CPU's fp32 matmul peak reached by ftune: 4 x N x (real tokens/s) = 4 x {model['params'] / 1e6:.1f}M x "
        f"{f['real_tokens_per_s']:,.1f} = {flops / 1e9:.1f} GFLOP/s, **{100 * flops / 1e9 / peak:.0f}%** of {peak:.1f} GFLOP/s "
        "(N = every parameter of the base model; 4N = 2N forward + 2N backward to the activations, the frozen weights get no "
        "weight gradient; LoRA's own FLOPs (r 16) and attention scores are left out; ftune also skips the output head on "
        "untrained positions, so this overstates its work slightly)."),
        "",
    ]
    for name, v in med.items():
        if name == "ftune":
            continue
        checkpointing = name == FTUNE_CKPT or sft["runs"][name][0].get("trl_settings", {}).get("gradient_checkpointing")
        lines.append(f"- {name} by the same formula: {100 * 4 * model['params'] * v['real_tokens_per_s'] / 1e9 / peak:.0f}% of peak"
                     + (" (its gradient checkpointing also recomputes the forward, another 2N not counted)" if checkpointing else ""))
    lines.append("")
    if sft.get("profile"):
        lines += [
            "Where ftune's SFT step spends its time (`--profile`: torch.profiler over the steps after the first of one more "
            "ftune run, operations by self CPU time):",
            "",
            "```",
            *[line[:150].rstrip() for line in sft["profile"].strip().splitlines()[:24]],
            "```",
            "",
        ]
    return lines


def _dpo_section(report: dict) -> list[str]:
    dpo = report.get("dpo")
    if not dpo:
        return ["## DPO", "", "skipped", ""]
    f, d = dpo["medians"]["ftune"], dpo["medians"]["TRL defaults"]
    s = _settings(report, "dpo")
    return [
        "## DPO: preference pairs per second and peak memory",
        "",
        (f"{dpo['pairs']} pairs of `{Path(dpo['source']).name}` (each side's answer and prompt fit in {s['max_length']} tokens), "
        f"batch {dpo['batch_size']} pairs, beta {s['beta']}, same LoRA, lr {s['dpo_learning_rate']}; medians of {s['repeats']} runs."),
        "",
        "| side | pairs/s (steps) | pairs/s incl. reference | ftune is | real tokens/s | peak RSS MiB | timed s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| ftune | {f['pairs_per_s']:.3f} | {f['pairs_per_s_with_reference']:.3f} | | {f['real_tokens_per_s']:,.1f} | {f['peak_rss_mib']:,.0f} | {f['timed_s']:.1f} |",
        (f"| TRL defaults | {d['pairs_per_s']:.3f} | {d['pairs_per_s']:.3f} | {_ratio(f['pairs_per_s_with_reference'], d['pairs_per_s'])} "
        f"(steps only: {_ratio(f['pairs_per_s'], d['pairs_per_s'])}) | {d['real_tokens_per_s']:,.1f} | {d['peak_rss_mib']:,.0f} | {d['timed_s']:.1f} |"),
        "",
        # Runs measured before ftune moved its reference pass into the steps (reference_s > 0) say what they measured.
        (f"ftune computed the reference log-probs once, before training ({f['reference_s']:.1f} s for {f.get('reference_pairs', 0):.0f} "
         "pairs, median); TRL runs the reference forward (the model with its adapter disabled) inside every step. \"incl. "
         "reference\" charges each of ftune's timed pairs its share of that pass." if f.get("reference_s") else
         "Both sides score the reference inside the steps: ftune each pair the first time a step reaches it (the adapter "
         "switched off, or a frozen copy of the starting adapter), TRL the model with its adapter disabled in every step."),
        "",
    ]


def _rm_section(report: dict) -> list[str]:
    rm = report.get("rm")
    if not rm:
        return ["## Reward model", "", "skipped", ""]
    f, d = rm["medians"]["ftune"], rm["medians"]["TRL defaults"]
    s = _settings(report, "rm")
    trl = rm["runs"]["TRL defaults"][0].get("trl_settings", {})
    return [
        "## Reward model: preference pairs per second and peak memory",
        "",
        (f"{rm['pairs']} pairs of `{Path(rm['source']).name}`, batch {rm['batch_size']} pairs, same LoRA, lr {s.get('rm_learning_rate')} "
         f"(TRL's default), max length {s['max_length']}; medians of {s['repeats']} runs. TRL: `RewardTrainer` with a one-output "
         f"`AutoModelForSequenceClassification` and LoRA task SEQ_CLS, its defaults otherwise (gradient_checkpointing="
         f"{trl.get('gradient_checkpointing')}, chosen and rejected padded to the longest in one batch); ftune: the `rm` stage, "
         "both sequences of each pair packed into rows and the score head read once per sequence."),
        "",
        "| side | pairs/s | ftune is | real tokens/s | token slots/step | peak RSS MiB | timed s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {name} | {v['pairs_per_s']:.3f} | {_ratio(f['pairs_per_s'], v['pairs_per_s']) if name != 'ftune' else ''} | "
          f"{v['real_tokens_per_s']:,.1f} | {v['token_slots'] / max(v['timed_steps'], 1):,.0f} | {v['peak_rss_mib']:,.0f} | {v['timed_s']:.1f} |"
          for name, v in (("ftune", f), ("TRL defaults", d))],
        "",
    ]


def _grpo_section(report: dict) -> list[str]:
    grpo = report.get("grpo")
    if not grpo or "summary" not in grpo:
        return ["## GRPO", "", "skipped", ""]
    s, summary = grpo["settings"], grpo["summary"]
    sides = [side for side in ("ftune", "trl") if side in summary]
    lines = [
        "## GRPO: completions per second and peak memory (scripts/bench_grpo.py)",
        "",
        (f"The demo model on the shipped arithmetic prompts, {s['prompts']} prompts x {s['generations']} completions per step, "
         f"completions of at most {s['length']} tokens, the same two rewards (exact answer, answer format) and LoRA on both "
         f"sides, loss dapo; 1 warm-up + {s['steps']} timed steps per run, medians of {s['repeats']} run(s) per side. TRL: "
         "`GRPOTrainer` with its GRPOConfig defaults otherwise."),
        "",
        "| side | completions/s | ftune is | peak RSS MiB |",
        "|---|---:|---:|---:|",
    ]
    for side in sides:
        v = summary[side]
        ratio = "" if side == "ftune" or "ftune" not in summary else _ratio(summary["ftune"]["completions_per_s"], v["completions_per_s"])
        lines.append(f"| {'ftune' if side == 'ftune' else 'TRL defaults'} | {v['completions_per_s']:.3f} | {ratio} | {v['peak_rss_mib']:,.0f} |")
    if grpo.get("load"):
        lines += ["", f"Load average during the runs: {fmt_load(grpo['load'])}."]
    return lines + [""]


def _merge_export_section(report: dict) -> list[str]:
    lines = []
    for key, title in (("merge", "Merge (scripts/bench_merge.py)"), ("export", "GGUF export (scripts/bench_export.py)")):
        part = report.get(key)
        lines += [f"## {title}", ""]
        if part is None:
            lines += ["skipped (--skip)", ""]
        elif "skipped" in part:
            lines += [part["skipped"], ""]
        elif part["exit"] != 0:
            lines += [f"failed (exit {part['exit']}):", "", "```", part["stderr_tail"], "```", ""]
        else:
            lines += ["```", part["stdout"], "```", ""]
            if key == "merge" and report.get("model"):
                model = report["model"]
                lines += [(f"Largest base shard {model['largest_shard_mib']:,.0f} MiB; a float32 rank-16 adapter on every linear layer "
                          f"{model['adapter_fp32_mib']:,.0f} MiB."), ""]
    return lines


def _startup_section(report: dict) -> list[str]:
    start = report.get("startup")
    if not start:
        return []
    base = start["python -c pass"]["median_s"]
    lines = ["## CLI start-up", "", "| command | median ms | over `python -c pass` ms |", "|---|---:|---:|"]
    for name, v in start.items():
        lines.append(f"| `{name}` | {v['median_s'] * 1000:.0f} | {(v['median_s'] - base) * 1000:.0f} |")
    return lines + ["", f"Medians of {len(next(iter(start.values()))['runs'])} runs each.", ""]


def _gpu_section(report: dict) -> list[str]:
    gpu = report.get("gpu")
    lines = ["## GPU", ""]
    if gpu is None:
        return lines + ["skipped (--skip gpu)", ""]
    if "skipped" in gpu:
        return lines + [(f"Skipped: {gpu['skipped']}. On a CUDA machine `make bench` also trains a 1B Llama-architecture model "
                        "(random weights, Llama-3.2-1B shape) and reports its share of the GPU's measured bf16 matmul peak, "
                        "and the QLoRA peak memory of an 8B (Llama-3.1-8B shape) configuration."), ""]
    sys.path.insert(0, str(SCRIPTS))
    import bench_gpu

    return lines + bench_gpu.markdown(gpu) + [""]


def _method_section(report: dict) -> list[str]:
    sft = report.get("sft")
    trl = sft["runs"]["TRL defaults"][0]["trl_settings"] if sft else {}
    trl_p = sft["runs"]["TRL packing"][0]["trl_settings"] if sft else {}
    return [
        "## How it was measured",
        "",
        ("- Every run is a fresh process (`scripts/bench_ftune.py`, `scripts/bench_trl.py`); peak RSS is that process's VmHWM "
        "read at the end of the last training step (model loading included), so it is per run. Sides run interleaved "
        "(ftune, TRL defaults, TRL packing, ftune, ...)."),
        ("- Timed window: from the end of optimizer step 1 (warm-up) to the end of the last step, the same on both sides; "
        "model loading, tokenization and TRL's dataset preparation are outside it."),
        ("- ftune: the real stage, `ftune.stages.sft.run` / `ftune.stages.dpo.run`, on a recipe written for the run (data as a "
        "local JSONL, `max_steps`, `logging_steps: 1`, `eval_fraction: 0`, no checkpoints, no evaluation prompts). Its "
        "metrics.jsonl logs `tokens_per_s` (trained tokens so far / seconds since just before step 1); with each step's trained "
        "tokens counted from its batches (targets != -100, already shifted), the end time of step k is "
        "T_k / tokens_per_s_k, which gives the timed window. A hook on the progress reporter times the same steps as a check "
        "(`hook_seconds` in bench.json)."),
        "- TRL: `SFTTrainer` / `DPOTrainer` with a LoRA `peft_config`, the float32 model object, and TRL's defaults except: "
        "`bf16=False` (TRL defaults to bf16 autocast; this benchmark is float32), `max_length`, `per_device_train_batch_size`, "
        "`learning_rate`, `max_steps`, `output_dir`"
        + (f"; TRL's own defaults kept include gradient_checkpointing={trl.get('gradient_checkpointing')}, "
           f"lr_scheduler_type={trl.get('lr_scheduler_type')}, optim={trl.get('optim')}, attention {trl.get('attn_implementation')}" if trl else "")
        + ". Step ends come from a `TrainerCallback.on_step_end`; each batch's trained tokens from a pass-through wrapper "
        "around TRL's collator (`labels[:, 1:] != -100`).",
        ("- Loss masking: ftune's alpaca rows train the answer and its `<|im_end|>`. TRL gets the same conversations as "
        "conversational prompt/completion rows (`completion_only_loss` left at its default, None, which means on for "
        f"prompt/completion data; assistant_only_loss={trl.get('assistant_only_loss', False)}), so it trains the answer, "
        "`<|im_end|>` and the newline the template adds after it: one token more per sample, counted on TRL's side."),
        ("- TRL packing: `packing=True, padding_free=True` (packing_strategy "
        f"{trl_p.get('packing_strategy', 'bfd')}, the default): rows packed to max_length and flattened into one sequence with "
        "position ids. ftune packs by default (best-fit decreasing into rows of max_length, position ids restart per sample)."),
        ("- Samples: every side gets the same rows, and its timed steps cover about the same number of samples: a packed "
        "step (ftune, TRL packing) holds several samples per row, so TRL defaults, one sample per row, runs proportionally "
        "more steps. Throughput is compared in trained tokens per second."),
        ("- Passes: ftune runs each step's rows through the model one row (512 tokens) at a time and sums the gradients, "
        "its CPU default (`training.tokens_per_pass`, unset: `data.max_length` on a CPU); the update is the same as one "
        "pass over the 8 rows (tests/test_sft.py checks it), the peak memory is a row's activations instead of 8 rows'. "
        "TRL runs each micro-batch in one pass."),
        ("- Gradient checkpointing: off in ftune's recipe default (`training.gradient_checkpointing: false`), on in TRL's "
        f"defaults (it recomputes the forward pass in the backward, about a third more arithmetic). The side \"{FTUNE_CKPT}\" "
        "runs ftune with it on, to compare like with like (`--with-checkpointing`)."),
        ("- Repeats: repeat i uses seed 42 + i on every side (data order, packing order, LoRA initialisation), so the "
        "repeats time different batches; the table gives medians over them."),
        ("- Peak RSS includes the float32 weights (~0.5 GiB for the demo model), the libraries (~0.4 GiB) and, above all, "
        "the activations kept for the backward pass."),
        "",
    ]

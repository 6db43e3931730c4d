"""`make bench`: ftune against TRL, side by side, on this machine; writes BENCHMARKS.md and bench.json.

    python scripts/bench.py                        # the defaults (about 25 min on 2 CPU cores, and 25 more for the data part)
    python scripts/bench.py --steps 6 --repeats 3  # steadier medians, about 3x longer
    python scripts/bench.py --skip dpo merge export
    python scripts/bench.py --skip startup sft dpo grpo merge export gpu   # the reward-model part alone
    python scripts/bench.py --report-only bench.json   # rewrite BENCHMARKS.md from earlier figures
    python scripts/bench.py --report-only bench.json --add-part rm=other/bench.json grpo=grpo.json   # parts of other runs

What is measured, and how (BENCHMARKS.md repeats this next to the figures):
- SFT: trained tokens per second (tokens whose label is not -100 after the shift, the
  tokens the loss sees) and peak resident memory, ftune's `sft` stage against TRL's
  SFTTrainer with its defaults and with its own packing (packing=True, padding_free=True);
  `--with-checkpointing` adds ftune with gradient checkpointing on (TRL's default), to
  compare memory like with like.
  Same demo model, rows, LoRA (r 16, alpha 32, all linear layers, dropout 0), learning
  rate, batch (8 rows), max length (512), float32, and answer-only loss on both sides.
  Every side's timed steps cover about the same number of samples: TRL defaults (one
  sample per row) runs more steps than the packed sides.
- DPO: preference pairs per second and peak memory, ftune's `dpo` stage against TRL's
  DPOTrainer defaults, beta 0.1, batch 4 pairs, max length 512.
- RM: preference pairs per second and peak memory, ftune's `rm` stage against TRL's
  RewardTrainer defaults (a one-output AutoModelForSequenceClassification, LoRA with
  task SEQ_CLS), the DPO part's pairs, batch 4 pairs, lr 1e-4 (TRL's default), max length 512.
- Each measured run is its own process (its peak RSS is its own), the sides are
  interleaved (A, B, C, A, B, C, ...), and the table gives medians over the repeats.
  When other processes are using the CPUs, each run gets one torch thread (see pick_threads).
  Model loading and tokenization are not timed; the first optimizer step of every run is
  warm-up, and the window runs from its end to the end of the last step.
- GRPO: scripts/bench_grpo.py (completions per second and peak memory against TRL's GRPOTrainer).
- Data: scripts/bench_data.py: data preparation of 100k and 1M generated rows (scripts/make_big_dataset.py),
  `ftune inspect` against TRL's SFTTrainer dataset preparation with packing, and training memory with a
  1M-row cached set against a 10k-row one (it needs ../shared/data/ to generate the rows).
- merge and GGUF export: scripts/bench_merge.py and scripts/bench_export.py, run as they are.
- CLI start-up: `ftune --help` and `ftune validate`, against `python -c pass`.
- The CPU's float32 matmul peak, and the share of it ftune reaches; on a CUDA GPU, a 1B
  Llama-architecture model and the QLoRA peak memory of an 8B one (scripts/bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import bench_report
from bench_common import (
    ALPACA, ROOT, SCRIPTS, SHARED_DATA, _step_figures, dpo_rows, medians, run_child, say,
    sft_rows, summarize_ftune_sft, summarize_trl, write_jsonl,
)

PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors", "numpy", "llama_cpp_python", "ftune"]

# The settings both sides share; each is passed by name to ftune's recipe and to TRL's config.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SFT_LR, DPO_LR, BETA = 2.0e-4, 5.0e-5, 0.1
RM_LR = 1.0e-4  # TRL's RewardConfig default
SEED = 42  # repeat i uses seed 42 + i on every side, so repeats draw different batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="SFT rows given to every side (default 400)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run, after 1 warm-up step (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side; the table shows medians (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="SFT rows per step (default 8); DPO uses half, in pairs")
    parser.add_argument("--max-length", type=int, default=512, help="longest sequence in tokens (default 512)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every measured process; 0 (default): 1 when other processes are already "
                             "using more than half a core, else torch's default (one per core)")
    parser.add_argument("--startup-runs", type=int, default=5, help="runs of each start-up command (default 5)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["startup", "sft", "dpo", "rm", "grpo", "data", "merge", "export", "gpu"],
                        help="parts to leave out")
    parser.add_argument("--data-rows", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="sizes for the data-preparation part (default 100000 1000000)")
    parser.add_argument("--data-repeats", type=int, default=1, help="runs of each side per size in the data part (default 1)")
    parser.add_argument("--profile", action="store_true",
                        help="after the SFT runs, profile one more ftune run (torch.profiler, steps after the first) "
                             "and put its top operations in BENCHMARKS.md")
    parser.add_argument("--with-checkpointing", action="store_true",
                        help="also run ftune with gradient checkpointing on (TRL's default), to compare memory like with like")
    parser.add_argument("--out", type=Path, default=ROOT, help="folder for BENCHMARKS.md and bench.json (default: the repo)")
    parser.add_argument("--report-only", type=Path, metavar="BENCH_JSON",
                        help="measure nothing: rewrite BENCHMARKS.md from an earlier bench.json")
    parser.add_argument("--add-part", nargs="+", default=[], metavar="PART=FILE",
                        help="with --report-only: take PART (e.g. rm, grpo, data) from FILE, another run's bench.json or the "
                             "part's own JSON (bench_grpo.py --json, bench_data.py --json); the report names that run")
    args = parser.parse_args()
    if args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        report = json.loads(args.report_only.read_text())
        for item in args.add_part:
            add_part(report, item, parser)
        write_report(report, args.out)
        return
    if args.add_part:
        parser.error("--add-part goes with --report-only")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    command = "python scripts/bench.py" + "".join(f" {a}" for a in sys.argv[1:])

    report: dict = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "load_before": os.getloadavg(), "machine": machine_info(), "versions": package_versions(),
                    "settings": {"rows": args.rows, "steps": args.steps, "warmup_steps": 1, "repeats": args.repeats,
                                 "batch_size": args.batch_size, "dpo_batch_size": args.batch_size // 2,
                                 "max_length": args.max_length, "lora": LORA, "sft_learning_rate": SFT_LR,
                                 "dpo_learning_rate": DPO_LR, "beta": BETA, "rm_learning_rate": RM_LR, "dtype": "float32"}}
    started = time.perf_counter()
    report["threads"] = pick_threads(args.threads)
    # Every process started from here on (the measured runs, merge and export) inherits these.
    os.environ.update({"OMP_NUM_THREADS": str(report["threads"]["threads"]), "MKL_NUM_THREADS": str(report["threads"]["threads"])})
    say(f"ftune bench: {command}\nload average before: {bench_report.fmt_load(report['load_before'])}\n"
        f"threads per measured process: {report['threads']['threads']} ({report['threads']['why']})")
    report["matmul_peak"] = matmul_peak(report["threads"]["threads"])
    say(f"fp32 matmul peak: {report['matmul_peak']['gflops']:.1f} GFLOP/s")
    if "startup" not in args.skip:
        report["startup"] = measure_startup(args.startup_runs)
    with tempfile.TemporaryDirectory(prefix="ftune-bench-") as tmp:
        tmp = Path(tmp)
        from ftune.modeling.models import demo_model_dir

        model_dir = demo_model_dir()
        report["model"] = model_facts(model_dir)
        if "sft" not in args.skip:
            report["sft"] = bench_sft(tmp / "sft", model_dir, args)
        if "dpo" not in args.skip:
            report["dpo"] = bench_dpo(tmp / "dpo", model_dir, args)
        if "rm" not in args.skip:
            report["rm"] = bench_rm(tmp / "rm", model_dir, args)
        if "grpo" not in args.skip:  # scripts/bench_grpo.py: ftune grpo against TRL's GRPOTrainer
            out = tmp / "grpo.json"
            subprocess.run([sys.executable, str(SCRIPTS / "bench_grpo.py"), "--steps", str(args.steps), "--repeats", str(args.repeats),
                            "--json", str(out)], check=True)
            report["grpo"] = json.loads(out.read_text())
        if "data" not in args.skip and not ALPACA.is_file():
            say(f"data: {SHARED_DATA} is not there (the rows are generated from it), skipped")
            report["data"] = {"skipped": f"{SHARED_DATA} does not exist: scripts/make_big_dataset.py generates the rows from it"}
        elif "data" not in args.skip:  # scripts/bench_data.py: ftune's data preparation against TRL's, training memory
            out = tmp / "data.json"
            subprocess.run([sys.executable, str(SCRIPTS / "bench_data.py"), "--rows", *map(str, args.data_rows),
                            "--repeats", str(args.data_repeats), "--threads", str(report["threads"]["threads"]), "--json", str(out)],
                           check=True)
            report["data"] = json.loads(out.read_text())
        if "merge" not in args.skip:
            report["merge"] = run_script("bench_merge.py", parse_merge)
        if "export" not in args.skip:
            report["export"] = run_script("bench_export.py", None)
        if "gpu" not in args.skip:
            report["gpu"] = bench_gpu(tmp / "gpu")
    report["load_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")  # first: the figures are the costly part
    write_report(report, args.out)


def add_part(report: dict, item: str, parser) -> None:
    """--add-part PART=FILE: one part of another run into this report, with that run's command and date."""
    part, _, file = item.partition("=")
    if part not in bench_report.PARTS or not file:
        parser.error(f"--add-part {item}: expected PART=FILE with PART one of {', '.join(bench_report.PARTS)}")
    try:
        other = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"--add-part {item}: cannot read {file}: {exc}")
    # A whole bench.json holds the part under its name; a part's own JSON (bench_grpo.py, bench_data.py --json) is the part.
    whole = isinstance(other.get("machine"), dict) and part in other
    if isinstance(other.get("machine"), dict) and not whole:
        parser.error(f"--add-part {item}: {file} is a bench.json without a '{part}' part")
    report[part] = other[part] if whole else other
    started = other.get("started") or datetime.fromtimestamp(Path(file).stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    report.setdefault("parts_from", {})[part] = {"file": file, "command": other.get("command"), "started": started,
                                                 "settings": other.get("settings") if whole else None}


def write_report(report: dict, out: Path) -> None:
    """Judge the targets and write BENCHMARKS.md (and bench.json with the verdicts) from a report."""
    report["targets"] = bench_report.judge_targets(report)
    markdown = bench_report.render_markdown(report)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "BENCHMARKS.md").write_text(markdown)
    print(markdown)
    say(f"wrote {out / 'BENCHMARKS.md'} and {out / 'bench.json'} ({report['wall_s'] / 60:.1f} min of measuring)")


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    flags = ""
    if Path("/proc/cpuinfo").exists():
        words = set(Path("/proc/cpuinfo").read_text().split())
        flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in words)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1),
            "cpu_flags": flags, "gpu": gpu, "python": platform.python_version(), "os": platform.platform()}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            found[name] = None
    return found


def busy_cores(seconds: float = 3.0) -> float:
    """Cores' worth of CPU time other processes used over the last `seconds` (from /proc/stat).

    The load average lags by minutes (a run that just ended still counts), so the decision
    looks at what the CPUs are doing now.
    """
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    if not Path("/proc/stat").exists():
        return os.getloadavg()[0]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    share = 1 - (idle1 - idle0) / max(total1 - total0, 1)
    return share * (os.cpu_count() or 1)


def pick_threads(asked: int) -> dict:
    """Threads for every measured process, and why.

    With two cores and another busy process, torch's two OpenMP threads keep meeting at
    barriers where one waits (spinning) for the other to be scheduled again: the same
    training step then takes 5 s or 45 s from one run to the next (measured here while
    other jobs ran). One thread per process gives steady figures on a shared machine.
    """
    cores = os.cpu_count() or 1
    if asked:
        return {"threads": asked, "why": "--threads"}
    busy = busy_cores()
    if busy > 0.5:
        return {"threads": 1, "why": f"other processes were using {busy:.1f} of {cores} cores"}
    return {"threads": cores, "why": f"one per core; other processes were using {busy:.1f} of {cores} cores"}


def matmul_peak(threads: int, n: int = 2048, tries: int = 8) -> dict:
    """Best float32 GFLOP/s of n x n torch.matmul over a few tries (2 n^3 FLOPs each), on `threads` threads."""
    import torch

    torch.set_num_threads(threads)

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return {"n": n, "tries": tries, "gflops": 2 * n**3 / best / 1e9, "threads": torch.get_num_threads()}


def model_facts(model_dir: Path) -> dict:
    """Parameter counts of the demo model, from its config (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    lora_params = sum(LORA["r"] * (m.in_features + m.out_features) for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and m is not head)
    largest_shard = max((f.stat().st_size for f in model_dir.glob("*.safetensors")), default=0)
    return {"dir": str(model_dir), "type": config.model_type, "params": params, "lora_params": lora_params,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)), "vocab": config.vocab_size,
            "largest_shard_mib": largest_shard / 2**20, "adapter_fp32_mib": lora_params * 4 / 2**20}


# --------------------------------------------------------------------------- start-up


def measure_startup(runs: int) -> dict:
    ftune = Path(sys.executable).parent / "ftune"
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "ftune --help": [str(ftune), "--help"],
        "ftune validate recipes/demo/sft.yaml": [str(ftune), "validate", str(ROOT / "recipes/demo/sft.yaml")],
    }
    out = {}
    for name, argv in commands.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"`{name}` failed:\n{done.stdout}{done.stderr}")
        out[name] = {"median_s": statistics.median(times), "runs": times}
        say(f"start-up {name}: {out[name]['median_s'] * 1000:.0f} ms")
    return out


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


# --------------------------------------------------------------------------- merge, export, GPU


def run_script(name: str, parse) -> dict:
    """Run another benchmark script as it is; keep its output (and its figures when they parse)."""
    path = SCRIPTS / name
    if not path.is_file():
        say(f"{name}: not there, skipped")
        return {"skipped": f"scripts/{name} does not exist yet"}
    say(f"running scripts/{name} ...")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "FTUNE_NO_PROGRESS": "1"})
    out = {"exit": done.returncode, "wall_s": time.perf_counter() - start, "stdout": done.stdout.strip(),
           "stderr_tail": "\n".join(done.stderr.strip().splitlines()[-20:])}
    if done.returncode == 0 and parse is not None:
        try:
            out["parsed"] = parse(done.stdout)
        except (ValueError, KeyError, IndexError, StopIteration) as exc:
            out["parse_error"] = f"could not read its table: {exc}"
    return out


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """The rows of a fixed-width table whose header starts with 'method' or 'step': {row name: {column: value}}.

    Columns are split on runs of two or more spaces, so names may hold single spaces.
    """
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(r"^(method|step)\s{2,}", line))
    columns = re.split(r"\s{2,}", lines[at].strip())[1:]
    rows = {}
    for line in lines[at + 1:]:
        found = re.match(r"^(\S.*?)\s{2,}(-?[\d.]+(?:\s+-?[\d.]+)*)\s*$", line)
        if found and len(found.group(2).split()) == len(columns):
            rows[found.group(1).strip()] = dict(zip(columns, map(float, found.group(2).split())))
    return rows


def parse_merge(text: str) -> dict:
    """bench_merge.py's figures for ftune and peft: seconds, and the memory the merge adds (MiB)."""
    rows = parse_table(text)
    columns = list(next(iter(rows.values())))
    seconds = next(c for c in columns if re.search(r"(^|\s)(s|seconds)$", c))
    memory = next((c for c in columns if re.search(r"merge MiB|added|over imports", c)), None) or next(c for c in columns if "MiB" in c)
    pick = {name: {"seconds": row[seconds], "mib": row[memory]} for name, row in rows.items()}
    return {"rows": rows, "seconds_column": seconds, "memory_column": memory,
            "ftune": next(v for k, v in pick.items() if k.startswith("ftune")), "peft": next(v for k, v in pick.items() if "peft" in k)}


def bench_gpu(tmp: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        say("GPU: no CUDA device, skipped")
        return {"skipped": "no CUDA GPU on this machine (torch.cuda.is_available() is False)"}
    sys.path.insert(0, str(SCRIPTS))
    import bench_gpu

    return bench_gpu.run(tmp)


if __name__ == "__main__":
    main()

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
  When other processes are using the CPUs, each run gets one torch thread (see bench_machine.pick_threads).
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

This file runs the parts and writes the report; the parts live beside it: bench_machine.py (the machine,
threads, matmul peak, start-up), bench_stages.py (SFT, DPO, RM against TRL), bench_report.py (targets and
BENCHMARKS.md), bench_common.py (what they share).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import bench_report
from bench_common import ALPACA, LORA, ROOT, SCRIPTS, SHARED_DATA, say
from bench_machine import machine_info, matmul_peak, measure_startup, model_facts, package_versions, pick_threads
from bench_stages import BETA, DPO_LR, RM_LR, SFT_LR, bench_dpo, bench_rm, bench_sft


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

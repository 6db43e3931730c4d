"""Data side of `make bench`: ftune's data preparation against TRL's SFTTrainer dataset preparation, and training memory.

    python scripts/bench_data.py                                  # 100k and 1M rows, training memory 10k vs 1M
    python scripts/bench_data.py --rows 10000 100000 --repeats 2 --json /tmp/data.json
    python scripts/bench_data.py --rows 100000 --no-training      # preparation only

Rows: alpaca-style rows written by scripts/make_big_dataset.py (seed 0; the smaller sets are
prefixes of the larger), so both sides read the same JSONL file.

Preparation, per size, the sides interleaved (ftune, TRL, ftune, TRL, ...), each run its own process:
- ftune: the command a user runs, `ftune inspect RECIPE --json`, with FTUNE_CACHE a fresh, empty
  folder (ftune keeps its tokenized data under $FTUNE_CACHE/data, so nothing is reused); the
  recipe names the demo model's folder (not `demo`, whose conversion would land in that cache),
  max_length, eval_fraction 0 (every row is tokenized, as on TRL's side), packing on (its
  default), and `data.num_proc` when the recipe has that field.
- TRL: what a user of SFTTrainer runs before training, with HF_DATASETS_CACHE a fresh, empty
  folder: `datasets.load_dataset("json", ...)`, a `map` from the alpaca fields to conversational
  prompt/completion rows (the conversation ftune builds from an alpaca row: instruction and
  input in the user turn, output as the answer), then the function SFTTrainer.__init__ calls to
  prepare its train set, `SFTTrainer._prepare_dataset`, with packing=True (TRL's bfd packing),
  the same tokenizer and max_length and `dataset_num_proc` = ftune's process count. It is
  called on an SFTTrainer instance made without __init__ that holds the three attributes the
  function reads (the tokenizer, chat_template None and completion_only_loss True, as __init__
  sets them for prompt/completion rows without assistant_only_loss), so no model is loaded.
- Each run's wall time is the process's, from start to exit (imports included, the same on both
  sides). Memory is sampled every 0.1 s over the process and every process it starts (TRL's
  `num_proc` workers, ftune's): peak RSS of the main process (its VmHWM), and the peak of the
  summed RSS of all of them (`peak_rss_mib`, the figure the goal uses; pages that forked workers
  share with their parent are counted in each, so with workers it is an upper bound).

Training memory: `ftune sft RECIPE` for a few steps (--train-steps, default 3) on the largest
size and on a small set (--train-small rows, default 10,000), each after an `ftune inspect` of
the same recipe has built its cache; peak RSS of the training process, and the ratio.

Prints the figures; --json writes them (bench.py stores them as the report's `data` part).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_common import medians  # the one median-per-figure rule of make bench

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
FTUNE = Path(sys.executable).parent / "ftune"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SEED = 0  # make_big_dataset.py's seed: every size is a prefix of the largest


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measuring a process tree


def _tree(pid: int) -> list[int]:
    """pid and its descendants now (Linux /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo += [int(c) for c in handle.read().split()]
        except OSError:
            continue  # it ended between two reads
    return out


def _status_kib(pid: int, *keys: str) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name = line.split(":", 1)[0]
                if name in keys:
                    found[name] = int(line.split()[1])
    except OSError:
        pass
    return found


def _pss_kib(pid: int) -> int:
    """Proportional set size: each shared page divided among the processes that map it (so a tree's sum counts it once)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(argv: list[str], env: dict, log: Path, interval: float = 0.1) -> dict:
    """Run argv; its wall time, exit code, stdout, and its process tree's memory, sampled every `interval` s."""
    peak = {"main_hwm_kib": 0, "tree_rss_kib": 0, "tree_pss_kib": 0, "processes": 1}
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pids = _tree(child.pid)
                main = _status_kib(child.pid, "VmHWM").get("VmHWM", 0)
                total = sum(_status_kib(p, "VmRSS").get("VmRSS", 0) for p in pids)
                peak["main_hwm_kib"] = max(peak["main_hwm_kib"], main)
                peak["tree_rss_kib"] = max(peak["tree_rss_kib"], total)
                peak["tree_pss_kib"] = max(peak["tree_pss_kib"], sum(_pss_kib(p) for p in pids))
                peak["processes"] = max(peak["processes"], len(pids))
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return {"wall_s": wall, "exit": child.returncode, "stdout": stdout, "main_peak_rss_mib": peak["main_hwm_kib"] / 1024,
            "peak_rss_mib": max(peak["tree_rss_kib"], peak["main_hwm_kib"]) / 1024, "processes": peak["processes"],
            "peak_pss_mib": peak["tree_pss_kib"] / 1024,
            # the largest single process of the tree, from the kernel (not sampled): a check on the samples
            "max_process_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def _check(result: dict, what: str, log: Path) -> None:
    if result["exit"] != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{what} failed (exit {result['exit']}); {log} ends:\n{tail}")


# --------------------------------------------------------------------------- the two sides


def ftune_has_num_proc() -> bool:
    from ftune.recipe import DataSection

    return "num_proc" in DataSection.model_fields


def write_recipe(path: Path, data: Path, model_dir: Path, args, *, out: Path) -> Path:
    """One recipe for `ftune inspect` and `ftune sft` (the data section, and so the cache key, is the same)."""
    data_section = {"train": [{"path": str(data)}], "eval_fraction": 0.0, "max_length": args.max_length}
    if ftune_has_num_proc():
        data_section["num_proc"] = args.num_proc
    recipe = {
        "stage": "sft",
        "base_model": {"name": str(model_dir), "dtype": "float32"},
        "data": data_section,
        "adapter": {"method": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"], "target_modules": "all-linear"},
        "training": {"learning_rate": 2.0e-4, "batch_size": args.train_batch_size, "max_steps": args.train_steps, "logging_steps": 1,
                     "seed": 42},
        "evaluation": {"prompts": []},
        "output": {"dir": str(out)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return path


def env_for(tmp: Path, threads: int) -> dict:
    """A process's environment: its own empty caches, `threads` torch threads, no progress bars."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FTUNE_CACHE": str(tmp / "ftune-cache"), "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
            "FTUNE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_ftune_prep(data: Path, model_dir: Path, folder: Path, args) -> dict:
    recipe = write_recipe(folder / "recipe.yaml", data, model_dir, args, out=folder / "run")
    result = measure([str(FTUNE), "inspect", str(recipe), "--json"], env_for(folder, args.threads), folder / "ftune.log")
    _check(result, "ftune inspect", folder / "ftune.log")
    numbers = json.loads(result.pop("stdout"))
    result.update({"samples": numbers["train_samples"], "tokens": numbers["train_tokens"], "loss_tokens": numbers["loss_tokens"],
                   "packed_rows": numbers["packed_rows"], "truncated": numbers["truncated"],
                   "dropped": numbers["dropped_too_long"] + numbers["dropped_no_loss"]})
    return result


def run_trl_prep(data: Path, model_dir: Path, folder: Path, args) -> dict:
    spec = {"data": str(data), "model_dir": str(model_dir), "max_length": args.max_length, "num_proc": args.num_proc,
            "output_dir": str(folder / "trl-out")}
    result = measure([sys.executable, __file__, "--child-trl", json.dumps(spec)], env_for(folder, args.threads), folder / "trl.log")
    _check(result, "TRL dataset preparation", folder / "trl.log")
    lines = [line for line in result.pop("stdout").splitlines() if line.startswith("RESULT ")]
    result.update(json.loads(lines[-1].removeprefix("RESULT ")))
    return result


def child_trl(spec: dict) -> None:
    """In its own process: TRL's SFTTrainer dataset preparation, phase by phase."""
    marks = {"start": time.perf_counter()}
    import pyarrow.compute as pc
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    disable_progress_bar()
    marks["imports"] = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    # datasets runs `map` in a pool of workers for any num_proc, 1 included; None (TRL's default) maps in this process.
    num_proc = spec["num_proc"] if spec["num_proc"] > 1 else None
    args = SFTConfig(output_dir=spec["output_dir"], packing=True, max_length=spec["max_length"], dataset_num_proc=num_proc,
                     bf16=False, report_to=[])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    marks["load"] = time.perf_counter()

    def to_conversation(row: dict) -> dict:  # ftune's alpaca conversion (ftune/data/formats.py _alpaca)
        user = f"{row['instruction']}\n\n{row['input']}" if (row.get("input") or "").strip() else row["instruction"]
        return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": row["output"]}]}

    dataset = dataset.map(to_conversation, remove_columns=dataset.column_names, num_proc=num_proc)
    marks["convert"] = time.perf_counter()
    trainer = SFTTrainer.__new__(SFTTrainer)  # the attributes _prepare_dataset reads, as __init__ sets them
    trainer._tokenizer, trainer.chat_template, trainer.completion_only_loss = tokenizer, None, True
    packed = trainer._prepare_dataset(dataset, tokenizer, args, args.packing, None, "train")
    marks["prepare"] = time.perf_counter()
    # Counted after the timed phases, a slice at a time: the whole labels column at once would be the run's peak.
    tokens = loss_tokens = 0
    for part in packed.with_format("arrow").iter(batch_size=4096):
        tokens += pc.sum(pc.list_value_length(part["input_ids"])).as_py()
        loss_tokens += pc.sum(pc.not_equal(pc.list_flatten(part["labels"]), -100)).as_py()
    result = {"phases_s": {"imports": marks["imports"] - marks["start"], "load": marks["load"] - marks["imports"],
                           "convert": marks["convert"] - marks["load"], "prepare": marks["prepare"] - marks["convert"]},
              "samples": len(dataset), "packed_rows": len(packed), "tokens": tokens, "loss_tokens": loss_tokens,
              "settings": {"packing": args.packing, "packing_strategy": args.packing_strategy, "dataset_num_proc": args.dataset_num_proc,
                           "max_length": args.max_length, "shuffle_dataset": args.shuffle_dataset}}
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parts


def make_rows(rows: int, folder: Path) -> Path:
    path = folder / f"sft-{rows}.jsonl"
    if not path.is_file():
        subprocess.run([sys.executable, str(SCRIPTS / "make_big_dataset.py"), "--rows", str(rows), "--out", str(path),
                        "--seed", str(SEED)], check=True)
    return path


def bench_prep(sizes: list[int], model_dir: Path, tmp: Path, rows_dir: Path, args) -> dict:
    out = {}
    for rows in sizes:
        data = make_rows(rows, rows_dir)
        runs: dict[str, list[dict]] = {"ftune": [], "TRL": []}
        for repeat in range(args.repeats):
            for side, run in (("ftune", run_ftune_prep), ("TRL", run_trl_prep)):
                folder = tmp / f"prep-{rows}-{side}-{repeat}"
                load = os.getloadavg()[0]
                result = run(data, model_dir, folder, args)
                result["load_1min_at_start"] = load
                runs[side].append(result)
                say(f"  prep {rows:,} rows, {side} #{repeat + 1}: {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mib']:,.0f} MiB "
                    f"(main {result['main_peak_rss_mib']:,.0f}, {result['processes']} processes), {result['samples']:,} samples, "
                    f"{result['tokens']:,} tokens in {result['packed_rows']:,} rows")
                _remove_caches(folder, keep_ftune=side == "ftune" and repeat == 0 and rows == max(sizes) and not args.no_training)
        out[str(rows)] = {"rows": rows, "runs": runs, "medians": medians(runs)}
    return out


def bench_training(large: int, small: int, model_dir: Path, tmp: Path, rows_dir: Path, args) -> dict:
    """Peak RSS of `ftune sft` (a few steps) with the large set's cache against the small set's, the two interleaved."""
    sets, runs = {}, {str(small): [], str(large): []}
    for rows in (small, large):  # each set's cache is built once, by `ftune inspect` of the same recipe
        folder = tmp / f"train-{rows}"
        recipe = write_recipe(folder.with_suffix(".yaml"), make_rows(rows, rows_dir), model_dir, args, out=folder / "run")
        env = env_for(folder, args.threads)
        prepared = tmp / f"prep-{rows}-ftune-0" / "ftune-cache"
        if prepared.is_dir():  # the preparation part's first ftune run built this very cache (same data section)
            env["FTUNE_CACHE"] = str(prepared)
        built = measure([str(FTUNE), "inspect", str(recipe), "--json"], env, tmp / f"train-{rows}-inspect.log")
        _check(built, "ftune inspect (building the cache)", tmp / f"train-{rows}-inspect.log")
        sets[rows] = (recipe, env, built["wall_s"])
    for repeat in range(args.repeats):
        for rows, (recipe, env, build_s) in sets.items():
            log = tmp / f"train-{rows}-{repeat}.log"
            result = measure([str(FTUNE), "sft", str(recipe), "--overwrite"], env, log)
            _check(result, "ftune sft", log)
            result.pop("stdout")
            result["inspect_s"] = build_s  # building the cache, or reading it when the preparation part built it
            runs[str(rows)].append(result)
            say(f"  train {rows:,} rows (cached), #{repeat + 1}: peak RSS {result['peak_rss_mib']:,.0f} MiB, {result['wall_s']:.1f} s")
    middle = medians(runs)
    return {"small": small, "large": large, "steps": args.train_steps, "batch_size": args.train_batch_size, "runs": runs,
            "medians": middle, "ratio": middle[str(large)]["peak_rss_mib"] / middle[str(small)]["peak_rss_mib"]}


def _remove_caches(folder: Path, *, keep_ftune: bool = False) -> None:
    """The run's own caches (written under this benchmark's temporary folder): disk space for the next size."""
    import shutil

    for name in ("hf-datasets", "trl-out") if keep_ftune else ("ftune-cache", "hf-datasets", "trl-out"):
        if (folder / name).is_dir() and folder.name.startswith("prep-"):
            shutil.rmtree(folder / name)


def summary(report: dict) -> dict:
    """The ratios the goals judge: speed and memory against TRL per size, and the largest size's time over the smallest's."""
    out = {}
    prep = report.get("prep", {})
    for key, part in prep.items():
        f, t = part["medians"]["ftune"], part["medians"]["TRL"]
        out[key] = {"speedup": t["wall_s"] / f["wall_s"], "memory_ratio": f["peak_rss_mib"] / t["peak_rss_mib"]}
    if len(prep) > 1:
        sizes = sorted(prep, key=int)
        small, large = prep[sizes[0]], prep[sizes[-1]]
        out["scaling"] = {"small": int(sizes[0]), "large": int(sizes[-1]), "rows_ratio": int(sizes[-1]) / int(sizes[0]),
                          "time_ratio": large["medians"]["ftune"]["wall_s"] / small["medians"]["ftune"]["wall_s"],
                          "trl_time_ratio": large["medians"]["TRL"]["wall_s"] / small["medians"]["TRL"]["wall_s"]}
    if "training" in report:
        out["training_memory_ratio"] = report["training"]["ratio"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="sizes to prepare (default 100000 1000000)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per size; medians are reported (default 1)")
    parser.add_argument("--max-length", type=int, default=512, help="max_length on both sides (default 512)")
    parser.add_argument("--num-proc", type=int, default=0,
                        help="processes for tokenization on both sides (0, the default: the cores available when ftune's recipe "
                             "has data.num_proc, else 1, ftune's single process)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                        help="OMP/MKL threads in every measured process (default: $OMP_NUM_THREADS, else 1)")
    parser.add_argument("--no-training", action="store_true", help="leave out the training-memory part")
    parser.add_argument("--train-small", type=int, default=10_000, help="rows of the small training set (default 10000)")
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps per training run (default 3)")
    parser.add_argument("--train-batch-size", type=int, default=2, help="rows per training step (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--keep", type=Path, help="generate the row files here and keep them (default: a temporary folder)")
    parser.add_argument("--note", help="a line for the report: what was measured, e.g. which ftune version")
    parser.add_argument("--child-trl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_trl:
        child_trl(json.loads(args.child_trl))
        return
    if min(args.rows) < 1 or args.repeats < 1 or args.train_steps < 1:
        parser.error("--rows, --repeats and --train-steps must be at least 1")
    if not args.no_training and args.train_small >= max(args.rows):
        parser.error(f"--train-small ({args.train_small}) must be fewer rows than the largest --rows ({max(args.rows)}), or pass --no-training")
    if not args.num_proc:
        args.num_proc = len(os.sched_getaffinity(0)) if ftune_has_num_proc() else 1
    import ftune
    from ftune.modeling.models import demo_model_dir

    model_dir = demo_model_dir()
    command = shlex.join(["python", "scripts/bench_data.py", *sys.argv[1:]])
    report = {"command": command, "settings": {"rows": sorted(args.rows), "repeats": args.repeats, "max_length": args.max_length,
                                               "num_proc": args.num_proc, "ftune_num_proc_field": ftune_has_num_proc(),
                                               "threads": args.threads, "model_dir": str(model_dir),
                                               "ftune_package": str(Path(ftune.__file__).parent)},
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_before": os.getloadavg(), "note": args.note}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftune-bench-data-") as scratch:
        tmp = Path(scratch)
        rows_dir = args.keep or tmp
        rows_dir.mkdir(parents=True, exist_ok=True)
        say(f"data: preparation of {', '.join(f'{r:,}' for r in sorted(args.rows))} rows, {args.num_proc} process(es) on both sides, "
            f"{args.repeats} repeat(s)")
        report["prep"] = bench_prep(sorted(args.rows), model_dir, tmp, rows_dir, args)
        if not args.no_training:
            say(f"data: training memory, {args.train_steps} steps on {args.train_small:,} cached rows and on {max(args.rows):,}")
            report["training"] = bench_training(max(args.rows), args.train_small, model_dir, tmp, rows_dir, args)
    report["load_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    report["summary"] = summary(report)
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- report (bench_report.py calls these)


def targets(data: dict | None, goals: dict) -> list[dict]:
    """This part's rows of BENCHMARKS.md's target table; `goals` is bench_report.TARGETS."""
    if not data or "summary" not in data:
        return [{"target": "data preparation targets", "goal": "", "measured": "", "status": "not measured"}]
    out, summary, procs = [], data["summary"], data["settings"]["num_proc"]

    def add(name, goal, value, met):
        out.append({"target": name, "goal": goal, "measured": value, "status": "met" if met else "missed"})

    for key in sorted((k for k in summary if k.isdigit()), key=int):
        r, m = summary[key]["speedup"], summary[key]["memory_ratio"]
        add(f"data preparation speed vs TRL SFTTrainer, {int(key):,} rows ({procs} process{'es' if procs > 1 else ''} each)",
            f">= {goals['data_prep_vs_trl']}x", f"{r:.2f}x", r >= goals["data_prep_vs_trl"])
        add(f"data preparation peak RSS / TRL's, {int(key):,} rows", f"<= {goals['data_prep_memory_vs_trl']}", f"{m:.2f}",
            m <= goals["data_prep_memory_vs_trl"])
    scaling = summary.get("scaling")
    if scaling:
        # The goal is for 10x the rows (1M against 100k); for other sizes it scales with the rows.
        goal = goals["data_prep_scaling"] * scaling["rows_ratio"] / 10
        add(f"data preparation time, {scaling['large']:,} rows / {scaling['small']:,} rows", f"<= {goal:g}",
            f"{scaling['time_ratio']:.2f}", scaling["time_ratio"] <= goal)
    if "training_memory_ratio" in summary:
        t = data["training"]
        add(f"training peak RSS, {t['large']:,} cached rows / {t['small']:,}", f"<= {goals['data_training_memory']}",
            f"{summary['training_memory_ratio']:.2f}", summary["training_memory_ratio"] <= goals["data_training_memory"])
    return out


def markdown(data: dict | None, *, baseline: bool = False) -> list[str]:
    """This part's section of BENCHMARKS.md; `baseline`: figures of the pipeline before the streaming one, if kept."""
    if baseline and not data:
        return []
    if not data or "prep" not in data:
        return ["## Data preparation", "", (data or {}).get("skipped", "skipped (--skip data)"), ""]
    s, summary, procs = data["settings"], data.get("summary", {}), data["settings"]["num_proc"]
    title = ("## Data preparation before the streaming pipeline (baseline, scripts/bench_data.py)" if baseline else
             "## Data preparation: ftune against TRL's SFTTrainer dataset preparation (scripts/bench_data.py)")
    lines = [
        title,
        "",
        (f"Alpaca-style rows from `scripts/make_big_dataset.py` (seed 0), the demo model's tokenizer, max length {s['max_length']}, "
         f"packing on both sides, {procs} tokenizing process{'es' if procs > 1 else ''} on each side "
         f"(ftune: {'`data.num_proc`' if s.get('ftune_num_proc_field') else 'no data.num_proc, one process'}; TRL: "
         f"`dataset_num_proc` {procs if procs > 1 else 'None, its default: in the main process'}), {s['threads']} OMP thread(s), "
         f"medians of {s['repeats']} run(s) per side; ftune package: `{s.get('ftune_package', 'ftune')}`. "
         f"Command: `{data['command']}`." + (f" {data['note']}" if data.get("note") else "")
         + (f" Load average before and after: {_load(data['load_before'])}, {_load(data['load_after'])}." if data.get("load_after") else "")),
        "",
        ("| rows | side | wall s | rows/s | ftune is | CPU s | peak RSS MiB (all processes) | ftune / TRL | peak PSS MiB | "
         "main process MiB | processes | tokens | packed rows |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sorted(data["prep"], key=int):
        medians = data["prep"][size]["medians"]
        f = medians["ftune"]
        for side, v in medians.items():
            faster = "" if side == "ftune" else f"{v['wall_s'] / f['wall_s']:.2f}x"
            memory = "" if side == "ftune" else f"{f['peak_rss_mib'] / v['peak_rss_mib']:.2f}"
            pss = f"{v['peak_pss_mib']:,.0f}" if "peak_pss_mib" in v else "-"  # not sampled by the first version of this script
            lines.append(f"| {int(size):,} | {side} | {v['wall_s']:.1f} | {int(size) / v['wall_s']:,.0f} | {faster} | {v['cpu_s']:,.0f} | "
                         f"{v['peak_rss_mib']:,.0f} | {memory} | {pss} | "
                         f"{v['main_peak_rss_mib']:,.0f} | {v['processes']:.0f} | "
                         f"{v['tokens']:,.0f} | {v['packed_rows']:,.0f} |")
    scaling = summary.get("scaling")
    if scaling:
        lines += ["", (f"{scaling['large']:,} rows against {scaling['small']:,} ({scaling['rows_ratio']:g}x the rows): ftune "
                       f"{scaling['time_ratio']:.2f}x the time, TRL {scaling['trl_time_ratio']:.2f}x.")]
    phases = [(size, data["prep"][size]["runs"]["TRL"][0]["phases_s"]) for size in sorted(data["prep"], key=int)]
    lines += ["", "TRL's time by phase (its first run of each size), seconds: "
              + "; ".join(f"{int(size):,} rows: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()) for size, p in phases) + "."]
    dropped = [(size, data["prep"][size]["medians"]["ftune"]) for size in sorted(data["prep"], key=int)]
    lines += ["", ("ftune's token count differs from TRL's by the samples it drops or cuts (`data.too_long: truncate`, then "
                   "samples left with no answer token dropped; TRL's bfd packing splits a long sample instead): "
                   + "; ".join(f"{int(size):,} rows: {v.get('truncated', 0):,.0f} truncated, "
                               f"{v['dropped'] if 'dropped' in v else int(size) - v['samples']:,.0f} dropped"
                               for size, v in dropped) + ".")]
    training = data.get("training")
    if training:
        lines += ["", (f"Training memory: `ftune sft` for {training['steps']} steps of {training['batch_size']} rows after `ftune inspect` "
                       "built the set's cache, medians:"), "",
                  "| cached rows | peak RSS MiB | main process MiB | wall s | inspect before it, s |", "|---:|---:|---:|---:|---:|"]
        for size in (str(training["small"]), str(training["large"])):
            v = training["medians"][size]
            lines.append(f"| {int(size):,} | {v['peak_rss_mib']:,.0f} | {v['main_peak_rss_mib']:,.0f} | {v['wall_s']:.1f} | "
                         f"{v.get('inspect_s', v.get('cache_build_s', 0)):.1f} |")
        lines += ["", f"Ratio {training['large']:,} / {training['small']:,} rows: **{training['ratio']:.2f}**."]
    lines += ["", METHOD, ""]
    return lines


def _load(load) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + f" (1, 5, 15 min; {os.cpu_count()} cores)"


METHOD = (
    "How: each run is its own process, the sides interleaved. ftune runs the command a user runs, `ftune inspect RECIPE --json` "
    "(what `ftune sft` does to its data, and the inspection's own figures), with `FTUNE_CACHE` an empty folder, so nothing is "
    "reused. TRL runs what its users run before training, with `HF_DATASETS_CACHE` an empty folder: `load_dataset(\"json\")`, "
    "a `map` from the alpaca fields to conversational prompt/completion rows (the conversation ftune builds from an alpaca row), "
    "and `SFTTrainer._prepare_dataset`, the function `SFTTrainer.__init__` calls for its train set (tokenize, build labels, bfd "
    "packing with `packing=True`), without loading a model. Wall time is the process's, start to exit, imports included on both "
    "sides; CPU s is the user + system time of the process and its workers (what a busy machine does not stretch). "
    "Memory is sampled every 0.1 s over the process and every process it starts (both sides fork their workers): "
    "\"all processes\" is the peak of their summed RSS, the goal's figure (a page a forked worker shares with its parent counts "
    "in both, so with workers it is an upper bound); \"PSS\" the peak of their summed proportional set sizes (a page shared by "
    "n processes counts 1/n in each, so the workers' shared pages count once; pages shared with processes outside the run count "
    "less); \"main process\" its own VmHWM. Both sides' `tokens` agree but for the samples ftune cuts or drops, a check that "
    "they did the same work.")


if __name__ == "__main__":
    main()

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
This file holds the two sides and the runs; bench_process_tree.py measures a process and its workers,
bench_data_report.py turns the figures into the goals' ratios, target rows and this part's report section.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_common import LORA, SCRIPTS, medians, say  # medians: the one median-per-figure rule of make bench
from bench_data_report import summary
from bench_process_tree import check_exit, measure

FTUNE = Path(sys.executable).parent / "ftune"
SEED = 0  # make_big_dataset.py's seed: every size is a prefix of the largest


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
    check_exit(result, "ftune inspect", folder / "ftune.log")
    numbers = json.loads(result.pop("stdout"))
    result.update({"samples": numbers["train_samples"], "tokens": numbers["train_tokens"], "loss_tokens": numbers["loss_tokens"],
                   "packed_rows": numbers["packed_rows"], "truncated": numbers["truncated"],
                   "dropped": numbers["dropped_too_long"] + numbers["dropped_no_loss"]})
    return result


def run_trl_prep(data: Path, model_dir: Path, folder: Path, args) -> dict:
    spec = {"data": str(data), "model_dir": str(model_dir), "max_length": args.max_length, "num_proc": args.num_proc,
            "output_dir": str(folder / "trl-out")}
    result = measure([sys.executable, __file__, "--child-trl", json.dumps(spec)], env_for(folder, args.threads), folder / "trl.log")
    check_exit(result, "TRL dataset preparation", folder / "trl.log")
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
        check_exit(built, "ftune inspect (building the cache)", tmp / f"train-{rows}-inspect.log")
        sets[rows] = (recipe, env, built["wall_s"])
    for repeat in range(args.repeats):
        for rows, (recipe, env, build_s) in sets.items():
            log = tmp / f"train-{rows}-{repeat}.log"
            result = measure([str(FTUNE), "sft", str(recipe), "--overwrite"], env, log)
            check_exit(result, "ftune sft", log)
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


if __name__ == "__main__":
    main()

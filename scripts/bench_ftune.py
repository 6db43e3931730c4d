"""One measured ftune run for scripts/bench.py, in its own process: the real `sft`, `dpo` or `rm` stage.

    python scripts/bench_ftune.py SPEC.json

SPEC holds: kind ("sft", "dpo" or "rm"), recipe (a recipe file written by bench.py), and
optionally profile (a path: a torch.profiler table of the steps after the first is
written there).

The stage runs unchanged, from `ftune.stages.<kind>.run(recipe)`. Three pass-through
wrappers observe it without changing what it computes:
- `collate` (ftune's batch builder) records, per pass, the trained tokens
  (targets != -100; ftune shifts targets in collate, so these are exactly the tokens the
  loss sees), the token slots the model processes, and the real (non-padding) tokens;
- `Reporter.log` records when each step was logged, the CPU time and the peak RSS by then.
DPO scores its reference log-probs inside the steps (each pair the first time a step reaches
it), so they are in the step timing, as TRL's are.

Prints one line `BENCH_RESULT {json}`; the step timing itself comes from the run's
metrics.jsonl (see bench.py).
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


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_step(passes: list[dict], steps: int) -> list[dict]:
    """The passes' counts summed per optimizer step (a step runs one or more passes), steps 1..steps."""
    out = [{"trained": 0, "slots": 0, "real": 0, "passes": 0} for _ in range(steps)]
    for record in passes:
        if record["step"] <= steps:
            step = out[record["step"] - 1]
            for key in ("trained", "slots", "real"):
                step[key] += record[key]
            step["passes"] += 1
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    from ftune.data import pairs as preference  # its collate packs the pairs (preference.packed_rows)
    from ftune.data.rendering import IGNORE
    from ftune.stages import dpo, sft
    from ftune.train import progress

    batches: list[dict] = []
    marks: list[dict] = []
    phase = {"name": "train", "reference_s": 0.0}

    def counting(collate):
        def wrapped(data, rows, pad_id, *, packed):
            batch = collate(data, rows, pad_id, packed=packed)
            if phase["name"] == "train":
                # A step's passes are all built before its first forward, so the step under way
                # is the one after the last logged.
                lengths = data.lengths()
                batches.append({"step": len(marks) + 1, "trained": int((batch["targets"] != IGNORE).sum()),
                                "slots": batch["input_ids"].numel(), "real": int(sum(lengths[i] for row in rows for i in row))})
            return batch
        return wrapped

    log = progress.Reporter.log

    def logging(self, step, metrics):
        log(self, step, metrics)
        if any(k in metrics for k in ("tokens_per_s", "pairs_per_s")):
            marks.append({"step": step, "t": time.perf_counter(), "cpu_s": cpu_seconds(), "hwm_mib": vm_hwm_mib()})

    progress.Reporter.log = logging
    profiler = None
    if spec.get("profile"):
        # Profile every step after the first: started when step 1 is logged.
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

        def logging_and_profiling(self, step, metrics):
            logging(self, step, metrics)
            if step == 1 and "loss" in metrics:
                profiler.__enter__()

        progress.Reporter.log = logging_and_profiling

    if spec["kind"] == "sft":
        sft.collate = counting(sft.collate)
        run = sft.run
    elif spec["kind"] == "rm":  # chosen and rejected are packed by preference.packed_rows, through its collate
        from ftune.stages import rm

        preference.collate = counting(preference.collate)
        run = rm.run
    else:
        preference.collate = counting(preference.collate)
        from ftune.train.reference import ReferenceLogps

        ensure = ReferenceLogps.ensure

        def reference_passes(self, *args, **kwargs):  # their batches are not training passes
            phase["name"] = "reference"
            try:
                return ensure(self, *args, **kwargs)
            finally:
                phase["name"] = "train"

        ReferenceLogps.ensure = reference_passes
        run = dpo.run
    hwm_start = vm_hwm_mib()
    run_dir = run(Path(spec["recipe"]), [], overwrite=True)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        Path(spec["profile"]).write_text(table)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "metrics": [m for m in metrics if "loss" in m],
        "marks": marks,
        "batches": per_step(batches, len(marks)),
        "reference_s": phase["reference_s"],  # 0: no reference pass outside the steps
        "hwm_start_mib": hwm_start,
        "hwm_at_last_step_mib": marks[-1]["hwm_mib"] if marks else float("nan"),
        "hwm_mib": vm_hwm_mib(),
        "threads": torch.get_num_threads(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "cuda_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else None,
        "run_dir": str(run_dir),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: where things are, the measured rows, running one measured
side in its own process, the LoRA every side trains, and the one median-per-figure rule. It imports
no other script, so bench.py, bench_machine.py, bench_stages.py, bench_data.py, bench_process_tree.py
and bench_gpu.py all import it and not each other upwards."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_2k.json"
HH_RLHF = SHARED_DATA / "hh_rlhf_harmless_1k.jsonl"
DEMO_SFT_DATA = ROOT / "ftune" / "demo_data" / "identity.jsonl"
DEMO_DPO_DATA = ROOT / "ftune" / "demo_data" / "preferences.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}  # every ftune and TRL side trains this adapter (bench_stages.py, bench_data.py)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sft_rows(n: int, max_length: int, model_dir: Path) -> tuple[list[tuple[dict, object, int]], str]:
    """The first n alpaca rows whose rendered conversation fits in max_length tokens: (row, chat, tokens)."""
    from ftune.data.formats import convert

    formatter = _formatter(model_dir)
    if ALPACA.is_file():
        source, rows, fmt = str(ALPACA), json.loads(ALPACA.read_text()), "alpaca"
    else:
        source, fmt = str(DEMO_SFT_DATA), "messages"
        rows = [json.loads(line) for line in DEMO_SFT_DATA.read_text().splitlines() if line.strip()]
    kept = []
    for row in rows:
        chat = convert(row, fmt)
        tokens = len(formatter.encode(chat)[0])
        if tokens <= max_length:
            kept.append((row, chat, tokens))
        if len(kept) == n:
            break
    return kept, source


def dpo_rows(n: int, max_length: int, model_dir: Path) -> tuple[list, str]:
    """The first n preference pairs that convert cleanly and whose both sides fit in max_length."""
    from ftune.data.formats import BadRow, Chat, convert

    formatter = _formatter(model_dir)
    path = HH_RLHF if HH_RLHF.is_file() else DEMO_DPO_DATA
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            pair = convert(row, "preference")
        except BadRow:
            continue
        lengths = [len(formatter.encode(Chat(pair.prompt + answer), last_turn_only=True)[0]) for answer in (pair.chosen, pair.rejected)]
        if max(lengths) <= max_length:
            kept.append((row, pair))
        if len(kept) == n:
            break
    return kept, str(path)


def _formatter(model_dir: Path):
    from ftune.data.rendering import make_formatter
    from ftune.modeling.models import load_tokenizer

    return make_formatter(load_tokenizer(str(model_dir)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_child(script: str, spec: dict, log: Path) -> dict:
    """Run one measured side in its own process; its last `BENCH_RESULT` line is the result."""
    spec_path = log.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, str(SCRIPTS / script), str(spec_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=handle, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{script} failed (exit {done.returncode}); its log ends:\n{tail}")
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    result["process_wall_s"] = time.perf_counter() - start
    return result


def summarize_ftune_sft(raw: dict) -> dict:
    """Timed-step figures from the run's metrics.jsonl.

    ftune logs `tokens_per_s` = trained tokens so far / seconds since just before step 1,
    at the end of every step (logging_steps 1). With T_k the trained tokens of steps 1..k
    (counted from the batches, as ftune counts them), the time at the end of step k is
    E_k = T_k / tokens_per_s_k, and the timed figure is (T_n - T_1) / (E_n - E_1): steps 2..n,
    the same window as TRL's.
    """
    metrics = sorted(raw["metrics"], key=lambda m: m["step"])
    trained = [b["trained"] for b in raw["batches"]]
    cumulative = [sum(trained[: k + 1]) for k in range(len(trained))]
    ends = [cumulative[k] / metrics[k]["tokens_per_s"] for k in range(len(metrics))]
    seconds = ends[-1] - ends[0]
    hook_seconds = raw["marks"][-1]["t"] - raw["marks"][0]["t"]
    cpu = raw["marks"][-1]["cpu_s"] - raw["marks"][0]["cpu_s"]
    return _step_figures(raw["batches"][1:], seconds, raw, cpu, extra={"hook_seconds": hook_seconds})


def summarize_trl(raw: dict) -> dict:
    ends = raw["step_ends"]
    seconds = ends[-1] - ends[0]
    figures = _step_figures(raw["batches"][1: len(ends)], seconds, raw, raw["step_cpu_s"][-1] - raw["step_cpu_s"][0])
    figures["trl_settings"] = raw["settings"]
    return figures


def _step_figures(batches: list[dict], seconds: float, raw: dict, cpu_seconds: float, extra: dict | None = None) -> dict:
    trained = sum(b["trained"] for b in batches)
    real = sum(b["real"] for b in batches)
    slots = sum(b["slots"] for b in batches)
    out = {"timed_steps": len(batches), "timed_s": seconds, "trained_tokens": trained, "real_tokens": real, "token_slots": slots,
           "tokens_per_s": trained / seconds, "cpu_s": cpu_seconds, "tokens_per_cpu_s": trained / cpu_seconds,
           "real_tokens_per_s": real / seconds, "slots_per_s": slots / seconds,
           "peak_rss_mib": raw["hwm_at_last_step_mib"], "peak_rss_end_mib": raw["hwm_mib"], "threads": raw["threads"],
           "process_wall_s": raw["process_wall_s"]}
    if "pairs" in (batches[0] if batches else {}):
        out["pairs"] = sum(b["pairs"] for b in batches)
        out["pairs_per_s"] = out["pairs"] / seconds
    out.update(extra or {})
    return out


def medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, results in runs.items():
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[name] = {k: statistics.median(r[k] for r in results) for k in keys}
    return out

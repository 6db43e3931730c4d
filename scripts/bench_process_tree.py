"""Measuring a process and every process it starts, for scripts/bench_data.py: wall time, exit code,
stdout, CPU time, and memory sampled from /proc (peak RSS of the main process, peak summed RSS
and PSS of the whole tree)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from bench_common import ROOT



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


def check_exit(result: dict, what: str, log: Path) -> None:
    """Stop the benchmark with the end of the log when the measured process failed."""
    if result["exit"] != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{what} failed (exit {result['exit']}); {log} ends:\n{tail}")

"""The machine part of scripts/bench.py: what the machine is (CPU, memory, package versions, the demo
model's size), how many torch threads each measured process gets, the CPU's float32 matmul peak,
and CLI start-up times."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import LORA, ROOT, say

PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors", "numpy", "llama_cpp_python", "ftune"]


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

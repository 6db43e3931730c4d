"""Peak memory and time of `ftune merge` against the usual way: load everything, merge_and_unload.

    python scripts/bench_merge.py              # the demo model with a LoRA on every linear layer
    python scripts/bench_merge.py RUN_OR_ADAPTER

Each method runs in its own process after the same imports; the table gives the time and
the peak memory the merge adds on top of them, and the whole process's peak (ru_maxrss).
Both write a merged model without the parity check; the last line is the largest difference
between the two merged checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Each child imports the same libraries first, then resets the kernel's peak-RSS mark
# (/proc/self/clear_refs, "5"), so "merge MiB" is what the merge itself adds on top of them.
PRELUDE = """
import json, time
from pathlib import Path
import torch, transformers, peft, safetensors
from peft import PeftModel
from transformers import AutoModelForCausalLM
from ftune.merge import merge_to_dir
from ftune.merge.source import read_source

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
start = time.perf_counter()
"""
REPORT = """
print("BENCH " + json.dumps({"seconds": time.perf_counter() - start, "added_mib": status("VmHWM") - before}))
"""
METHODS = {
    "ftune merge (streaming)": "merge_to_dir(Path({source!r}), Path({out!r}), verify=False)",
    "load + peft merge_and_unload": (
        "src = read_source(Path({source!r}), None)\n"
        "model = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=\"auto\")\n"
        "model = PeftModel.from_pretrained(model, src.adapter_dir).merge_and_unload()\n"
        "model.save_pretrained({out!r})"
    ),
}


def demo_run(root: Path) -> Path:
    """A demo-model run directory with a rank-16 LoRA on every linear layer (random, non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.modeling.models import demo_model_dir

    base = demo_model_dir()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 0.01
    run = root / "run"
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
    meta = {
        "ftune_version": "0.1.0",
        "stage": "sft",
        "status": "completed",
        "base_model": {"name": "demo", "path": str(base), "revision": None, "trust_remote_code": False},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "rslora": False},
        "quantization": {"load_in_4bit": False, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "dtype": "float32",
    }
    (run / "run.json").write_text(json.dumps(meta))
    return run


def measure(body: str) -> dict:
    """Run one method in a fresh process: its own time and memory, and the whole process's peak RSS."""
    process = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + body + REPORT], stdout=subprocess.PIPE, text=True, env={**os.environ, "FTUNE_NO_PROGRESS": "1"}
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed:\n{body}")
    result = json.loads(next(line for line in output.splitlines() if line.startswith("BENCH "))[6:])
    return {**result, "process_peak_mib": usage.ru_maxrss / 1024}  # Linux reports KiB


def largest_difference(a: Path, b: Path) -> float:
    """Largest elementwise difference over the tensors both merged directories hold, one at a time."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            names = handle.keys()
        return dict.fromkeys(names, folder / "model.safetensors")

    def read(path: Path, key: str):
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(key).float()

    left, right = files(a), files(b)
    return max((read(left[k], k) - read(right[k], k)).abs().max().item() for k in set(left) & set(right))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, help="a run or adapter directory (default: a demo LoRA)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftune-bench-merge-") as tmp:
        root = Path(tmp)
        source = args.source or demo_run(root)
        rows = {}
        outputs = {}
        for name, template in METHODS.items():
            outputs[name] = root / name.split()[0]
            rows[name] = measure(template.format(source=str(source), out=str(outputs[name])))
        size = sum(f.stat().st_size for f in outputs["ftune merge (streaming)"].glob("*.safetensors")) / 2**20
        diff = largest_difference(outputs["ftune merge (streaming)"], outputs["load + peft merge_and_unload"])

    print(f"\nmerge of {source} ({size:.0f} MiB of merged weights; no parity check)")
    print(f"{'method':<32}{'merge s':>9}{'merge MiB':>11}{'process peak MiB':>18}")
    for name, row in rows.items():
        print(f"{name:<32}{row['seconds']:>9.1f}{row['added_mib']:>11.0f}{row['process_peak_mib']:>18.0f}")
    print("merge s / MiB: time and peak memory added by the merge itself, after the same imports")
    print(f"largest |difference| between the two merged checkpoints: {diff:.2e}")


if __name__ == "__main__":
    main()

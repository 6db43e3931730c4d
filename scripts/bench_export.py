"""Time, peak memory and write speed of `ftune export-gguf` (f16, no parity check) on the demo model.

    python scripts/bench_export.py            # the demo model
    python scripts/bench_export.py MODEL_DIR  # any supported model directory
    python scripts/bench_export.py --verify   # also time the export with its parity check

Each row runs in its own process, so its peak resident memory (VmHWM) is its own; "over
imports" subtracts the first row, a process that only imports the libraries. Each
child also times its own work after its imports, so MiB/s compares the export with a plain
write of the same number of bytes to the same disk (fsync included, as the export's publish
step does): the converter's speed against the disk it writes to.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The libraries, and the model's config class (transformers imports it lazily, with half of torch).
IMPORTS = (
    "import time, torch, transformers, safetensors, gguf, ftune.gguf.convert, ftune.gguf.export; "
    "transformers.AutoConfig.from_pretrained({source!r}); start = time.perf_counter()\n"
)
# A child reports its own high-water mark: wait4's ru_maxrss would include the RSS of the
# parent it was forked from (Linux carries it across exec).
TIMED = (
    "\nprint('work seconds', time.perf_counter() - start)"
    "\nprint('peak kib', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
)
EXPORT = "from pathlib import Path; ftune.gguf.export.run({model!r}, Path({out!r}), 'f16', verify={verify})"
# `size` bytes in 64 MiB chunks from one buffer, then fsync: the disk's speed for this file.
PLAIN_WRITE = (
    "import os, time; size = {size}; chunk = os.urandom(64 << 20); start = time.perf_counter(); f = open({out!r}, 'wb')\n"
    "while size > 0:\n    n = min(size, len(chunk)); f.write(chunk[:n]); size -= n\n"
    "f.flush(); os.fsync(f.fileno()); f.close()"
)


def measure(code: str) -> tuple[float, float]:
    """Seconds the child spent on its work (after imports) and its peak RSS in MiB."""
    result = subprocess.run([sys.executable, "-c", code + TIMED], capture_output=True, text=True, env={**os.environ, "FTUNE_NO_PROGRESS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"benchmark child failed: {code}\n{result.stderr[-2000:]}")
    seconds = float(result.stdout.split("work seconds")[-1].split()[0])
    peak_kib = int(result.stdout.split("peak kib")[-1].split()[0])
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo", help="a model directory (default: the demo model)")
    parser.add_argument("--verify", action="store_true", help="also time an export with the parity check")
    args = parser.parse_args()

    from ftune.modeling.models import resolve_model_path

    source = Path(resolve_model_path(args.model))
    weights = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 2**20
    imports = IMPORTS.format(source=str(source))
    with tempfile.TemporaryDirectory(prefix="ftune-bench-export-") as tmp:
        root = Path(tmp)
        rows = [("imports only", *measure(imports), None)]
        out = root / "model-f16.gguf"
        seconds, rss = measure(imports + EXPORT.format(model=args.model, out=str(out), verify=False))
        size = out.stat().st_size
        rows.append(("ftune export-gguf f16", seconds, rss, size))
        if args.verify:
            checked = root / "checked" / "model-f16.gguf"
            rows.append(("  with parity check", *measure(imports + EXPORT.format(model=args.model, out=str(checked), verify=True)), size))
        rows.append(("plain write, same size", *measure(PLAIN_WRITE.format(size=size, out=str(root / "plain.bin"))), size))

    print(f"\nf16 GGUF export of {source} (safetensors: {weights:.0f} MiB; GGUF: {size / 2**20:.0f} MiB)")
    base_rss = rows[0][2]
    print(f"{'step':<26}{'seconds':>9}{'peak RSS MiB':>14}{'over imports':>14}{'MiB/s':>8}")
    for name, seconds, rss, written in rows[1:]:
        over = f"{rss - base_rss:>14.0f}" if "plain" not in name else f"{'-':>14}"
        speed = f"{written / 2**20 / seconds:>8.0f}"
        print(f"{name:<26}{seconds:>9.1f}{rss:>14.0f}{over}{speed}")
    export_speed = size / 2**20 / rows[1][1]
    plain_speed = size / 2**20 / rows[-1][1]
    print(f"(imports: {base_rss:.0f} MiB) export: {export_speed:.0f} MiB/s, {export_speed / plain_speed:.0%} of a plain write's {plain_speed:.0f} MiB/s")


if __name__ == "__main__":
    main()

"""Run directories and atomic outputs.

A run directory describes itself: `run.json` names the stage, the resolved base model and
package versions; `recipe.yaml` is the resolved recipe. Later commands (merge, export,
eval, chat, a DPO `init_from`) read their inputs from there.

Final artifacts are written beside their destination and renamed into place, so a crash
leaves the previous state and never a half-written artifact that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ftune.errors import FtuneError

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # full fine-tuning writes a whole model instead of an adapter
CHECKPOINTS_DIR = "checkpoints"


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FtuneError(f"{final} already exists", hint="choose another path, or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    """Open a temporary file next to `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; outputs get the usual mode
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def read_run(run_dir: Path) -> dict:
    """The run.json of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    meta = run_dir / RUN_FILE
    if not meta.is_file():
        raise FtuneError(f"{run_dir} is not an ftune run directory (no {RUN_FILE})")
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FtuneError(f"{meta}: unreadable ({exc})") from None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["ftune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "gguf", "llama-cpp-python"]
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found

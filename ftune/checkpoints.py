"""Checkpoints: everything a resumed run needs to continue exactly where it stopped.

Only safetensors and JSON, never pickle: trainable weights, optimizer state flattened to
tensors, the scheduler and data position as JSON, every RNG state, and whatever state the
stage keeps per process (DPO: the reference log-probs scored so far). With several processes
the main one writes the checkpoint and every other adds its own RNG and stage state to it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ftune.errors import FtuneError
from ftune.runs import CHECKPOINTS_DIR, atomic_dir, atomic_file

STATE_FILE = "state.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position: dict, keep: int, ctx=None,
                    stage_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `checkpoints/step-N` (atomically) and keep the newest `keep` of them."""
    from safetensors.torch import save

    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    stage_state = {k: v.contiguous() for k, v in (stage_state or {}).items()}
    if ctx is not None and ctx.world > 1:
        ctx.barrier()
        if ctx.is_main:
            _write_checkpoint(final, step, model, optimizer, scheduler, position, stage_state)
        ctx.barrier()
        if not ctx.is_main:
            with atomic_file(final / f"rng-rank{ctx.rank}.safetensors", "wb") as handle:
                handle.write(save({"torch": torch.get_rng_state()}))
            with atomic_file(final / f"stage-rank{ctx.rank}.safetensors", "wb") as handle:
                handle.write(save(stage_state))
        ctx.barrier()
    else:
        _write_checkpoint(final, step, model, optimizer, scheduler, position, stage_state)
    if ctx is None or ctx.is_main:
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(final: Path, step: int, model, optimizer, scheduler, position: dict, stage_state: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(final, overwrite=True) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        save_file(stage_state, tmp / "stage-rank0.safetensors")
        np_state = np.random.get_state()
        state = {
            "step": step,
            "position": position,
            "optimizer_layout": layout,
            "scheduler": scheduler.state_dict(),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNGs; return the saved state (step, position,
    and this process's `stage_state`, empty when the checkpoint has none)."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise FtuneError(f"checkpoint {path} does not fit this model (e.g. {missing[0]})", hint="resume with the recipe that made it")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer_layout"]))
    scheduler.load_state_dict(state["scheduler"])
    own = path / f"rng-rank{rank}.safetensors"
    rng = load_file(own if rank and own.is_file() else path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    random.setstate(_tupled(state["python_random"]))
    kind, keys, *rest = state["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    stage_file = path / f"stage-rank{rank}.safetensors"
    state["stage_state"] = load_file(stage_file) if stage_file.is_file() else {}
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in layout["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value

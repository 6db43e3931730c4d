"""Checkpoints: everything a resumed run needs to continue exactly where it stopped.

Only safetensors and JSON, never pickle: trainable weights, optimizer state flattened to
tensors, the scheduler and data position as JSON, every RNG state, and whatever state the
stage keeps per process (DPO: the reference log-probs scored so far; GRPO: its sampling RNG,
counters, run card and a batch of completions). A stage's state is a dict: its tensors go to
stage-rankN.safetensors, its other values (JSON-able: counters, texts) to stage-rankN.json; both
come back as one dict, read back and checked, not trusted. With several processes the main one
writes the checkpoint and every other adds its own RNG and stage state to it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ftune.artifacts.ownership import atomic_dir, atomic_file
from ftune.artifacts.runs import CHECKPOINTS_DIR
from ftune.errors import FtuneError
from ftune.guards import textio

STATE_FILE = "state.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position: dict, keep: int, ctx=None,
                    stage_state: dict | None = None) -> Path:
    """Write `checkpoints/step-N` (atomically) and keep the newest `keep` of them.
    `stage_state`: name -> a tensor, or a JSON-able value (written as JSON beside the tensors)."""
    from safetensors.torch import save

    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    stage_state = stage_state or {}
    stage_data = {k: v for k, v in stage_state.items() if not isinstance(v, torch.Tensor)}
    stage_state = {k: v.contiguous() for k, v in stage_state.items() if isinstance(v, torch.Tensor)}
    if ctx is not None and ctx.world > 1:
        ctx.barrier()
        if ctx.is_main:
            _write_checkpoint(final, step, model, optimizer, scheduler, position, stage_state, stage_data)
        ctx.barrier()
        if not ctx.is_main:
            with atomic_file(final / f"rng-rank{ctx.rank}.safetensors", "wb") as handle:
                handle.write(save({"torch": torch.get_rng_state()}))
            with atomic_file(final / f"stage-rank{ctx.rank}.safetensors", "wb") as handle:
                handle.write(save(stage_state))
            if stage_data:
                with atomic_file(final / f"stage-rank{ctx.rank}.json") as handle:
                    textio.dump(stage_data, handle)
        ctx.barrier()
    else:
        _write_checkpoint(final, step, model, optimizer, scheduler, position, stage_state, stage_data)
    if ctx is None or ctx.is_main:
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(final: Path, step: int, model, optimizer, scheduler, position: dict, stage_state: dict,
                      stage_data: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(final, kind="checkpoint", overwrite=True) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        save_file(stage_state, tmp / "stage-rank0.safetensors")
        if stage_data:  # a stage that keeps tensors only (DPO) writes none
            (tmp / "stage-rank0.json").write_text(textio.dumps(stage_data), encoding="utf-8")
        np_state = np.random.get_state()
        state = {
            "step": step,
            "position": position,
            "optimizer_layout": layout,
            "scheduler": scheduler.state_dict(),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / STATE_FILE).write_text(textio.dumps(state), encoding="utf-8")


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNGs; return the saved state (step, position,
    and this process's `stage_state`, its tensors and JSON values in one dict, empty when the
    checkpoint has none: the stage checks what it takes back).

    A checkpoint is read back, not trusted: state.json's fields are checked for their types
    and every file that cannot be restored is refused by name (a damaged checkpoint is the
    user's to move aside: resuming from a wrong state would train on silently)."""
    state = read_state(path)
    weights = _load(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise FtuneError(f"checkpoint {path} does not fit this model (e.g. {missing[0]})", hint="resume with the recipe that made it")
    wrong = [n for n, v in weights.items() if tuple(v.shape) != tuple(params[n].shape)]
    if wrong:
        raise FtuneError(f"checkpoint {path} does not fit this model ({wrong[0]} has shape {tuple(weights[wrong[0]].shape)})",
                         hint="resume with the recipe that made it")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(_load(path / "optimizer.safetensors"), state["optimizer_layout"]))
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:  # what a damaged state makes torch raise
        raise FtuneError(f"the optimizer or scheduler state does not restore ({type(exc).__name__}: {str(exc)[:160]})",
                         place=str(path / STATE_FILE), hint=DAMAGED) from None
    own = path / f"rng-rank{rank}.safetensors"
    rng = _load(own if rank and own.is_file() else path / "rng.safetensors")
    try:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and "cuda0" in rng:
            torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
        random.setstate(_tupled(state["python_random"]))
        kind, keys, *rest = state["numpy_random"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise FtuneError(f"the random-number state does not restore ({type(exc).__name__}: {str(exc)[:160]})",
                         place=str(path), hint=DAMAGED) from None
    stage_file = path / f"stage-rank{rank}.safetensors"
    state["stage_state"] = _load(stage_file) if stage_file.is_file() else {}
    data_file = path / f"stage-rank{rank}.json"
    if data_file.is_file():
        state["stage_state"].update(_stage_data(data_file, state["stage_state"]))
    return state


def _stage_data(file: Path, tensors: dict) -> dict:
    """The JSON part of a stage's state: an object whose names are not its tensors' too."""
    try:
        data = textio.load_file(file, "checkpoint stage state")
    except FtuneError as exc:
        raise FtuneError(exc.message, place=exc.place, hint=DAMAGED) from None
    if not isinstance(data, dict):
        raise FtuneError(f"a checkpoint's stage state is a JSON object, not {type(data).__name__}", place=str(file), hint=DAMAGED)
    both = sorted(set(data) & set(tensors))
    if both:
        raise FtuneError(f"field '{both[0]}' is both a tensor and a JSON value", place=str(file), hint=DAMAGED)
    return data


DAMAGED = "the checkpoint is damaged: move that step-* folder aside to resume from an earlier one, or start again"


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, every field checked for the type `_write_checkpoint` gave it."""
    file = path / STATE_FILE
    state = textio.load_file(file, "checkpoint state")
    expected = {"step": int, "position": dict, "optimizer_layout": dict, "scheduler": dict,
                "python_random": list, "numpy_random": list}
    if not isinstance(state, dict):
        raise FtuneError(f"a checkpoint state is a JSON object, not {type(state).__name__}", place=str(file), hint=DAMAGED)
    for key, kind in expected.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in state else f"a {type(value).__name__}"
            raise FtuneError(f"field '{key}' must be a {kind.__name__}, not {got}", place=str(file), hint=DAMAGED)
    if state["step"] < 0:
        raise FtuneError(f"field 'step' must not be negative, not {state['step']}", place=str(file), hint=DAMAGED)
    layout = state["optimizer_layout"]
    if not isinstance(layout.get("param_groups"), list) or not isinstance(layout.get("scalars"), dict):
        raise FtuneError("field 'optimizer_layout' must hold 'param_groups' (a list) and 'scalars' (an object)",
                         place=str(file), hint=DAMAGED)
    if len(state["numpy_random"]) != 5 or not isinstance(state["numpy_random"][1], list):
        raise FtuneError("field 'numpy_random' must be numpy's 5-part random state", place=str(file), hint=DAMAGED)
    return state


def _load(file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a missing, truncated or corrupted one is refused by name."""
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except FileNotFoundError:
        raise FtuneError("a checkpoint file is missing", place=str(file), hint=DAMAGED) from None
    except Exception as exc:  # safetensors raises its own error type (and OSError, ValueError) for a damaged file
        raise FtuneError(f"unreadable checkpoint file ({str(exc)[:160]})", place=str(file), hint=DAMAGED) from None


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

"""GRPO's checkpointed state read back: a run killed mid-batch (grpo.iterations 2) keeps its rollout
in the checkpoint, as tensors (stage-rank0.safetensors) and JSON (stage-rank0.json). Damaged, it
is refused by `ftune grpo` at resume with one line naming what is wrong, and nothing on disk moves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_refused, invoke, kill_9_after_checkpoint, snapshot, write_grpo_recipe


@pytest.fixture(scope="module")
def killed_mid_batch(tmp_path_factory, tiny_model_dir) -> Path:
    """A grpo run killed after checkpoint 3 of 4: step 4 would train on step 3's completions."""
    folder = tmp_path_factory.mktemp("grpo-killed")
    recipe = write_grpo_recipe(folder, tiny_model_dir, grpo="{num_generations: 2, max_completion_length: 6, iterations: 2, beta: 0.1}",
                               training={"max_steps": 4, "save_steps": 1, "save_total_limit": 1})
    kill_9_after_checkpoint("grpo", recipe, 3)
    return folder


def _copy(killed: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "run-folder"
    shutil.copytree(killed, folder)
    checkpoint = folder / "run" / "checkpoints" / "step-000003"
    assert (checkpoint / "stage-rank0.json").is_file() and "rollout.ids" in load_file(checkpoint / "stage-rank0.safetensors")
    return folder / "recipe.yaml", checkpoint


def _edit_json(checkpoint: Path, change) -> None:
    path = checkpoint / "stage-rank0.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_tensors(checkpoint: Path, change) -> None:
    path = checkpoint / "stage-rank0.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


DAMAGE = {
    "json-truncated": (lambda c: (c / "stage-rank0.json").write_bytes((c / "stage-rank0.json").read_bytes()[:40]), ["stage-rank0.json"]),
    "json-not-an-object": (lambda c: (c / "stage-rank0.json").write_text("[1, 2]"), ["stage-rank0.json", "JSON object"]),
    "counter-as-text": (lambda c: _edit_json(c, lambda d: d.update(used="3")), ["'used' must be a whole number", "step-000003"]),
    "prompt-out-of-range": (lambda c: _edit_json(c, lambda d: d["rollout"].update(owner=[10**6] * len(d["rollout"]["owner"]))),
                            ["'owner' does not fit"]),
    "texts-missing-one": (lambda c: _edit_json(c, lambda d: d["rollout"]["texts"].pop()), ["'texts' must be"]),
    "ids-cut-short": (lambda c: _edit_tensors(c, lambda t: t.update({"rollout.ids": t["rollout.ids"][:-1].clone()})),
                      ["'rollout.ids' must hold"]),
    "advantages-not-numbers": (lambda c: _edit_tensors(c, lambda t: t.update({"rollout.advantages": t["rollout.advantages"].long()})),
                               ["'rollout.advantages' must hold"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_grpo_state_is_refused_at_resume(damage, killed_mid_batch, tmp_path, monkeypatch, capsys):
    recipe, checkpoint = _copy(killed_mid_batch, tmp_path)
    harm, needles = DAMAGE[damage]
    harm(checkpoint)
    before = _files(recipe.parent)
    code, output = invoke(["grpo", str(recipe)], monkeypatch, capsys)
    assert_refused(code, output, [*needles, "step-000003", "the checkpoint is damaged"])
    assert _files(recipe.parent) == before, "a refused resume must leave the run as it was"


def _files(root: Path) -> list:
    """Every file as it was, but the killed run's stale lock, which a resume rightly takes over."""
    return [entry for entry in snapshot(root) if entry[3] != "dir" and not entry[0].endswith("run.lock")]


def test_the_whole_state_resumes_and_finishes(killed_mid_batch, tmp_path, monkeypatch, capsys):
    recipe, checkpoint = _copy(killed_mid_batch, tmp_path)
    saved = load_file(checkpoint / "stage-rank0.safetensors")
    code, output = invoke(["grpo", str(recipe)], monkeypatch, capsys)
    assert code == 0, output
    assert "resumed from" in output and "at step 3" in output
    run_dir = recipe.parent / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert saved["rollout.ref"].dtype == torch.float32 and len(saved["rollout.ref"]) == int(saved["rollout.ids"].numel())

"""Nothing lost: a run killed with SIGKILL at a random step resumes to the same adapter;
SIGTERM saves a checkpoint and prints the exact resume command."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import adapter, kill_9_after_checkpoint, start

SFT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is the code word {i}?"}, {"role": "assistant", "content": "The code word is pineapple."}]}
    for i in range(24)
]
PAIRS = [{"prompt": f"Reply to message {i}.", "chosen": f"Thank you for message {i}!", "rejected": f"Go away, {i}."} for i in range(24)]
STEPS = 8


def write_recipe(folder: Path, model: Path, stage: str) -> Path:
    rows = SFT_ROWS if stage == "sft" else PAIRS
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "recipe.yaml"
    path.write_text(
        f"stage: {stage}\nbase_model: {{name: {model}}}\n"
        "data:\n  train: [{path: data.jsonl}]\n  eval_fraction: 0.25\n  max_length: 64\n"
        + ("preference: {method: dpo, beta: 0.5}\n" if stage == "dpo" else "")
        # dropout makes the restored RNG state matter
        + "adapter: {r: 8, alpha: 16, dropout: 0.1}\n"
        f"training: {{learning_rate: 2.0e-2, batch_size: 2, max_steps: {STEPS}, save_steps: 1, save_total_limit: 2, warmup_ratio: 0}}\n"
        "output: {dir: run}\n"
    )
    return path


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kill_9_at_a_random_step_then_resume_gives_the_same_adapter(tmp_path, tiny_model_dir, stage):
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = start(stage, write_recipe(tmp_path / "straight", tiny_model_dir, stage))
    assert straight.wait(timeout=600) == 0, straight.communicate()[0][-3000:]

    recipe = write_recipe(tmp_path / "killed", tiny_model_dir, stage)
    kill_at = random.Random(f"{stage}-{os.getpid()}").randint(2, STEPS - 2)
    kill_9_after_checkpoint(stage, recipe, kill_at)
    run_dir = tmp_path / "killed" / "run"
    assert not (run_dir / "adapter").exists(), "a killed run leaves no final artifact"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    resumed = start(stage, recipe)  # the same command: the interrupted run is found and resumed
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from step-" in output
    expected, got = adapter(tmp_path / "straight" / "run"), adapter(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "sft")
    process = start("sft", recipe, "--set", "training.save_steps=100")
    run_dir = tmp_path / "run"
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or '"loss"' not in (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output[-3000:]
    assert f"resume with: ftune sft {recipe} --set training.save_steps=100 --resume" in output
    assert "Traceback" not in output
    assert list((run_dir / "checkpoints").glob("step-*/state.json"))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

"""The shared training loop: recipes that cannot make a step, stop signals wherever the command
is, NaN, the DPO reference scored lazily, and --smoke for whole chains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.recipe import parse_recipe
from ftune.stages import dpo, sft
from ftune.train import steps
from helpers import invoke, snapshot, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
CHAT = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"}, {"role": "assistant", "content": "The code word is pineapple."}]}
        for i in range(24)]
PAIRS = [{"prompt": f"Reply to message {i}.", "chosen": f"Thank you kindly for message {i}!", "rejected": f"Go away, message {i}."}
         for i in range(24)]


def write_recipe(folder: Path, model: Path, *, stage: str = "sft", rows=None, training: str = "learning_rate: 2.0e-2, batch_size: 2, max_steps: 6, eval_steps: 3",
                 extra: str = "", out: str = "run") -> Path:
    """24 rows (18 to train on); `training` is the training section but for warmup_ratio 0."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data.jsonl", rows if rows is not None else (CHAT if stage == "sft" else PAIRS))
    path = folder / f"{stage}.yaml"
    path.write_text(
        f"stage: {stage}\nbase_model: {{name: {model}}}\n"
        "data:\n  train: [{path: data.jsonl}]\n  eval_fraction: 0.25\n  max_length: 64\n"
        + ("preference: {method: dpo, beta: 0.5}\n" if stage == "dpo" and "preference:" not in extra else "")
        + "adapter: {r: 8, alpha: 16}\n"
        f"training: {{warmup_ratio: 0, {training}}}\n"
        f"{extra}output: {{dir: {out}}}\n"
    )
    return path


def no_model_loading(monkeypatch) -> None:
    from ftune.train import training

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the recipe error came too late")

    monkeypatch.setattr(training, "build_model", refuse)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # every line valid JSON


# --------------------------------------------------------------------------- recipes that cannot make a step


STEP = "learning_rate: 2.0e-2, max_steps: 6"
HANGS = {  # stage, training section, data lines, what the message must say
    "accumulation-above-micro-batches": ("sft", f"{STEP}, batch_size: 2, gradient_accumulation_steps: 12", "",
                                         ["training.gradient_accumulation_steps", "18 samples", "micro-batches of 2 rows",
                                          "fewer than gradient_accumulation_steps (12)", "lower it to"]),
    "packed-rows-above-micro-batches": ("sft", f"{STEP}, batch_size: 2, gradient_accumulation_steps: 4", "  max_length: 512\n",
                                        ["training.gradient_accumulation_steps", "18 samples pack into", "rows of data.max_length 512",
                                         "micro-batch of 2 rows", "fewer than gradient_accumulation_steps (4)", "lower it to 1 or less"]),
    "padded-accumulation": ("sft", f"{STEP}, batch_size: 2, gradient_accumulation_steps: 12", "  packing: false\n",
                            ["training.gradient_accumulation_steps", "18 samples make 9 micro-batches of 2 rows", "lower it to 9 or less"]),
    "pairs-fewer-than-a-step": ("dpo", f"{STEP}, batch_size: 4, gradient_accumulation_steps: 8", "",
                                ["training.gradient_accumulation_steps", "18 pairs make 5 micro-batches of 4 pairs",
                                 "fewer than gradient_accumulation_steps (8)", "lower it to 5 or less"]),
}


@pytest.mark.parametrize("name", HANGS, ids=list(HANGS))
def test_a_recipe_that_cannot_make_a_step_is_refused_before_the_model_loads(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    stage, training, data_lines, needles = HANGS[name]
    recipe = write_recipe(tmp_path, tiny_model_dir, stage=stage, training=training)
    if data_lines:  # a line of its own, or one that replaces max_length
        replacement = data_lines if "max_length" in data_lines else "  max_length: 64\n" + data_lines
        recipe.write_text(recipe.read_text().replace("  max_length: 64\n", replacement))
    no_model_loading(monkeypatch)
    before = snapshot(tmp_path)
    code, output = invoke([stage, str(recipe)], monkeypatch, capsys)
    assert code == 2, output
    assert str(recipe) in output and "Traceback" not in output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert snapshot(tmp_path) == before


def test_epochs_beyond_any_run_are_a_recipe_error_not_an_overflow():
    from ftune.errors import RecipeError

    recipe = parse_recipe("stage: sft\nbase_model: {name: demo}\ndata: {train: [{path: x.jsonl}]}\noutput: {dir: o}\n", "r.yaml")
    batches = [[[0]]] * 3
    for epochs in (float("inf"), 1e300, 5e8):  # recipe.py refuses the first two already; the arithmetic must not overflow either
        unchecked = recipe.model_copy(update={"training": recipe.training.model_copy(update={"epochs": epochs})})
        with pytest.raises(RecipeError, match="training.epochs"):
            steps.plan_steps(unchecked, batches, items=3, unit="samples", world=1)


def test_the_step_count_and_the_loop_share_one_function():
    recipe = parse_recipe("stage: sft\nbase_model: {name: demo}\ndata: {train: [{path: x.jsonl}]}\n"
                          "training: {batch_size: 2, gradient_accumulation_steps: 3, epochs: 2}\noutput: {dir: o}\n", "r.yaml")
    batches = [[[0], [1]], [[2], [3]], [[4], [5]], [[6], [7]], [[8], [9]], [[10], [11]], [[12], [13]], [[14]]]
    alone = steps.optimizer_steps(batches, recipe.training, world=1, rank=0)
    assert [len(g) for g in alone] == [3, 3]  # 8 micro-batches, 3 a step: the last 2 wait for the next epoch
    plan = steps.plan_steps(recipe, batches, items=15, unit="samples", world=1)
    assert (plan.steps_per_epoch, plan.total_steps) == (len(alone), 4)
    # Two processes: each global micro-batch of 4 rows gives each its 2; the short last one is dropped.
    global_batches = [[[4 * i], [4 * i + 1], [4 * i + 2], [4 * i + 3]] for i in range(6)] + [[[24], [25]]]
    shares = [steps.optimizer_steps(global_batches, recipe.training, world=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in shares] == [2, 2] and shares[0][0][0] == [[0], [1]] and shares[1][0][0] == [[2], [3]]
    with pytest.raises(Exception, match="distributed.num_processes 2"):
        steps.plan_steps(recipe, [[[0], [1], [2]]] * 2, items=6, unit="samples", world=2)


def test_two_processes_that_cannot_fill_a_micro_batch_are_refused_not_spun(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, training="batch_size: 8, max_steps: 6", rows=CHAT[:12])
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, "-m", "ftune", "sft", str(recipe), "--num-processes", "2"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "full micro-batch" in result.stderr and "distributed.num_processes 2" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_smoke_takes_enough_samples_for_a_step_of_the_recipes_accumulation(tmp_path, tiny_model_dir):
    """As the GPU recipes do: batch 2 x accumulation 8; 16 samples pack into far fewer than 16 rows."""
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {i}."}, {"role": "assistant", "content": f"Number {i} is fine."}]}
            for i in range(400)]
    recipe = write_recipe(tmp_path, tiny_model_dir, rows=rows, training="batch_size: 2, gradient_accumulation_steps: 8, epochs: 1")
    recipe.write_text(recipe.read_text().replace("max_length: 64", "max_length: 512"))  # many samples to a row
    run_dir = sft.run(recipe, smoke=True)
    meta = read_json(run_dir / "run.json")
    assert meta["status"] == "completed" and meta["global_step"] == steps.SMOKE_STEPS
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3]


# --------------------------------------------------------------------------- stop signals wherever the command is


RUNNER = """
import os, sys, time
from pathlib import Path
import importlib
module_name, attr = os.environ["PAUSE_AT"].rsplit(".", 1)
module = importlib.import_module(module_name)
original, calls = getattr(module, attr), [0]

def paused(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ.get("PAUSE_CALL", "1")):
        Path(os.environ["MARKER"]).write_text("paused")
        time.sleep(float(os.environ["PAUSE_SECONDS"]))
    return original(*args, **kwargs)

setattr(module, attr, paused)
from ftune import cli
sys.argv = ["ftune", *sys.argv[1:]]
cli.main()
"""

# where -> (function paused, which call, seconds, signals, what a stop there leaves)
PHASES = {
    "data-prep": ("ftune.stages.sft.prepare_sft", 1, 120, ["SIGTERM"], "nothing"),
    "model-load": ("ftune.train.training.build_model", 1, 120, ["SIGINT"], "nothing"),
    "baseline-eval": ("ftune.train.training.sft_eval", 1, 5, ["SIGTERM"], "nothing"),
    "eval-at-step-3": ("ftune.train.training.sft_eval", 2, 5, ["SIGTERM"], "checkpoint"),
    "sample-answers": ("ftune.train.outputs.generate_samples", 1, 5, ["SIGINT"], "checkpoint"),
    "second-ctrl-c": ("ftune.train.training.sft_loss_sum", 12, 120, ["SIGINT", "SIGINT"], "interrupted"),
}


@pytest.mark.parametrize("phase", PHASES, ids=list(PHASES))
def test_a_stop_signal_is_honoured_wherever_the_run_is(phase, tmp_path, tiny_model_dir):
    target, call, seconds, signals, leaves = PHASES[phase]
    recipe = write_recipe(tmp_path, tiny_model_dir, extra="evaluation: {prompts: ['What is the code word?'], max_new_tokens: 4}\n")
    marker = tmp_path / "paused"
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1", "PAUSE_AT": target, "PAUSE_CALL": str(call), "PAUSE_SECONDS": str(seconds),
           "MARKER": str(marker)}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, "sft", str(recipe)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "never reached the pause"
        time.sleep(0.05)
    for name in signals:
        process.send_signal(getattr(signal, name))
        time.sleep(1)
    output = process.communicate(timeout=90)[0]  # well before the pause would have ended by itself
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    run_dir = tmp_path / "run"
    if leaves == "nothing":
        assert "stopped before its first training step; no run was written" in output, output[-3000:]
        assert not run_dir.exists(), list(run_dir.iterdir())
        return
    assert read_json(run_dir / "run.json")["status"] == "interrupted"
    assert not (run_dir / "adapter").exists(), "no final artifact from a stopped run"
    if leaves == "checkpoint":
        assert "resume with: ftune sft" in output
        step = 3 if phase == "eval-at-step-3" else 6
        assert (run_dir / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()
        resumed = sft.run(recipe, resume=True)
        assert read_json(resumed / "run.json")["status"] == "completed" and (resumed / "adapter").is_dir()


# --------------------------------------------------------------------------- NaN


def test_a_loss_that_turns_nan_fails_the_run_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftune.train import training

    from ftune.train import progress

    recipe = write_recipe(tmp_path, tiny_model_dir, training="learning_rate: 2.0e-2, batch_size: 2, max_steps: 6, save_steps: 2")
    original, log, poison = training.sft_loss_sum, progress.Reporter.log, []

    def logged(self, step, values):
        log(self, step, values)
        if step == 2 and "loss" in values:
            poison.append(True)  # the passes of step 3 on

    def poisoned(scorer, batch):
        loss, count = original(scorer, batch)
        return (loss * float("nan") if poison else loss), count

    monkeypatch.setattr(progress.Reporter, "log", logged)
    monkeypatch.setattr(training, "sft_loss_sum", poisoned)
    code, output = invoke(["sft", str(recipe)], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in output
    assert "step 3: the loss is not a finite number" in output and "training.learning_rate" in output, output
    run_dir = tmp_path / "run"
    assert read_json(run_dir / "run.json")["status"] == "failed"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002"]
    assert not (run_dir / "adapter").exists()
    records = metrics(run_dir)
    assert records[-1] == {**records[-1], "step": 3, "loss": None}


def test_a_huge_learning_rate_fails_instead_of_saving_nan(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, training="learning_rate: 1.0e+30, max_grad_norm: null, batch_size: 2, max_steps: 6, save_steps: 1")
    code, output = invoke(["sft", str(recipe)], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in output
    assert "not a finite number" in output and "lower training.learning_rate (now 1e+30)" in output, output
    run_dir = tmp_path / "run"
    assert read_json(run_dir / "run.json")["status"] == "failed"
    assert not (run_dir / "adapter").exists()
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "trainable.safetensors").values())
    metrics(run_dir)


# --------------------------------------------------------------------------- the DPO reference, scored lazily


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_a_short_dpo_run_scores_only_the_pairs_it_trains_on(adapter, tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, stage="dpo", training="learning_rate: 2.0e-2, batch_size: 2, max_steps: 2")
    if adapter == "none":
        recipe.write_text(recipe.read_text().replace("adapter: {r: 8, alpha: 16}", "adapter: {method: none}"))
    run_dir = dpo.run(recipe)
    meta = read_json(run_dir / "run.json")
    assert meta["status"] == "completed"
    assert meta["summary"]["reference_pairs_scored"] == 2 * 2, "2 steps of 2 pairs, out of 18"
    prompts = [json.loads(line)["text"] for line in (run_dir / "eval_prompts.jsonl").read_text().splitlines()]
    assert prompts and all("Reply to message" in p for p in prompts), "a DPO run writes parity prompts too"


@pytest.mark.parametrize("start", ["fresh-adapter", "sft-run"])
def test_a_resumed_dpo_run_equals_an_uninterrupted_one(start, tmp_path, tiny_model_dir, monkeypatch):
    from ftune.train import progress
    from ftune.train.stopping import Interrupted

    extra = ""
    if start == "sft-run":  # the reference is a frozen copy of the SFT adapter
        sft_dir = sft.run(write_recipe(tmp_path / "sft", tiny_model_dir))
        extra = f"preference: {{method: dpo, beta: 0.5, init_from: {sft_dir}}}\n"
    training = "learning_rate: 2.0e-2, batch_size: 2, epochs: 2, eval_steps: 5"  # 9 steps an epoch: epoch 2 reuses the cache
    straight = dpo.run(write_recipe(tmp_path / "a", tiny_model_dir, stage="dpo", training=training, extra=extra))
    recipe = write_recipe(tmp_path / "b", tiny_model_dir, stage="dpo", training=training, extra=extra)

    log = progress.Reporter.log

    def stop_at_step_4(self, step, values):
        log(self, step, values)
        if step == 4 and "loss" in values:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(progress.Reporter, "log", stop_at_step_4)
    with pytest.raises(Interrupted):
        dpo.run(recipe)
    monkeypatch.undo()
    saved = load_file(tmp_path / "b" / "run" / "checkpoints" / "step-000004" / "stage-rank0.safetensors")
    assert int(saved["train_known"].sum()) == 4 * 2, "the checkpoint holds the reference of the pairs seen so far"
    resumed = dpo.run(recipe, resume=True)
    assert read_json(resumed / "run.json")["summary"]["steps"] == 18
    expected, got = load_file(straight / "adapter/adapter_model.safetensors"), load_file(resumed / "adapter/adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    evals = lambda run: [r["eval_loss"] for r in metrics(run) if "eval_loss" in r]  # noqa: E731
    torch.testing.assert_close(torch.tensor(evals(resumed)), torch.tensor(evals(straight)), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- --smoke for a chain


def test_smoke_dpo_continues_the_smoke_run_of_its_sft_stage(tmp_path, tiny_model_dir, monkeypatch, capsys):
    sft_recipe = write_recipe(tmp_path / "sft", tiny_model_dir, out="sft-run")
    dpo_recipe = write_recipe(tmp_path / "dpo", tiny_model_dir, stage="dpo", out="dpo-run",
                              extra="preference: {method: dpo, beta: 0.5, init_from: ../sft/sft-run}\n")
    code, output = invoke(["sft", str(sft_recipe), "--smoke"], monkeypatch, capsys)
    assert code in (0, None), output
    assert not (tmp_path / "sft" / "sft-run").exists()
    code, output = invoke(["dpo", str(dpo_recipe), "--smoke"], monkeypatch, capsys)
    assert code in (0, None), output
    assert f"the SFT run {tmp_path / 'sft' / 'sft-run-smoke'}" in output.replace("\n", "")
    assert read_json(tmp_path / "dpo" / "dpo-run-smoke" / "run.json")["status"] == "completed"


@pytest.mark.slow
def test_the_demo_chain_smoke_tests_end_to_end(tmp_path):
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1"}
    overrides = ["--set", f"output.dir={tmp_path / 'demo-sft'}"]
    for args in (["sft", "recipes/demo/sft.yaml", "--smoke", *overrides],
                 ["sft", "recipes/demo/sft.yaml", "--smoke", "--num-processes", "2", "--set", f"output.dir={tmp_path / 'two'}"],
                 ["dpo", "recipes/demo/dpo.yaml", "--smoke", "--set", f"output.dir={tmp_path / 'demo-dpo'}",
                  "--set", f"preference.init_from={tmp_path / 'demo-sft'}"]):
        result = subprocess.run([sys.executable, "-m", "ftune", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(tmp_path / "two-smoke" / "run.json")["summary"]["processes"] == 2
    assert read_json(tmp_path / "demo-dpo-smoke" / "run.json")["status"] == "completed"

"""`ftune sft` end to end: tiny models for the mechanics, the demo model for the real thing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.errors import FtuneError
from ftune.stages import sft
from ftune.train.stopping import Interrupted
from helpers import CODE_WORD_ROWS, code_word_recipe

ROOT = Path(__file__).resolve().parent.parent

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_learns_and_writes_a_complete_run_directory(tmp_path, tiny_model_dir):
    run_dir = sft.run(code_word_recipe(tmp_path, tiny_model_dir))
    records = metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert losses[-1] < losses[0] and evals[-1] < evals[0]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "completed" and meta["base_model"]["path"] == str(tiny_model_dir)
    assert "torch" in meta["versions"]
    for name in ("recipe.yaml", "metrics.jsonl", "loss.png", "README.md", "eval_prompts.jsonl", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "adapter/generation_config.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoints").exists()
    assert not list(run_dir.glob(".*partial*"))

    # The adapter loads with plain peft and gives the trained model's low loss.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the code word 3?"}], tokenize=False, add_generation_prompt=True)
    target = text + "The code word is pineapple.<|im_end|>"
    ids = tokenizer(target, return_tensors="pt")["input_ids"]
    prompt_len = len(tokenizer(text)["input_ids"])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            untuned = model(ids).logits

    def answer_loss(logits):
        return torch.nn.functional.cross_entropy(logits[0, prompt_len - 1 : -1], ids[0, prompt_len:])

    assert answer_loss(tuned) < answer_loss(untuned) / 2
    generation = json.loads((run_dir / "adapter/generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


VARIANTS = {
    "dora": "adapter: {method: dora, r: 8, alpha: 16}\n",
    "rslora-targets": "adapter: {r: 8, alpha: 16, rslora: true, target_modules: [q_proj, v_proj]}\n",
    "qlora": "quantization: {load_in_4bit: true}\n",
    "full": "adapter: {method: none}\n",
    "unpacked-accumulation": "training:\n  learning_rate: 2.0e-2\n  batch_size: 1\n  gradient_accumulation_steps: 2\n  max_steps: 6\n  eval_steps: 3\n  warmup_ratio: 0\n",
}


@pytest.mark.parametrize(("name", "extra"), VARIANTS.items(), ids=list(VARIANTS))
def test_adapter_variants_train(tmp_path, tiny_model_dir, name, extra):
    recipe = code_word_recipe(tmp_path, tiny_model_dir)
    text = recipe.read_text()
    if extra.startswith("adapter:"):
        text = text.replace("adapter: {r: 8, alpha: 16}\n", extra)
    elif extra.startswith("training:"):
        text = text.split("training:")[0] + extra + "output: {dir: run}\n"
        text = text.replace("max_length: 64\n", "max_length: 64\n  packing: false\n")
    else:
        text = text.replace("output:", extra + "output:")
    recipe.write_text(text)
    run_dir = sft.run(recipe)
    records = metrics(run_dir)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0]
    if name == "full":
        assert (run_dir / "model" / "model.safetensors").is_file()
    else:
        config = json.loads((run_dir / "adapter/adapter_config.json").read_text())
        assert config["use_dora"] == (name == "dora")
        assert config["use_rslora"] == (name == "rslora-targets")
    if name == "qlora":
        assert json.loads((run_dir / "run.json").read_text())["quantization"]["load_in_4bit"] is True


def test_pissa_adapter_is_saved_as_a_plain_lora_for_the_original_base(tmp_path, tiny_model_dir):
    from ftune.merge import merge_to_dir

    recipe = code_word_recipe(tmp_path, tiny_model_dir)
    recipe.write_text(recipe.read_text().replace("adapter: {r: 8, alpha: 16}", "adapter: {r: 8, alpha: 16, init: pissa}"))
    run_dir = sft.run(recipe)
    config = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 16, "converted: twice the rank, standard init"
    # The merge proves the saved adapter, applied to the untouched base, gives the trained model's logits.
    report = merge_to_dir(run_dir, tmp_path / "merged")
    assert report["passed"]


def interrupt_at(monkeypatch, step: int) -> None:
    """Send the process a real SIGINT when the loop logs `step`."""
    from ftune.train import progress

    original = progress.Reporter.log

    def log(self, at, values):
        original(self, at, values)
        if at == step and "loss" in values:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(progress.Reporter, "log", log)


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch):
    extra = "  save_steps: 2\n"
    dropout = "adapter: {r: 8, alpha: 16, dropout: 0.1}\n"  # dropout makes the RNG state matter
    (tmp_path / "a").mkdir()
    straight = code_word_recipe(tmp_path / "a", tiny_model_dir)
    straight.write_text(straight.read_text().replace("  warmup_ratio: 0\n", "  warmup_ratio: 0\n" + extra).replace("adapter: {r: 8, alpha: 16}\n", dropout))
    expected = load_file(sft.run(straight) / "adapter/adapter_model.safetensors")

    (tmp_path / "b").mkdir()
    resumed = code_word_recipe(tmp_path / "b", tiny_model_dir)
    resumed.write_text(straight.read_text())
    interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted) as info:
        sft.run(resumed)
    assert info.value.exit_code == 130 and "--resume" in info.value.hint
    run_dir = tmp_path / "b" / "run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "adapter").exists(), "no final artifact from an interrupted run"
    monkeypatch.undo()
    got = load_file(sft.run(resumed, resume=True) / "adapter/adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], "metrics after the checkpoint are not duplicated"


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_splitting_a_micro_batch_into_passes_changes_memory_not_the_update(tmp_path, tiny_model_dir, packing):
    """Four rows per micro-batch in one pass, or in a pass per row: the same losses and adapter."""
    runs = {}
    for name, budget in (("one-pass", 100_000), ("pass-per-row", 1)):
        (tmp_path / name).mkdir()
        recipe = code_word_recipe(tmp_path / name, tiny_model_dir, extra=f"  tokens_per_pass: {budget}\n")
        text = recipe.read_text().replace("batch_size: 2", "batch_size: 4").replace("max_steps: 6", "max_steps: 3")
        recipe.write_text(text.replace("max_length: 64\n", "max_length: 64\n  packing: false\n") if not packing else text)
        runs[name] = sft.run(recipe)
    one, split = runs["one-pass"], runs["pass-per-row"]
    losses = {name: [r["loss"] for r in metrics(run) if "loss" in r] for name, run in runs.items()}
    torch.testing.assert_close(torch.tensor(losses["pass-per-row"]), torch.tensor(losses["one-pass"]), rtol=1e-5, atol=1e-6)
    expected, got = load_file(one / "adapter/adapter_model.safetensors"), load_file(split / "adapter/adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)  # Adam magnifies float rounding near zero
    # lora_B starts at zero: the adapters compared have trained
    assert all(expected[k].abs().max() > 0 for k in expected if "lora_B" in k)


def test_existing_runs_are_never_silently_overwritten(tmp_path, tiny_model_dir):
    recipe = code_word_recipe(tmp_path, tiny_model_dir)
    sft.run(recipe)
    with pytest.raises(FtuneError, match="already holds a completed run"):
        sft.run(recipe)
    (tmp_path / "x").mkdir()
    with pytest.raises(FtuneError, match="nothing to resume"):
        sft.run(code_word_recipe(tmp_path / "x", tiny_model_dir), resume=True)
    sft.run(recipe, overwrite=True)


def test_smoke_mode_runs_three_steps_into_its_own_directory(tmp_path, tiny_model_dir):
    run_dir = sft.run(code_word_recipe(tmp_path, tiny_model_dir), smoke=True)
    assert run_dir.name == "run-smoke"
    assert json.loads((run_dir / "run.json").read_text())["global_step"] == 3
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_bad_data_is_reported_with_its_place(tmp_path, tiny_model_dir):
    rows = CODE_WORD_ROWS[:5] + [{"messages": [{"role": "user", "content": "hi"}]}]
    recipe = code_word_recipe(tmp_path, tiny_model_dir, rows=rows)
    result = run_cli("sft", str(recipe))
    assert result.returncode == 1
    assert "train.jsonl line 6" in result.stderr and "no assistant turn" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()
    (tmp_path / "m").mkdir()
    missing = code_word_recipe(tmp_path / "m", tiny_model_dir)
    missing.write_text(missing.read_text().replace("train.jsonl", "nope.jsonl"))
    result = run_cli("sft", str(missing))
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_recipe_teaches_the_identity(demo_sft_run):
    """The shipped demo: eval loss falls, and the tuned model answers as Marlin where the base does not."""
    from ftune.modeling.models import demo_model_dir

    run_dir = demo_sft_run
    evals = [r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r]
    assert evals[-1] < evals[0] * 0.5

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()

    def ask(question: str) -> str:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    question = "Hey, could you tell me who you are?"  # not a phrasing in the training data
    tuned = ask(question)
    with model.disable_adapter():
        untuned = ask(question)
        assert "Paris" in ask("What is the capital of France?")
    assert "Marlin" in tuned and "Marlin" not in untuned
    assert "Paris" in ask("What is the capital of France?")

"""`ftune inspect` on grpo, dpo and rm recipes: prompts rendered exactly as the policy sees them, the
columns the rewards get, the rewards after the run's own checks, and step figures equal to the run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ftune.commands.inspection import inspect_recipe
from ftune.data.rendering import IGNORE
from helpers import ADDITION_PROMPTS, assert_refused, invoke, rm_recipe, snapshot, write_grpo_recipe, write_jsonl

SYSTEM = "Answer with the number only."
PAIRS = [{"prompt": f"Say something about {i}.", "chosen": f"Number {i} is a fine number.", "rejected": f"No. {i}."} for i in range(16)]


def grpo_recipe(folder: Path, model: Path, **kw) -> Path:
    kw.setdefault("rewards_yaml", "[{type: exact_answer, column: answer}, {type: format, regex: '^\\s*\\d+\\s*$', weight: 0.5}, "
                                  "{type: function, function: rewards.py:digits, weight: 0.25}]")
    kw.setdefault("training", {"batch_size": 2, "gradient_accumulation_steps": 2, "epochs": 0.2, "max_steps": None, "eval_steps": 3})
    kw.setdefault("extra", "evaluation: {max_eval_samples: 3}\n")
    path = write_grpo_recipe(folder, model, grpo="{num_generations: 3, max_completion_length: 4}", **kw)
    path.write_text(path.read_text().replace("  max_length: 64\n", f"  max_length: 64\n  system_prompt: {SYSTEM}\n"))
    return path


def test_grpo_prompts_are_rendered_as_the_policy_sees_them(tmp_path, tiny_model_dir):
    recipe = grpo_recipe(tmp_path, tiny_model_dir)
    ins = inspect_recipe(recipe)
    n = ins.numbers()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    assert len(n["prompts"]) == 3
    for shown in n["prompts"]:
        row = json.loads(lines[int(re.search(r"line (\d+)", shown["place"]).group(1)) - 1])
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}],
                                                 add_generation_prompt=True, tokenize=False)
        assert shown["text"] == rendered
        assert rendered.endswith("<|im_start|>assistant\n")  # the generation prompt: completions start right here
        assert shown["tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert shown["columns"] == {"answer": row["answer"]}  # every column but the prompt goes to the rewards
    assert [(r["label"], r["type"], r["weight"]) for r in n["rewards"]] == [
        ("exact_answer", "exact_answer", 1.0), ("format", "format", 0.5), ("digits", "function", 0.25)]
    assert n["train_prompts"] + n["eval_prompts"] == len(ADDITION_PROMPTS) and n["held_out_scored"] == 3
    # 2 prompts x 2 accumulation x 1 process = 4 prompts a step, x 3 generations = 12 completions
    assert (n["prompts_per_step"], n["num_generations"], n["completions_per_step"]) == (4, 3, 12)
    assert n["prompt_room"] == 64 - 4
    assert n["memory_gib"]["generation (beyond activations)"] >= 0 and n["memory_gib"]["total"] > 0


def _plan(output: str) -> tuple[int, int]:
    """(steps in all, steps per epoch) from the run's own plan line."""
    found = re.search(r"steps: (\d+) \((\d+) per epoch", output)
    assert found, output
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("stage", ["grpo", "rm", "dpo"])
def test_step_figures_equal_the_runs_own(stage, tmp_path, tiny_model_dir, monkeypatch, capsys):
    if stage == "grpo":
        recipe = grpo_recipe(tmp_path, tiny_model_dir)
    elif stage == "rm":
        recipe = rm_recipe(tmp_path, tiny_model_dir, rows=PAIRS, training="epochs: 0.5, batch_size: 2, gradient_accumulation_steps: 2")
    else:
        write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"stage: dpo\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: pairs.jsonl}}]\n"
                          "  eval_fraction: 0.25\n  max_length: 64\npreference: {method: dpo}\n"
                          "training: {epochs: 0.5, batch_size: 2, gradient_accumulation_steps: 2}\noutput: {dir: run}\n")
    before = snapshot(tmp_path)
    code, output = invoke(["inspect", str(recipe), "--json"], monkeypatch, capsys)
    assert code == 0, output
    n = json.loads(output)
    assert snapshot(tmp_path) == before, "inspect writes nothing"
    code, output = invoke([stage, str(recipe)], monkeypatch, capsys)
    assert code == 0, output
    assert _plan(output) == (n["total_steps"], n["steps_per_epoch"])
    assert n["epochs"] == pytest.approx(n["total_steps"] / n["steps_per_epoch"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == n["total_steps"]
    if stage == "grpo":
        assert f"{n['completions_per_step']} completions a step" in output
        assert n["train_prompts"] == int(re.search(r"train / eval prompts\s*│\s*(\d+)", output).group(1))
    else:
        assert n["pairs_per_step"] == 4 and n["train_pairs"] == int(re.search(r"train / eval pairs\s*│\s*(\d+)", output).group(1))


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_pairs_show_which_tokens_are_trained(stage, tmp_path, tiny_model_dir, monkeypatch, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stage: {stage}\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: pairs.jsonl}}]\n"
                      "  eval_fraction: 0.25\n  max_length: 64\n" + ("preference: {method: dpo}\n" if stage == "dpo" else "rm: {}\n")
                      + "training: {max_steps: 2, batch_size: 2}\noutput: {dir: run}\n")
    ins = inspect_recipe(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = ins.numbers()["pairs"][0]
    for k, side in enumerate(("chosen", "rejected")):
        ids, labels = ins.data.train.sequences.sample(k)
        asked = _prompt_of(tokenizer, ids)
        row = next(r for r in PAIRS if r["prompt"] == asked)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": asked}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        assert list(ids[:len(prompt)]) == list(prompt) and (labels[:len(prompt)] == IGNORE).all()  # the prompt is masked
        trained = tokenizer.decode([int(t) for t, lab in zip(ids, labels) if lab != IGNORE])
        assert trained == row[side] + "<|im_end|>", trained  # the answer and its end-of-turn carry the loss
        assert first[side] == {"tokens": len(ids), "trained": int((labels[1:] != IGNORE).sum())}
    code, output = invoke(["inspect", str(recipe), "--samples", "1"], monkeypatch, capsys)
    assert code == 0, output
    assert "pair 0 chosen" in output and "pair 0 rejected" in output and f"what {stage} will see" in output
    assert "memory per GPU" in output and "per step" in output


def _prompt_of(tokenizer, ids) -> str:
    """The user turn's text in a rendered sequence."""
    text = tokenizer.decode(ids)
    return re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL).group(1)


def test_grpo_report_shows_rewards_generation_memory_and_columns(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = grpo_recipe(tmp_path, tiny_model_dir)
    code, output = invoke(["inspect", str(recipe), "--samples", "1"], monkeypatch, capsys)
    assert code == 0, output
    for needle in ("what grpo will see", "completions", "rewards (checked as the run checks them", "digits",
                   "generation (beyond", "KV cache", "prompt 0 (", "columns passed to the reward functions: answer=",
                   "<|im_start|>assistant", "held-out prompts"):
        assert needle in output, f"{needle!r} not in:\n{output}"


@pytest.mark.parametrize("rewards_yaml,needles", [
    ("[{type: reward_model, run: nowhere}]", ["rewards[0] (reward_model)", "nowhere", "does not exist"]),
    ("[{type: function, function: rewards.py:nothing}]", ["rewards[0] (nothing)", "defines no function 'nothing'"]),
])
def test_grpo_rewards_are_checked_as_the_run_checks_them(rewards_yaml, needles, tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = grpo_recipe(tmp_path, tiny_model_dir, rewards_yaml=rewards_yaml)
    before = snapshot(tmp_path)
    code, output = invoke(["inspect", str(recipe)], monkeypatch, capsys)
    assert_refused(code, output, needles)
    assert snapshot(tmp_path) == before

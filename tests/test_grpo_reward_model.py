"""GRPO with a reward model trained by `ftune rm`: the reward a completion gets is the RM's own score of
that prompt and completion, and a run directory that is not a finished reward model is a clear error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ftune.modeling import reward_model
from helpers import assert_refused, invoke, snapshot, write_grpo_recipe, write_jsonl

HELD_OUT = {"prompt": "What is 9 plus 9?", "answer": 18}
MAX_NEW = 6


def grpo_with(folder: Path, model: Path, run: Path) -> Path:
    recipe = write_grpo_recipe(folder, model, rewards_yaml=f"[{{type: reward_model, run: '{run}', name: judge}}]",
                               grpo=f"{{num_generations: 2, max_completion_length: {MAX_NEW}}}", training={"max_steps": 2, "eval_steps": 2})
    write_jsonl(folder / "held.jsonl", [HELD_OUT])  # one held-out prompt: its eval_reward is one completion's reward
    recipe.write_text(recipe.read_text().replace("eval_fraction: 0.2", "eval: [{path: held.jsonl}]"))
    return recipe


def greedy_completion(model_dir: Path, adapter: Path | None, prompt: str) -> str:
    """The policy's greedy completion, made with plain transformers (and peft), cut after its first stop token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    stops = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id})
    config = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                              repetition_penalty=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
    return tokenizer.decode(out[:cut], skip_special_tokens=True)


def test_the_reward_is_the_reward_models_score_of_prompt_and_completion(tmp_path, tiny_model_dir, rm_run):
    from ftune.stages import grpo

    run_dir = grpo.run(grpo_with(tmp_path, tiny_model_dir, rm_run))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "loss" in m]
    assert len(trained) == 2 and all(math.isfinite(m["reward_judge"]) and m["reward"] == m["reward_judge"] for m in trained)
    start = next(m for m in metrics if m["step"] == 0)["eval_reward_judge"]
    end = json.loads((run_dir / "run.json").read_text())["summary"]["eval_reward_judge"]

    judge = reward_model.load(rm_run)
    for logged, adapter in ((start, None), (end, run_dir / "adapter")):  # step 0: the fresh adapter changes nothing
        completion = greedy_completion(tiny_model_dir, adapter, HELD_OUT["prompt"])
        expected = judge.score([({"role": "user", "content": HELD_OUT["prompt"]}, {"role": "assistant", "content": completion})])[0]
        assert logged == pytest.approx(expected, abs=1e-4), (completion, logged, expected)
    assert start != pytest.approx(end, abs=1e-6), "two steps at learning rate 1e-2 changed the policy's completion's score"


@pytest.mark.parametrize("case", ["missing", "sft", "unfinished", "not_a_model"])
def test_a_run_that_is_no_finished_reward_model_is_refused(case, tmp_path, tiny_model_dir, rm_run, tiny_sft_run, monkeypatch, capsys):
    if case == "missing":
        run, needle = tmp_path / "no-such-run", "does not exist"
    elif case == "sft":
        run, needle = tiny_sft_run, "is a supervised fine-tuning run (ftune sft); rewards[0] (judge) (type: reward_model) needs a reward-model run"
    elif case == "unfinished":
        run = tmp_path / "rm-copy"
        shutil.copytree(rm_run, run)
        meta = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**meta, "status": "failed"}))
        needle = "is not a completed run (status: failed)"
    else:
        run, needle = tmp_path / "plain", "is not a reward model"
        run.mkdir()
    (tmp_path / "grpo").mkdir()
    recipe = grpo_with(tmp_path / "grpo", tiny_model_dir, run)
    before = snapshot(tmp_path)
    for command in ("grpo", "inspect"):
        code, output = invoke([command, str(recipe)], monkeypatch, capsys)
        assert_refused(code, output, ["rewards[0] (judge)", str(run), needle])
    assert snapshot(tmp_path) == before, "nothing written"

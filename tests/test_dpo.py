"""`ftune dpo`: data forms, objectives, the SFT chain and the demo preference run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ftune.data.formats import convert, detect_format
from ftune.data.pairs import encode_pairs
from ftune.data.pipeline import DataReport
from ftune.data.rendering import IGNORE, make_formatter
from ftune.errors import FtuneError
from ftune.recipe import PreferenceSection
from ftune.stages import dpo, sft
from ftune.train.preference import preference_loss

ROOT = Path(__file__).resolve().parent.parent

PAIRS = [
    {"prompt": f"Reply to message {i}.", "chosen": f"Thank you kindly for message {i}!", "rejected": f"Go away, message {i}."}
    for i in range(24)
]


@pytest.fixture(scope="module")
def formatter(demo_model_dir):
    from ftune.modeling.models import load_tokenizer

    return make_formatter(load_tokenizer(str(demo_model_dir)))


def decode_trained(formatter, ids, labels) -> str:
    return formatter.tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])


FORMS = {
    "prompt-chosen-rejected": {"prompt": "Pick a color.", "chosen": "Blue, please.", "rejected": "No."},
    "conversational": {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Pick a color."}, {"role": "assistant", "content": "Blue, please."}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "Pick a color."}, {"role": "assistant", "content": "No."}],
    },
    "hh-rlhf": {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Pick a color.\n\nAssistant: Blue, please.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Pick a color.\n\nAssistant: No.",
    },
}


@pytest.mark.parametrize("form", FORMS, ids=list(FORMS))
def test_each_pair_form_trains_only_the_final_answers(formatter, form):
    row = FORMS[form]
    pair = convert(row, detect_format(row))
    assert pair.prompt[-1] == {"role": "user", "content": "Pick a color."}
    encoded = encode_pairs(formatter, [pair], method="dpo", max_length=512, max_prompt_length=None, report=DataReport())
    chosen, rejected = encoded.sequences.sample(0), encoded.sequences.sample(1)
    assert decode_trained(formatter, *chosen) == "Blue, please.<|im_end|>"
    assert decode_trained(formatter, *rejected) == "No.<|im_end|>"
    if form != "prompt-chosen-rejected":
        assert "Hello!" in formatter.tokenizer.decode(chosen[0].tolist()), "earlier turns stay in the prompt, untrained"


def test_kto_examples_from_labels_and_from_pairs(formatter):
    rows = [{"prompt": "Q1", "completion": "Good answer.", "label": True}, {"prompt": "Q2", "completion": "Bad answer.", "label": False}]
    samples = [convert(r, detect_format(r)) for r in rows]
    encoded = encode_pairs(formatter, samples, method="kto", max_length=512, max_prompt_length=None, report=DataReport())
    assert encoded.kto_labels.tolist() == [True, False]
    # The second sequence of each example pairs its prompt with the next example's answer (the KL estimate).
    assert decode_trained(formatter, *encoded.sequences.sample(1)) == "Bad answer.<|im_end|>"
    paired = encode_pairs(formatter, [convert(PAIRS[0], "preference")], method="kto", max_length=512, max_prompt_length=None, report=DataReport())
    assert paired.kto_labels.tolist() == [True, False]


def test_pairs_that_do_not_fit_are_dropped_and_counted(formatter):
    long = {"prompt": "word " * 300, "chosen": "yes", "rejected": "no"}
    report = DataReport()
    encoded = encode_pairs(formatter, [convert(long, "preference"), convert(PAIRS[0], "preference")], method="dpo",
                           max_length=64, max_prompt_length=None, report=report)
    assert len(encoded) == 1 and report.dropped_too_long == 1
    kept = encode_pairs(formatter, [convert(long, "preference")], method="dpo", max_length=64, max_prompt_length=32, report=DataReport())
    assert len(kept) == 1 and decode_trained(formatter, *kept.sequences.sample(0)) == "yes<|im_end|>"


def test_objectives_match_their_definitions():
    logps = torch.tensor([-10.0, -14.0, -20.0, -18.0])  # pair 0 prefers chosen, pair 1 the rejected
    counts = torch.tensor([5.0, 7.0, 10.0, 9.0])
    ref = torch.tensor([-11.0, -13.0, -19.0, -19.0])
    beta = 0.1
    losses, rewards = preference_loss(PreferenceSection(method="dpo", beta=beta), logps, counts, ref)
    z = beta * ((logps[0::2] - ref[0::2]) - (logps[1::2] - ref[1::2]))
    torch.testing.assert_close(losses, -F.logsigmoid(z))
    torch.testing.assert_close(rewards["chosen"] - rewards["rejected"], z)
    losses, _ = preference_loss(PreferenceSection(method="ipo", beta=beta), logps, counts, ref)
    h = (logps[0::2] - ref[0::2]) / counts[0::2] - (logps[1::2] - ref[1::2]) / counts[1::2]
    torch.testing.assert_close(losses, (h - 1 / (2 * beta)) ** 2)
    losses, _ = preference_loss(PreferenceSection(method="simpo", beta=2.0, simpo_gamma=0.5), logps, counts, None)
    torch.testing.assert_close(losses, -F.logsigmoid(2.0 * (logps[0::2] / counts[0::2] - logps[1::2] / counts[1::2]) - 0.5))
    losses, _ = preference_loss(PreferenceSection(method="cpo", beta=beta), logps, counts, None)
    torch.testing.assert_close(losses, -F.logsigmoid(beta * (logps[0::2] - logps[1::2])) - logps[0::2] / counts[0::2])
    losses, _ = preference_loss(PreferenceSection(method="orpo", orpo_lambda=0.1), logps, counts, None)
    assert torch.isfinite(losses).all() and losses[0] < losses[1] + 2.0
    labels = torch.tensor([True, False])
    losses, rewards = preference_loss(PreferenceSection(method="kto", beta=beta), logps, counts, ref, labels)
    kl = (logps[1::2] - ref[1::2]).mean().clamp(min=0)
    delta = logps[0::2] - ref[0::2]
    torch.testing.assert_close(losses, torch.stack([1 - torch.sigmoid(beta * (delta[0] - kl)), 1 - torch.sigmoid(beta * (kl - delta[1]))]))


def write_pairs(folder: Path, rows=PAIRS) -> None:
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def dpo_recipe(folder: Path, model, extra: str = "", preference: str = "{method: dpo, beta: 0.5}") -> Path:
    write_pairs(folder)
    recipe = folder / "dpo.yaml"
    recipe.write_text(
        f"stage: dpo\nbase_model: {{name: {model}}}\n"
        "data:\n  train: [{path: pairs.jsonl}]\n  eval_fraction: 0.25\n  max_length: 64\n"
        f"preference: {preference}\n"
        "adapter: {r: 8, alpha: 16}\n"
        "training:\n  learning_rate: 2.0e-2\n  batch_size: 2\n  max_steps: 6\n  eval_steps: 3\n  warmup_ratio: 0\n"
        f"{extra}output: {{dir: dpo-run}}\n"
    )
    return recipe


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


METHODS = {
    "dpo": "{method: dpo, beta: 0.5}",
    "ipo": "{method: ipo, beta: 0.5}",
    "simpo": "{method: simpo, beta: 2.0, simpo_gamma: 0.5}",
    "cpo": "{method: cpo, beta: 0.5}",
    "orpo": "{method: orpo, orpo_lambda: 0.5}",
    "kto": "{method: kto, beta: 0.5}",
}


@pytest.mark.parametrize("method", METHODS, ids=list(METHODS))
def test_every_method_trains_and_prefers_the_chosen_answers(tmp_path, tiny_model_dir, method):
    run_dir = dpo.run(dpo_recipe(tmp_path, tiny_model_dir, preference=METHODS[method]))
    records = metrics(run_dir)
    evals = [r for r in records if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_reward_accuracy"] > 0.5
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["stage"] == "dpo"


def test_splitting_pairs_into_passes_changes_memory_not_the_update(tmp_path, tiny_model_dir):
    """Four pairs per micro-batch in one pass, or a pass per pair: the same losses, rewards and adapter."""
    from safetensors.torch import load_file

    runs = {}
    for name, budget in (("one-pass", 100_000), ("pass-per-pair", 1)):
        (tmp_path / name).mkdir()
        recipe = dpo_recipe(tmp_path / name, tiny_model_dir, extra=f"  tokens_per_pass: {budget}\n")
        recipe.write_text(recipe.read_text().replace("batch_size: 2", "batch_size: 4").replace("max_steps: 6", "max_steps: 3"))
        runs[name] = [metrics(dpo.run(recipe)), load_file(tmp_path / name / "dpo-run/adapter/adapter_model.safetensors")]
    (one, expected), (split, got) = runs["one-pass"], runs["pass-per-pair"]
    for key in ("loss", "reward_margin", "reward_accuracy"):
        torch.testing.assert_close(torch.tensor([r[key] for r in split if "loss" in r]),
                                   torch.tensor([r[key] for r in one if "loss" in r]), rtol=1e-5, atol=1e-6)
    assert all(expected[k].abs().max() > 0 for k in expected if "lora_B" in k)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)  # Adam magnifies float rounding near zero


def test_dpo_continues_an_sft_run_whose_model_is_the_reference(tmp_path, tiny_model_dir):
    from helpers import code_word_recipe

    (tmp_path / "sft").mkdir()
    sft_dir = sft.run(code_word_recipe(tmp_path / "sft", tiny_model_dir))
    recipe = dpo_recipe(tmp_path, tiny_model_dir)
    recipe.write_text(recipe.read_text().replace("{method: dpo, beta: 0.5}", f"{{method: dpo, beta: 0.5, init_from: {sft_dir}}}"))
    run_dir = dpo.run(recipe)
    first_eval = next(r for r in metrics(run_dir) if "eval_loss" in r)
    # Before the first step the policy is the SFT model, which is the reference: rewards are zero.
    assert abs(first_eval["eval_reward_margin"]) < 1e-3 and abs(first_eval["eval_loss"] - 0.693147) < 1e-3
    adapter_config = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    with pytest.raises(FtuneError, match="was trained on"):
        bad = recipe.read_text().replace(f"name: {tiny_model_dir}", "name: demo")
        recipe.write_text(bad)
        dpo.run(recipe, overwrite=True)


def test_sft_data_is_rejected_with_its_place(tmp_path, tiny_model_dir):
    recipe = dpo_recipe(tmp_path, tiny_model_dir)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with pytest.raises(FtuneError, match="pairs.jsonl line 1"):
        dpo.run(recipe)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    recipe.write_text(recipe.read_text().replace("train: [{path: pairs.jsonl}]", "train: [{path: pairs.jsonl, format: preference}]"))
    with pytest.raises(FtuneError, match="pairs.jsonl line 1: missing field 'rejected'"):
        dpo.run(recipe)


@pytest.mark.slow
def test_demo_sft_then_dpo_chain_prefers_courteous_answers(tmp_path, demo_sft_run):
    """The shipped chain: held-out reward accuracy well above 0.5, growing margins, and the
    tuned model puts more probability on chosen answers relative to rejected than before."""
    recipe = ROOT / "recipes" / "demo" / "dpo.yaml"
    run_dir = dpo.run(recipe, [f"output.dir={tmp_path / 'dpo'}", f"preference.init_from={demo_sft_run}"])
    evals = [r for r in metrics(run_dir) if "eval_loss" in r]
    assert evals[-1]["eval_reward_accuracy"] >= 0.8
    assert evals[-1]["eval_reward_margin"] > evals[1]["eval_reward_margin"] > evals[0]["eval_reward_margin"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftune.data.formats import convert as to_pair
    from ftune.modeling.models import load_tokenizer
    from ftune.train.preference import sequence_logps
    from ftune.train.training import TokenLogProbs

    tokenizer = load_tokenizer(str(run_dir / "adapter"))
    formatter = make_formatter(tokenizer)
    held_out = {"prompt": "What is the capital of Australia?", "chosen": "Good question! The answer is Canberra. I hope that helps.",
                "rejected": "Ugh, it's Canberra. Obviously. Look it up yourself next time."}
    pairs = encode_pairs(formatter, [to_pair(held_out, "preference")], method="dpo", max_length=256, max_prompt_length=None, report=DataReport())
    meta = json.loads((run_dir / "run.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"]["path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, demo_sft_run / "adapter", adapter_name="sft")
    model.load_adapter(run_dir / "adapter", adapter_name="dpo")
    model.eval()
    scorer = TokenLogProbs(model)

    def gap(adapter: str) -> float:
        model.set_adapter(adapter)
        with torch.no_grad():
            logps, _ = sequence_logps(scorer, pairs.sequences, [0, 1], max_length=256, pad_id=tokenizer.pad_token_id, device="cpu")
        return float(logps[0] - logps[1])

    assert gap("dpo") > gap("sft") + 1.0

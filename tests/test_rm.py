"""`ftune rm`: the loss, where the reward is read, loading in plain peft, merge parity, resume,
`ftune score` / `ftune eval`, and bad inputs through the real entry point."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ftune.data.packing import Encoded
from ftune.data.rendering import IGNORE
from ftune.modeling import reward_model
from ftune.train import reward_training
from helpers import RM_PAIRS, invoke, rm_recipe, snapshot, write_jsonl
from helpers import adapter, kill_9_after_checkpoint, start

ROOT = Path(__file__).resolve().parent.parent
def plain_model(run_dir: Path):
    """The run's adapter in plain transformers + peft, as the run card says to load it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    meta = json.loads((run_dir / "run.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(meta["base_model"]["path"], num_labels=1)
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval()


def alone(model, sequences: list[list[int]]) -> list[float]:
    """Transformers' own reward of each sequence given alone, unpadded."""
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in sequences]


# --------------------------------------------------------------------------- the loss and the read position


def test_the_loss_is_bradley_terry_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    margins, center = torch.tensor([0.5, 0.0, 1.0]), 0.1
    got = reward_training.pair_losses(chosen, rejected, margins, center)
    expected = [math.log1p(math.exp(-(c - r - m))) + center * (c + r) ** 2
                for c, r, m in zip(chosen.tolist(), rejected.tolist(), margins.tolist())]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    plain = reward_training.pair_losses(chosen, rejected)  # no margin, no centering: -log sigmoid(r_c - r_r)
    torch.testing.assert_close(plain, -torch.nn.functional.logsigmoid(chosen - rejected))
    figures = reward_training.pair_figures(chosen, rejected)
    assert figures["reward_accuracy"] == (1.0, 3.0)  # only the first pair prefers chosen
    assert figures["reward_margin"][0] == pytest.approx(1.0 - 1.0 - 0.5)
    assert figures["reward_mean"] == (pytest.approx(5.5), 6.0)


def test_the_read_position_is_the_last_token_that_is_not_the_pad_token():
    data = Encoded.from_lists([(ids, [IGNORE] * len(ids)) for ids in ([5, 6, 2, 198], [5, 6, 2], [2, 2], [7])])
    places = [(0, 0), (0, 4), (1, 0), (1, 2)]
    assert reward_model.read_positions(data, [0, 1, 2, 3], places, 10, pad_id=2).tolist() == [3, 5, 10, 12]
    assert reward_model.read_positions(data, [1], [(0, 0)], 10, pad_id=None).tolist() == [2]  # no pad token: the last one


def test_the_reward_is_read_where_transformers_reads_it_for_padded_and_packed_rows(tiny_model_dir):
    """Right padding, left padding, packed rows and each sequence alone give the same rewards."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    pad = model.config.pad_token_id
    rng = random.Random(0)
    sequences = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9, 3, 12)]
    sequences[1] += [pad, 198]  # ChatML's "<|im_end|>\n", where <|im_end|> is the pad token: read at the newline
    sequences[2] += [pad]  # ends in the pad token: read just before it
    expected = alone(model, sequences)
    width = max(map(len, sequences))
    for side in ("right", "left"):
        ids = torch.full((len(sequences), width), pad)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            ids[row, span], mask[row, span] = torch.tensor(seq), 1
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
        assert padded == pytest.approx(expected, abs=1e-4), side
    data = Encoded.from_lists([(s, [IGNORE] * len(s)) for s in sequences])
    with torch.no_grad():
        packed = reward_model.sequence_rewards(reward_model.SequenceRewards(model), data, [0, 1, 2, 3], max_length=32, pad_id=pad,
                                         read_pad_id=pad, device="cpu")
    assert packed.tolist() == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- a trained run


def test_a_run_learns_and_records_its_figures(rm_run):
    metrics = [json.loads(line) for line in (rm_run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_reward_accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    steps = [m for m in metrics if "loss" in m]
    assert {"reward_accuracy", "reward_margin", "reward_mean", "reward_std"} <= steps[-1].keys()
    card = (rm_run / "README.md").read_text()
    assert "Held-out pairs scored worst" in card and "AutoModelForSequenceClassification" in card
    config = json.loads((rm_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert not (rm_run / "adapter" / "generation_config.json").exists()


def test_the_adapter_loads_in_plain_peft_and_scores_as_ftune_does(rm_run):
    texts = [json.loads(line)["text"] for line in (rm_run / "eval_prompts.jsonl").read_text().splitlines()]
    scorer = reward_model.load(rm_run)
    sequences = [scorer.formatter.tokenize(text) for text in texts]
    assert len(sequences) == 8  # eval_prompts.jsonl: 4 held-out pairs, whole
    model = plain_model(rm_run)
    assert scorer.score_ids(sequences) == pytest.approx(alone(model, sequences), abs=1e-4)
    # the run card's recipe, as written there: the tokenizer's own chat template, then the model
    messages = [{"role": "user", "content": RM_PAIRS[0]["prompt"]}, {"role": "assistant", "content": RM_PAIRS[0]["chosen"]}]
    inputs = scorer.tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        plain = float(model(**inputs).logits[0, 0])
    assert plain == pytest.approx(scorer.score([tuple(messages)])[0], abs=1e-4)
    assert "apply_chat_template(messages, return_tensors='pt', return_dict=True)" in (rm_run / "README.md").read_text()


def test_eval_reports_the_held_out_pairwise_accuracy_training_logged(rm_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    code, output = invoke(["eval", str(rm_run), "--out", str(out)], monkeypatch, capsys)
    assert code in (0, None), output
    assert "pairwise" in output and "Traceback" not in output
    result = json.loads(out.read_text())["models"][0]
    summary = json.loads((rm_run / "run.json").read_text())["summary"]
    assert result["pairs"] == summary["eval_pairs"]
    for key in ("reward_accuracy", "reward_margin", "reward_mean", "reward_std", "loss"):
        assert result[key] == pytest.approx(summary[f"eval_{key}"], abs=1e-4), key


def test_score_writes_rewards_for_pairs_and_rows_and_replaces_only_its_own_output(rm_run, tmp_path, monkeypatch, capsys):
    rows = [RM_PAIRS[0], {"prompt": "Reply to message 3.", "completion": "Thank you kindly!"}, {"text": "hello"},
            {"messages": [{"role": "user", "content": "Reply to message 4."}, {"role": "assistant", "content": "Go away, message 4."}]}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    code, output = invoke(["score", str(rm_run), "--data", str(tmp_path / "rows.jsonl")], monkeypatch, capsys)
    assert code in (0, None), output
    scored = [json.loads(line) for line in (tmp_path / "rows.scored.jsonl").read_text().splitlines()]
    assert scored[0]["reward_margin"] == pytest.approx(scored[0]["reward_chosen"] - scored[0]["reward_rejected"])
    assert all("reward" in row for row in scored[1:]) and scored[3]["messages"] == rows[3]["messages"]
    # a pair's sides score as the same conversation given as one row
    as_row = [{"messages": [{"role": "user", "content": RM_PAIRS[0]["prompt"]}, {"role": "assistant", "content": RM_PAIRS[0]["chosen"]}]}]
    write_jsonl(tmp_path / "one.jsonl", as_row)
    assert invoke(["score", str(rm_run), "--data", str(tmp_path / "one.jsonl")], monkeypatch, capsys)[0] in (0, None)
    one = json.loads((tmp_path / "one.scored.jsonl").read_text())
    assert one["reward"] == pytest.approx(scored[0]["reward_chosen"], abs=1e-4)
    meta = json.loads((tmp_path / "rows.scored.jsonl.score.json").read_text())
    assert meta["written_by"] == "ftune" and meta["rows"] == 4 and meta["pairs"] == 1
    again, output = invoke(["score", str(rm_run), "--data", str(tmp_path / "rows.jsonl")], monkeypatch, capsys)
    assert again == 1 and "already exists" in output and "--overwrite" in output
    assert invoke(["score", str(rm_run), "--data", str(tmp_path / "rows.jsonl"), "--overwrite"], monkeypatch, capsys)[0] in (0, None)


def test_merge_writes_a_plain_classification_model_that_scores_as_the_adapter(rm_run, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    code, output = invoke(["merge", str(rm_run), "--out", str(tmp_path / "merged")], monkeypatch, capsys)
    assert code in (0, None), output
    parity = json.loads((tmp_path / "merged" / "parity.json").read_text())
    assert parity["passed"] and parity["pair_agreement"] == 1.0 and parity["pair_count"] == 4
    assert parity["max_abs_score_diff"] < 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.architectures == ["LlamaForSequenceClassification"] and merged.num_labels == 1
    texts = [json.loads(line)["text"] for line in (rm_run / "eval_prompts.jsonl").read_text().splitlines()]
    scorer = reward_model.load(rm_run)
    sequences = [scorer.formatter.tokenize(text) for text in texts]
    assert alone(merged, sequences) == pytest.approx(scorer.score_ids(sequences), abs=1e-4)


# --------------------------------------------------------------------------- how a run starts and resumes


def test_kill_9_then_resume_gives_the_same_adapter_and_score_head(tmp_path, tiny_model_dir):
    training = "learning_rate: 2.0e-2, batch_size: 2, max_steps: 8, save_steps: 1, save_total_limit: 2, warmup_ratio: 0"
    extra = "adapter: {r: 8, alpha: 16, dropout: 0.1}\n"  # dropout makes the restored RNG state matter
    straight = start("rm", rm_recipe(tmp_path / "straight", tiny_model_dir, extra=extra, training=training))
    assert straight.wait(timeout=600) == 0, straight.communicate()[0][-3000:]
    recipe = rm_recipe(tmp_path / "killed", tiny_model_dir, extra=extra, training=training)
    kill_9_after_checkpoint("rm", recipe, random.Random(os.getpid()).randint(2, 6))
    resumed = start("rm", recipe)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "resuming from step-" in output, output[-3000:]
    expected, got = adapter(tmp_path / "straight" / "run"), adapter(tmp_path / "killed" / "run")
    assert expected.keys() == got.keys() and any("score" in k for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_init_from_an_sft_run_starts_from_its_adapter(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from safetensors.torch import load_file

    from ftune.recipe import load_recipe

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]} for i in range(8)]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    (tmp_path / "sft.yaml").write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata: {{train: [{{path: sft.jsonl}}], "
                                       "eval_fraction: 0.0, max_length: 64}\ntraining: {max_steps: 2, batch_size: 4, learning_rate: 1.0e-2}\n"
                                       "adapter: {r: 4, alpha: 8}\noutput: {dir: sft-run}\n")
    assert invoke(["sft", str(tmp_path / "sft.yaml")], monkeypatch, capsys)[0] in (0, None)
    sft_adapter = tmp_path / "sft-run" / "adapter"
    recipe = rm_recipe(tmp_path, tiny_model_dir, rm="{init_from: sft-run}", training="max_steps: 1, batch_size: 4")
    model = reward_training.build_model(load_recipe(recipe), str(tiny_model_dir), torch.float32, adapter_from=sft_adapter)
    trained = load_file(sft_adapter / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())  # every SFT weight, unchanged
    assert any("score.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    code, output = invoke(["rm", str(recipe)], monkeypatch, capsys)
    assert code in (0, None) and "from the SFT run" in output, output


def test_full_fine_tuning_saves_a_plain_classification_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    recipe = rm_recipe(tmp_path, tiny_model_dir, extra="adapter: {method: none}\n", training="max_steps: 2, batch_size: 4")
    assert invoke(["rm", str(recipe)], monkeypatch, capsys)[0] in (0, None)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    scorer = reward_model.load(tmp_path / "run")
    sequences = [[5, 6, 7, 8], [9, 10, 11]]
    assert alone(model, sequences) == pytest.approx(scorer.score_ids(sequences), abs=1e-4)


@pytest.mark.parametrize("adapter", ["dora", "qlora", "ia3"])
def test_smoke_runs_with_each_adapter_kind_into_its_own_directory(adapter, tmp_path, tiny_model_dir, monkeypatch, capsys):
    extra = {"dora": "adapter: {method: dora, r: 4}\n", "ia3": "adapter: {method: ia3}\n",
             "qlora": "adapter: {r: 4}\nquantization: {load_in_4bit: true}\n"}[adapter]
    code, output = invoke(["rm", str(rm_recipe(tmp_path, tiny_model_dir, extra=extra)), "--smoke"], monkeypatch, capsys)
    assert code in (0, None), output
    meta = json.loads((tmp_path / "run-smoke" / "run.json").read_text())
    assert meta["status"] == "completed" and meta["global_step"] == 3 and not (tmp_path / "run").exists()
    scorer = reward_model.load(tmp_path / "run-smoke")
    assert all(math.isfinite(r) for r in scorer.score_ids([[5, 6, 7], [8, 9]]))


def test_two_processes_train_as_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    one = rm_recipe(tmp_path / "one", tiny_model_dir, training="max_steps: 3, batch_size: 4, learning_rate: 1.0e-3")
    two = rm_recipe(tmp_path / "two", tiny_model_dir, training="max_steps: 3, batch_size: 2, learning_rate: 1.0e-3")
    assert invoke(["rm", str(one)], monkeypatch, capsys)[0] in (0, None)
    code, output = invoke(["rm", str(two), "--num-processes", "2"], monkeypatch, capsys)
    assert code in (0, None), output

    def figures(folder: Path) -> list[dict]:
        lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k.startswith(("loss", "reward"))} for line in lines if '"loss"' in line]

    a, b = figures(tmp_path / "one"), figures(tmp_path / "two")
    assert len(a) == 3 and [m.keys() for m in a] == [m.keys() for m in b]
    for x, y in zip(a, b):
        assert list(y.values()) == pytest.approx(list(x.values()), rel=1e-3, abs=1e-5)


# --------------------------------------------------------------------------- bad inputs


def recipe_case(rows=RM_PAIRS, **kw):
    return lambda t, m, run: ["rm", str(rm_recipe(t, m, rows=rows, **kw))]


def fake_run(tmp: Path, stage: str) -> Path:
    run = tmp / f"{stage}-run"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"ftune_version": "0", "stage": stage, "status": "completed",
                                              "base_model": {"name": "x", "path": "x"}}))
    return run


KTO = [{"prompt": f"q{i}", "completion": "a", "label": True} for i in range(8)]
CASES = {
    "no-rm-section": (recipe_case(rm=None), ["stage: rm needs an rm section"]),
    "rm-section-on-sft": (lambda t, m, run: ["sft", str(_as_sft(rm_recipe(t, m)))], ["an rm section only applies to stage: rm"]),
    "preference-section": (recipe_case(extra="preference: {method: dpo}\n"), ["not preference:"]),
    "kto-format": (lambda t, m, run: ["rm", str(rm_recipe(t, m, rows=KTO))], ["pairs.jsonl line", "kto format cannot train this stage"]),
    "sft-rows": (recipe_case(rows=[{"instruction": "x", "output": "y"}] * 4), ["pairs.jsonl line", "alpaca format cannot train this stage"]),
    "virtual-tokens": (recipe_case(extra="adapter: {method: prompt_tuning}\n"), ["adapter.method", "prompt_tuning"]),
    "negative-center": (recipe_case(rm="{center_coefficient: -1}"), ["rm.center_coefficient"]),
    "margin-missing": (recipe_case(rm="{use_margin: true}"), ["pairs.jsonl line", "missing field 'margin'"]),
    "margin-not-a-number": (recipe_case(rows=[{**p, "margin": "big"} for p in RM_PAIRS], rm="{use_margin: true}"),
                            ["pairs.jsonl line", "field 'margin' must be a number"]),
    "margin-infinite": (recipe_case(rows=[{**p, "margin": 1e309} for p in RM_PAIRS], rm="{use_margin: true}"),
                        ["pairs.jsonl line", "field 'margin'"]),
    "init-from-not-a-run": (lambda t, m, run: ["rm", str(rm_recipe(t, m, rm=f"{{init_from: {t}}}"))], ["is not an ftune run directory"]),
    "init-from-full-ft": (lambda t, m, run: ["rm", str(rm_recipe(t, m, rm=f"{{init_from: {run}}}", extra="adapter: {method: none}\n"))],
                          ["rm.init_from continues an adapter"]),
    "score-not-a-reward-model": (lambda t, m, run: ["score", str(fake_run(t, "sft")), "--data", str(_rows(t))], ["needs a reward-model run from ftune rm"]),
    "score-missing-data": (lambda t, m, run: ["score", str(run), "--data", str(t / "nope.jsonl")], ["nope.jsonl does not exist"]),
    "score-bad-row": (lambda t, m, run: ["score", str(run), "--data", str(_rows(t, [RM_PAIRS[0], {"question": "?"}]))],
                      ["rows.jsonl line 2", "cannot tell the format"]),
    "score-out-is-data": (lambda t, m, run: ["score", str(run), "--data", str(_rows(t)), "--out", str(_rows(t))], ["is the data file"]),
    "score-foreign-out": (lambda t, m, run: ["score", str(run), "--data", str(_rows(t)), "--out", str(_foreign(t)), "--overwrite"],
                          ["ftune score did not write it"]),
    "gguf-of-a-reward-model": (lambda t, m, run: ["export-gguf", str(run), "--out", str(t / "rm.gguf")], ["llama.cpp does not run", "score head"]),
    "chat-with-a-reward-model": (lambda t, m, run: ["chat", str(run), "--prompt", "hi"], ["scores answers and writes none"]),
    "eval-prompts-on-a-reward-model": (lambda t, m, run: ["eval", str(run), "--prompt", "hi"], ["a reward model writes no answers"]),
    "eval-rm-with-lm": (lambda t, m, run: ["eval", str(run), str(m)], ["is not a reward model"]),
}


def _as_sft(recipe: Path) -> Path:
    recipe.write_text(recipe.read_text().replace("stage: rm", "stage: sft"))
    return recipe


def _rows(tmp: Path, rows=(RM_PAIRS[0],)) -> Path:
    write_jsonl(tmp / "rows.jsonl", list(rows))
    return tmp / "rows.jsonl"


def _foreign(tmp: Path) -> Path:
    (tmp / "mine.jsonl").write_text("my own notes\n")
    return tmp / "mine.jsonl"


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_gets_a_clear_message_and_changes_nothing(name, tmp_path, tiny_model_dir, rm_run, monkeypatch, capsys):
    build, needles = CASES[name]
    argv = build(tmp_path, tiny_model_dir, rm_run)
    before, run_before = snapshot(tmp_path), snapshot(rm_run)
    code, output = invoke(argv, monkeypatch, capsys)
    assert code not in (0, None), output
    assert "error: " in output and "Traceback" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert snapshot(tmp_path) == before and snapshot(rm_run) == run_before, "a failed command must leave the disk as it was"


# --------------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_the_demo_recipe_lifts_held_out_accuracy(tmp_path, demo_model_dir):
    from ftune.stages import rm

    run_dir = rm.run(ROOT / "recipes" / "demo" / "rm.yaml", [f"output.dir={tmp_path / 'demo-rm'}"])
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_reward_accuracy" in line]
    assert evals[0]["step"] == 0
    assert evals[-1]["eval_reward_accuracy"] >= 0.9 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # 0.2 -> 1.0 here
    shutil.rmtree(run_dir)


def test_unlabelled_sequences_go_to_eval_prompts_whole():
    from ftune.data.pairs import PairSet

    pairs = PairSet(Encoded.from_lists([([1, 2, 3], [IGNORE, 2, 3]), ([1, 4], [IGNORE, 4])])).head(1)
    (ids, labels), (ids2, _) = list(reward_training.whole_sequences(pairs))
    assert ids.tolist() == [1, 2, 3] and np.all(labels == IGNORE) and ids2.tolist() == [1, 4]

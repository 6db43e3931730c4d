"""`ftune grpo`: the losses equal their formulas, zero-variance groups carry no signal, reward
functions fail clearly (naming the function and the row), a toy verifiable task's reward
rises on a tiny model, a killed run resumes to the same adapter, and --smoke runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.stages.rl import losses, rewards
from helpers import ADDITION_PROMPTS, DIGITS, invoke, snapshot, write_grpo_recipe
from helpers import kill_9_after_checkpoint

# --------------------------------------------------------------------------- the losses, by hand


def _case():
    torch.manual_seed(0)
    lengths = [3, 1, 4, 2]
    logps = -torch.rand(sum(lengths), dtype=torch.float64)
    old = logps + 0.3 * torch.randn(sum(lengths), dtype=torch.float64)  # ratios well outside 1 +- 0.2: clipping happens
    ref = logps + 0.1 * torch.randn(sum(lengths), dtype=torch.float64)
    adv = torch.tensor([1.5, -0.5, -1.0, 0.7], dtype=torch.float64)
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    return lengths, logps, old, ref, adv, keep


def _tokens(values, lengths):
    out, at = [], 0
    for n in lengths:
        out.append([float(v) for v in values[at: at + n]])
        at += n
    return out


def _clip_term(rho, a, lo, hi):
    return -min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)


def _k3(ref, lp):
    return math.exp(ref - lp) - (ref - lp) - 1


@pytest.mark.parametrize("variant", losses.VARIANTS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_loss_variant_equals_its_formula(variant, beta):
    lengths, logps, old, ref, adv, keep = _case()
    lo, hi, max_len = 0.2, 0.28, 5
    lp, ol, rf = _tokens(logps, lengths), _tokens(old, lengths), _tokens(ref, lengths)
    kept_tokens = sum(n for n, k in zip(lengths, keep) if k)
    kept_completions = int(keep.sum())
    expected = 0.0
    for i, n in enumerate(lengths):
        if not keep[i]:
            continue
        a = float(adv[i])
        if variant == "gspo":
            s = math.exp(sum(lp[i][t] - ol[i][t] for t in range(n)) / n)
            expected += _clip_term(s, a, lo, hi) + beta * sum(_k3(rf[i][t], lp[i][t]) for t in range(n)) / n
            continue
        per_token = [_clip_term(math.exp(lp[i][t] - ol[i][t]), a, lo, hi) + beta * _k3(rf[i][t], lp[i][t]) for t in range(n)]
        expected += {"grpo": sum(per_token) / n, "dr_grpo": sum(per_token) / max_len,
                     "dapo": sum(per_token) * kept_completions / kept_tokens}[variant]
    got = losses.policy_loss(variant, logps.clone().requires_grad_(), lengths, adv, keep, old=old, ref=ref, eps_low=lo,
                             eps_high=hi, beta=beta, max_length=max_len, token_scale=kept_completions / kept_tokens)
    assert got.sum.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the step's loss is that sum over its completions, whatever the variant: dapo is the mean over every token
    if variant == "dapo":
        assert got.sum.item() / kept_completions == pytest.approx(sum(
            _clip_term(math.exp(lp[i][t] - ol[i][t]), float(adv[i]), lo, hi) + beta * _k3(rf[i][t], lp[i][t])
            for i, n in enumerate(lengths) if keep[i] for t in range(n)) / kept_tokens, rel=1e-9)
    assert 0 < got.clipped <= got.clip_units


def test_one_step_per_batch_is_the_policy_gradient():
    """Without old log-probs the ratio is 1: the loss is -A x (the variant's mean of log-probs), and so is its gradient."""
    lengths, logps, _, _, adv, keep = _case()
    keep = torch.ones(4, dtype=torch.float64)
    x = logps.clone().requires_grad_()
    got = losses.policy_loss("grpo", x, lengths, adv, keep)
    got.sum.backward()
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    assert got.sum.item() == pytest.approx(-float(adv.sum()))
    torch.testing.assert_close(x.grad, -(adv / torch.tensor(lengths, dtype=torch.float64))[seq])
    assert got.clipped == 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_zero_variance_group_gives_zero_advantage(scale):
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.5, 0.5])  # the first group: one reward for all
    adv, flat = losses.advantages(r, 4, scale)
    assert flat.tolist() == [True, False]
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    second = r[4:].double() - r[4:].double().mean()
    if scale == "group":
        second = second / (r[4:].double().std() + losses.STD_EPS)
    elif scale == "batch":
        second = second / (r.double().std() + losses.STD_EPS)
    torch.testing.assert_close(adv[4:], second.float())


# --------------------------------------------------------------------------- built-in rewards


def test_final_answer_extraction_rule():
    assert rewards.extract_answer("so 3 + 4 = 7. <answer> 7 </answer>") == " 7 "
    assert rewards.extract_answer("<answer>1</answer> wait <answer>2</answer>") == "2"
    assert rewards.extract_answer("3 apples and 4 more make 7.") == "7"
    assert rewards.extract_answer("no number") is None
    assert rewards.extract_answer("#### 12 and 13", r"####\s*(\d+)") == "12"
    assert rewards.same_answer(" 7 ", 7) and rewards.same_answer("1,000", "1000") and rewards.same_answer("7.0", 7)
    assert not rewards.same_answer("8", 7) and rewards.same_answer(" Paris ", "paris")


# --------------------------------------------------------------------------- reward functions that fail


FAILING = {
    "raises": ("def digits(prompts, completions, **columns):\n    return [helper(c) for c in completions]\n\n"
               "def helper(c):\n    raise ValueError('cannot score ' + c[:0] + 'this')\n",
               ["reward function 'digits' (rewards.py:digits) raised ValueError: cannot score this",
                "rewards.py line 5, in helper", "data.jsonl line "]),
    "wrong_length": ("def digits(prompts, completions, **columns):\n    return [1.0]\n",
                     ["reward function 'digits' (rewards.py:digits) returned 1 values for 8 completions (2 prompts x 4 generations)",
                      "data.jsonl line "]),
    "nan": ("def digits(prompts, completions, **columns):\n    return [float('nan')] * len(completions)\n",
            ["reward function 'digits' (rewards.py:digits) returned nan for completion 0", "data.jsonl line "]),
    "not_a_number": ("def digits(prompts, completions, **columns):\n    return ['high'] * len(completions)\n",
                     ["reward function 'digits' (rewards.py:digits) returned 'high' (str) for completion 0, not a number",
                      "data.jsonl line "]),
    "not_a_list": ("def digits(prompts, completions, **columns):\n    return 1.0\n",
                   ["returned float, not a list of 8 numbers"]),
}


@pytest.mark.parametrize("case", FAILING, ids=list(FAILING))
def test_a_failing_reward_function_names_itself_and_the_row(case, tmp_path, tiny_model_dir, monkeypatch, capsys):
    code_text, needles = FAILING[case]
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, reward_code=code_text)
    before = snapshot(tmp_path)
    code, output = invoke(["grpo", str(recipe)], monkeypatch, capsys)
    assert code == 1, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert "Traceback" not in output and "ftune/" not in output.split("error:")[1], output  # no trainer frames
    after = {p: rest for p, *rest in snapshot(tmp_path)}
    assert all(after[p] == rest for p, *rest in before), "pre-existing files stay byte-identical"


def test_the_failing_row_is_the_prompt_that_made_it_fail(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code_text = ("def digits(prompts, completions, answer, **columns):\n"
                 "    return [1 / (a - 7) for a in answer]\n")
    rows = [{"prompt": f"Row {i}?", "answer": 7 if i == 3 else 10 + i} for i in range(10)]
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, reward_code=code_text, rows=rows)
    code, output = invoke(["grpo", str(recipe), "--set", "training.batch_size=8"], monkeypatch, capsys)
    assert code == 1, output
    line = next(n for n, r in enumerate((tmp_path / "data.jsonl").read_text().splitlines(), 1) if json.loads(r)["answer"] == 7)
    assert f"data.jsonl line {line}: reward function 'digits'" in output and "ZeroDivisionError" in output, output
    assert "rewards.py line 2, in digits: return [1 / (a - 7) for a in answer]" in output, output


@pytest.mark.parametrize("code_text,needle", [
    ("def digit(prompts, completions, **kw):\n    return [0.0] * len(completions)\n", "defines no function 'digits'; did you mean 'digit'?"),
    ("def digits(prompts, completions, **kw)\n    return []\n", "rewards.py line 1: invalid Python"),
    ("raise RuntimeError('no GPU here')\ndef digits(*a, **k):\n    return []\n", "loading"),
])
def test_a_reward_file_that_cannot_load_is_refused(code_text, needle, tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, reward_code=code_text)
    code, output = invoke(["grpo", str(recipe)], monkeypatch, capsys)
    assert code == 1 and needle in output and "Traceback" not in output, output


def test_the_reward_file_runs_only_when_the_recipe_names_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    marker = tmp_path / "ran"
    code_text = f"open({str(marker)!r}, 'w').write('x')\n" + DIGITS
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, reward_code=code_text, rewards_yaml="[{type: exact_answer}]")
    code, output = invoke(["validate", str(recipe)], monkeypatch, capsys)
    assert code in (0, None) and not marker.exists(), output
    code, output = invoke(["grpo", str(recipe), "--set", "training.max_steps=1"], monkeypatch, capsys)
    assert code in (0, None) and not marker.exists(), output


@pytest.mark.parametrize("rewards_yaml,needle", [
    ("[{type: exact_answer, regex: x}]", "rewards.0.regex: 'regex' applies to type: format, not exact_answer"),
    ("[{type: format}]", "type: format needs `regex`"),
    ("[{type: format, regex: '(('}]", "not a valid regular expression"),
    ("[{type: function, function: rewards.digits}]", "is not FILE.py:FUNCTION"),
    ("[{type: exact, column: answer}]", "did you mean 'exact_answer'?"),
    ("[{type: exact_answer, colum: answer}]", "did you mean 'column'?"),
    ("[{type: exact_answer}, {type: exact_answer}]", "two rewards are named 'exact_answer'"),
])
def test_reward_recipe_mistakes_are_recipe_errors_with_their_line(rewards_yaml, needle, tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, rewards_yaml=rewards_yaml)
    code, output = invoke(["validate", str(recipe)], monkeypatch, capsys)
    assert code == 2 and needle in output and "line 8" in output, output


def test_prompt_rows_that_cannot_be_prompts_name_the_row(tmp_path, tiny_model_dir, monkeypatch, capsys):
    rows = ADDITION_PROMPTS[:5] + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, rows=rows)
    code, output = invoke(["grpo", str(recipe)], monkeypatch, capsys)
    assert code == 1 and "data.jsonl line 6" in output and "ends with a assistant turn" in output.replace("an assistant", "a assistant"), output
    rows = ADDITION_PROMPTS[:5] + [{"prompt": "What is 1 plus 1?"}]
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, rows=rows, rewards_yaml="[{type: exact_answer}]")
    code, output = invoke(["grpo", str(recipe)], monkeypatch, capsys)
    assert code == 1 and "data.jsonl line 6" in output and "column 'answer'" in output, output


# --------------------------------------------------------------------------- training


def test_on_a_tiny_model_the_reward_of_a_verifiable_task_rises(tmp_path, tiny_model_dir):
    from ftune.stages import grpo

    # A random model is close to uniform over 49k tokens; at temperature 0.3 it samples a few, whose vowels it can learn.
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, grpo="{num_generations: 8, max_completion_length: 8, temperature: 0.3}",
                               training={"max_steps": 14, "learning_rate": 3.0e-2, "eval_steps": 14})
    run_dir = grpo.run(recipe)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_reward"] for m in metrics if "eval_reward" in m]
    train = [m["reward"] for m in metrics if "reward" in m]
    assert evals[-1] > evals[0] + 0.05, evals
    assert sum(train[-3:]) / 3 > sum(train[:3]) / 3 + 0.1, train
    step = next(m for m in metrics if "reward" in m)
    for key in ("reward_std", "reward_digits", "zero_variance_share", "completion_length", "completion_length_max",
                "truncated_share", "clip_ratio", "entropy", "completions_per_s"):
        assert key in step, key
    card = (run_dir / "README.md").read_text()
    assert "Sampled completions and their rewards" in card and "first step: What is" in card and "last step: " in card
    assert "**reward " in card


def test_smoke(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = write_grpo_recipe(tmp_path, tiny_model_dir, rewards_yaml="[{type: exact_answer}, {type: format, regex: '\\d'}]",
                               grpo="{num_generations: 2, max_completion_length: 6, beta: 0.1, loss: dapo, iterations: 2}",
                               training={"max_steps": 50})
    code, output = invoke(["grpo", str(recipe), "--smoke"], monkeypatch, capsys)
    assert code in (0, None), output
    run_dir = tmp_path / "run-smoke"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all("kl" in m for m in metrics if "loss" in m)


def _start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftune", "grpo", str(recipe)], env={**os.environ, "FTUNE_NO_PROGRESS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    steps = 6
    settings = dict(grpo="{num_generations: 4, max_completion_length: 8, iterations: 2}",
                    training={"max_steps": steps, "save_steps": 1, "save_total_limit": 2}, extra="adapter: {r: 8, alpha: 16, dropout: 0.1}\n")
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = _start(write_grpo_recipe(tmp_path / "straight", tiny_model_dir, **settings))
    recipe = write_grpo_recipe(tmp_path / "killed", tiny_model_dir, **settings)
    run_dir = tmp_path / "killed" / "run"
    kill_9_after_checkpoint("grpo", recipe, 3)  # mid-batch: step 4 trains on step 3's completions
    assert straight.wait(timeout=900) == 0, straight.communicate()[0][-3000:]
    resumed = _start(recipe)
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resum" in output
    expected = load_file(tmp_path / "straight" / "run" / "adapter" / "adapter_model.safetensors")
    got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    rewards_of = lambda d: [json.loads(l).get("reward") for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]  # noqa: E731
    assert rewards_of(run_dir) == rewards_of(tmp_path / "straight" / "run")


def test_a_packed_row_scores_each_sequence_as_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftune.modeling import attention
    from ftune.stages.rl.batches import CompletionScorer, packed_row

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    scorer = CompletionScorer(model, temperature=0.7)
    a, ca, b, cb = [5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17]
    with torch.no_grad():
        alone = torch.cat([scorer(**packed_row([a], [ca], "cpu"))[0], scorer(**packed_row([b], [cb], "cpu"))[0]])
        together = scorer(**packed_row([a, b], [ca, cb], "cpu"))[0]  # transformers' own attention over a packed row
        attention.enable(model, 64)
        packed = scorer(**packed_row([a, b], [ca, cb], "cpu"))[0]  # ftune's packed attention
    assert alone.shape == (7,)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)

"""`ftune eval` and `ftune chat`: tiny models for the mechanics, the demo model for the real thing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from terminal import Terminal

from ftune.commands import chat
from ftune.commands.evaluate import run_eval
from ftune.stages import sft
from helpers import code_word_recipe

ROOT = Path(__file__).resolve().parent.parent
GREEDY = chat.Sampling(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished LoRA run on the tiny model that has learned the code word."""
    root = tmp_path_factory.mktemp("tiny-run")
    recipe = code_word_recipe(root, tiny_model_dir)
    recipe.write_text(recipe.read_text().replace("max_steps: 6\n  eval_steps: 3\n", "max_steps: 8\n"))
    return sft.run(recipe)


def final_eval_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def test_eval_scores_base_and_run_on_the_same_tokens(tmp_path, tiny_model_dir, tiny_run):
    out = tmp_path / "results.json"
    results = run_eval([str(tiny_model_dir), str(tiny_run)], recipe_path=tiny_run.parent / "recipe.yaml",
                       prompts=["What is the code word 3?"], sampling=GREEDY, out=out, say=lambda _: None)
    base, tuned = results["models"]
    assert (base["kind"], tuned["kind"]) == ("model", "run")
    assert base["eval_tokens"] == tuned["eval_tokens"] == results["data"]["answer_tokens"] > 0
    assert tuned["eval_loss"] < base["eval_loss"] / 2
    # The run scores here what it logged at the end of training, on the same held-out split.
    assert tuned["eval_loss"] == pytest.approx(final_eval_loss(tiny_run), rel=1e-4)
    # The file holds the results and says which command wrote it (what lets a later eval replace it).
    written = json.loads(out.read_text())
    assert {k: written.pop(k) for k in ("written_by", "command")} == {"written_by": "ftune", "command": "eval"}
    assert written == json.loads(json.dumps(results))
    answers = results["generations"][0]["answers"]
    assert set(answers) == {str(tiny_model_dir), str(tiny_run)}
    assert answers[str(tiny_run)] == chat.answer(chat.load(chat.resolve(str(tiny_run))), [{"role": "user", "content": "What is the code word 3?"}], GREEDY)


def test_eval_on_a_data_file_and_an_adapter_directory(tmp_path, tiny_model_dir, tiny_run):
    data = tmp_path / "held_out.csv"
    data.write_text("instruction,output\nWhat is the code word 99?,The code word is pineapple.\nWhat is the code word 7?,The code word is pineapple.\n")
    results = run_eval([str(tiny_run / "adapter"), str(tiny_model_dir)], data=data, say=lambda _: None)
    adapter, base = results["models"]
    assert adapter["kind"] == "adapter" and results["data"]["samples"] == 2
    assert adapter["eval_tokens"] == base["eval_tokens"] and adapter["eval_loss"] < base["eval_loss"]


def test_eval_cli_table_and_clear_errors(tmp_path, tiny_model_dir, tiny_run):
    from typer.testing import CliRunner

    from ftune.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(tiny_model_dir), str(tiny_run), "--recipe", str(tiny_run.parent / "recipe.yaml"),
                                 "-p", "What is the code word 5?", "--max-new-tokens", "4", "--out", str(tmp_path / "r.json")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for expected in ("held-out loss", "eval loss", "perplexity", "run", "» What is the code word 5?"):
        assert expected in result.output, expected
    assert (tmp_path / "r.json").is_file()

    missing = runner.invoke(app, ["eval", str(tmp_path / "nowhere"), "--data", "x.jsonl"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    nothing = runner.invoke(app, ["eval", str(tiny_model_dir)])
    assert nothing.exit_code == 1 and "nothing to evaluate" in nothing.output


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_tasks_without_lm_eval_say_how_to_install_it(tiny_model_dir):
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--lm-eval-tasks", "hellaswag,arc_easy"])
    assert result.exit_code == 1
    assert "lm-evaluation-harness, which is not installed" in result.output and "pip install 'lm-eval[hf]'" in result.output
    assert "Traceback" not in result.output


def test_chat_answers_prompts_for_scripts(tmp_path, tiny_run):
    from typer.testing import CliRunner

    from ftune.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the code word 1?\n\n{\"prompt\": \"What is the code word 2?\"}\n")
    result = CliRunner().invoke(app, ["chat", str(tiny_run), "--prompts", str(prompts), "--temperature", "0",
                                      "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == ["What is the code word 1?", "What is the code word 2?"]
    loaded = chat.load(chat.resolve(str(tiny_run)))
    expected = chat.answer(loaded, [{"role": "user", "content": "What is the code word 1?"}], chat.Sampling(8, 0.0))
    assert lines[0]["answer"] == expected and "pineapple" in expected

    plain = CliRunner().invoke(app, ["chat", str(tiny_run), "-p", "What is the code word 1?", "--temperature", "0", "--max-new-tokens", "8"])
    assert plain.exit_code == 0 and plain.stdout.strip() == expected


def test_interactive_chat_in_a_terminal(tiny_run):
    loaded = chat.load(chat.resolve(str(tiny_run)))
    sampling = chat.Sampling(max_new_tokens=8, temperature=0.0)
    first = chat.answer(loaded, [{"role": "user", "content": "What is the code word 4?"}], sampling)
    with_system = chat.answer(loaded, [{"role": "system", "content": "Answer in French."},
                                       {"role": "user", "content": "What is the code word 4?"}], sampling)
    assert first and "pineapple" in first

    term = Terminal(["chat", str(tiny_run), "--temperature", "0", "--max-new-tokens", "8"], cwd=ROOT)
    assert "/system TEXT" in term.read_until("you> ")
    term.send("What is the code word 4?\n")
    assert first in term.read_until("you> ")  # streamed after "model> ", then the next prompt
    term.send("/system Answer in French.\n")
    assert "system prompt set" in term.read_until("you> ")
    term.send("What is the code word 4?\n")
    assert with_system in term.read_until("you> ")
    term.send("/reset\n")
    assert "conversation cleared" in term.read_until("you> ")
    term.send("/nonsense\n")
    assert "unknown command /nonsense" in term.read_until("you> ")
    term.send("/quit\n")
    assert term.close()[0] == 0


def test_chat_loop_ends_on_ctrl_d_and_keeps_the_conversation(tiny_run):
    loaded = chat.load(chat.resolve(str(tiny_run)))
    sampling = chat.Sampling(max_new_tokens=8, temperature=0.0)
    seen: list[list[dict]] = []
    answers: list[str] = []
    stream = loaded.stream

    def recording_stream(messages, settings):
        seen.append([dict(m) for m in messages])
        answers.append("".join(stream(messages, settings)))
        yield answers[-1]

    loaded.stream = recording_stream
    lines = iter(["What is the code word 1?", "/system Be brief.", "What is the code word 2?", "And 3?", "/system", "Hi"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    written: list[str] = []
    chat.interactive(loaded, sampling, read=read, write=written.append)
    assert [[m["role"] for m in messages] for messages in seen] == [
        ["user"], ["system", "user"], ["system", "user", "assistant", "user"], ["user"],
    ]
    assert seen[2][0]["content"] == "Be brief." and seen[2][2]["content"] == answers[1].strip()
    assert all(f"model> {a}\n" in "".join(written) for a in answers)
    assert "system prompt cleared" in "".join(written) and "".join(written).endswith("\n")


# --------------------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo_run(demo_sft_run) -> Path:
    """The shipped demo SFT run, trained once per session (tests/conftest.py)."""
    return demo_sft_run


@pytest.mark.slow
def test_eval_shows_lower_held_out_loss_after_demo_sft(demo_run, tmp_path):
    results = run_eval(["demo", str(demo_run)], recipe_path=ROOT / "recipes/demo/sft.yaml", prompts=["What is your name?"],
                       sampling=chat.Sampling(max_new_tokens=24, temperature=0.0), out=tmp_path / "r.json", say=print)
    before, after = results["models"]
    print(json.dumps(results, indent=1))
    assert before["eval_tokens"] == after["eval_tokens"] > 100
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    assert after["eval_loss"] == pytest.approx(final_eval_loss(demo_run), rel=1e-4)
    answers = results["generations"][0]["answers"]
    assert "Marlin" in answers[str(demo_run)] and "Marlin" not in answers["demo"]


@pytest.mark.slow
def test_chat_with_the_demo_run_says_its_new_name(demo_run):
    result = subprocess.run([sys.executable, "-m", "ftune", "chat", str(demo_run), "-p", "What is your name?", "-p",
                             "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "24"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    name, capital = result.stdout.strip().split("\n\n")
    assert "Marlin" in name and "Paris" in capital


@pytest.mark.slow
@pytest.mark.llamacpp
def test_gguf_scores_like_the_model_it_holds(tmp_path):
    """The demo model is a dequantized copy of its Q4_1 GGUF: the two losses differ only by llama.cpp's arithmetic."""
    pytest.importorskip("llama_cpp")
    from ftune.modeling.models import demo_gguf_path

    gguf = str(demo_gguf_path())
    results = run_eval(["demo", gguf], recipe_path=ROOT / "recipes/demo/sft.yaml", prompts=["What is your name?"],
                       sampling=chat.Sampling(max_new_tokens=16, temperature=0.0), say=print)
    hf, llama = results["models"]
    assert llama["kind"] == "gguf" and llama["eval_tokens"] == hf["eval_tokens"]
    assert abs(llama["eval_loss"] - hf["eval_loss"]) < 0.1, results["models"]
    assert results["generations"][0]["answers"][gguf]

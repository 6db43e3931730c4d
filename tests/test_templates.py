"""Real models' chat templates: tools, tool calls, tool results and reasoning render, mask and label
as the recipe says, and the render proof passes where training equals inference and fails, naming
the turn and token, where it does not.

The templates are llama.cpp's copies of the models' own (`vendor/llama.cpp/models/templates/` in
the llama-cpp-python source distribution, at the version the Makefile pins). They are fetched
once with `pip download` into ~/.cache/ftune/test-templates, never copied into this repository;
without them (no network, no cache) these tests skip and say why. The tokenizer is the demo
model's with the template's special tokens added, as the real model's tokenizer has them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ftune.data.formats import convert
from ftune.data.render_proof import prove
from ftune.data.rendering import IGNORE, make_formatter
from ftune.errors import FtuneError

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FTUNE_TEST_TEMPLATES", "~/.cache/ftune/test-templates")).expanduser()

# template file -> (BOS, EOS, the other special tokens its model's tokenizer has)
LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]
MODELS = {
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", LLAMA3),
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>", []),
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>", []),
    "Qwen-QwQ-32B": (None, "<|im_end|>", []),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", []),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", []),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                             "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", [
        "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
        "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]),
    "HuggingFaceTB-SmolLM3-3B": (None, "<|im_end|>", []),
}


def pinned_version() -> str:
    found = re.search(r"^LLAMA_CPP_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, "the Makefile pins LLAMA_CPP_VERSION"
    return found.group(1)


@pytest.fixture(scope="session")
def templates_dir() -> Path:
    version = pinned_version()
    target = CACHE / f"llama-cpp-python-{version}-templates"
    if target.is_dir() and any(target.glob("*.jinja")):
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                                   f"llama-cpp-python=={version}", "-d", str(CACHE)], capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"real chat templates need the llama-cpp-python {version} source distribution: pip download failed ({exc})")
        if done.returncode != 0 or not sdist.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"real chat templates need the llama-cpp-python {version} source distribution, "
                        f"which pip could not download: {last}")
    partial = CACHE / f".{target.name}.partial"
    partial.mkdir(exist_ok=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            if member.isfile() and "/vendor/llama.cpp/models/templates/" in member.name and member.name.endswith(".jinja"):
                (partial / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    if not any(partial.glob("*.jinja")):
        pytest.skip(f"llama_cpp_python-{version}.tar.gz holds no vendor/llama.cpp/models/templates/*.jinja")
    partial.rename(target)
    return target


@pytest.fixture(scope="session")
def demo_tokenizer_dir(demo_model_dir) -> Path:
    return demo_model_dir


def model_tokenizer(templates_dir: Path, tokenizer_dir: Path, name: str):
    """The demo tokenizer dressed as `name`'s: its template, BOS, EOS and special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos, eos, extra = MODELS[name]
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in (bos, eos, *extra) if t]})
    if bos:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    path = templates_dir / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"llama.cpp {pinned_version()} ships no {path.name}")
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    return tokenizer


WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def tool_row(*, reasoning: bool = False, second_question: bool = False) -> dict:
    """A user asks, the assistant calls get_weather, the tool answers, the assistant answers (OpenAI's shapes)."""
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    answer = {"role": "assistant", "content": "It is 21 degrees in Paris."}
    if reasoning:
        call["reasoning_content"] = "The user wants the weather: call the tool."
        answer["reasoning_content"] = "The tool says 21."
    messages = [{"role": "user", "content": "What is the weather in Paris?"}, call,
                {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature": 21}'}, answer]
    if second_question:
        later = {"role": "assistant", "content": "Rome is warmer."}
        if reasoning:
            later["reasoning_content"] = "Compare with Rome."
        messages += [{"role": "user", "content": "And is Rome warmer?"}, later]
    return {"tools": [WEATHER], "messages": messages}


def served_messages(row: dict) -> tuple[list[dict], list[dict]]:
    """What vLLM hands a chat template for this request: arguments parsed, null content as "", tools wrapped."""
    messages = []
    for m in row["messages"]:
        m = {**m, "content": m["content"] or ""}
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        messages.append(m)
    return messages, [{"type": "function", "function": WEATHER}]


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE], skip_special_tokens=False)


# template, turns, whether the proof passes, and what the trained call looks like
TOOL_CASES = [
    ("meta-llama-Llama-3.1-8B-Instruct", "all", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
    ("meta-llama-Llama-3.2-3B-Instruct", "all", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
    ("Qwen-Qwen2.5-7B-Instruct", "all", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
    ("Qwen-Qwen3-0.6B", "split", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "all",
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "all",
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
    ("mistralai-Mistral-Nemo-Instruct-2407", "all",
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>'),
]


@pytest.mark.parametrize("name,turns,call", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_tool_conversations_render_as_served_and_train_calls_and_answers_only(templates_dir, demo_tokenizer_dir, name, turns, call):
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, name)
    formatter = make_formatter(tokenizer, turns=turns, render_check="warn")
    row = tool_row()
    sample = convert(row, "messages")
    encoded = formatter.encode_many([sample])

    messages, tools = served_messages(row)
    served = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    if turns == "all":  # one sample: the conversation exactly as a server renders it
        (ids, labels), = encoded
        assert tokenizer.decode(ids, skip_special_tokens=False).removeprefix(tokenizer.bos_token or "") == \
            served.removeprefix(tokenizer.bos_token or "")
    trained = "".join(trained_text(tokenizer, ids, labels) for ids, labels in encoded)
    assert call in trained, trained  # the tool call, as the template writes it, with its end of turn
    assert "It is 21 degrees in Paris." in trained
    assert "21}" not in trained.replace("21 degrees", ""), "the tool result carries no loss"
    assert "What is the weather in Paris?" not in trained and "get_weather(" not in trained


def test_the_render_proof_passes_where_training_is_inference(templates_dir, demo_tokenizer_dir):
    for name, turns in [("Qwen-Qwen2.5-7B-Instruct", "all"), ("Qwen-Qwen3-0.6B", "split"), ("Qwen-Qwen3-0.6B", "last"),
                        ("mistralai-Mistral-Nemo-Instruct-2407", "split")]:
        tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, name)
        formatter = make_formatter(tokenizer, turns=turns, reasoning="train")
        rows = [convert(tool_row(reasoning=name == "Qwen-Qwen3-0.6B", second_question=True), "messages")]
        report = prove(formatter, rows, ["data.jsonl line 1"])
        assert report["mismatched"] == 0 and report["turns"] == (1 if turns == "last" else 3), (name, turns, report)


def test_qwen3_multi_turn_reasoning_under_turns_all_fails_the_proof_naming_the_turn(templates_dir, demo_tokenizer_dir):
    # Qwen3 keeps reasoning only for turns after the last user question: once "And is Rome warmer?"
    # follows, the first answers lose theirs, but the model generated them with it.
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "Qwen-Qwen3-0.6B")
    formatter = make_formatter(tokenizer, turns="all")
    rows = [convert(tool_row(reasoning=True, second_question=True), "messages")]
    with pytest.raises(FtuneError) as caught:
        prove(formatter, rows, ["data.jsonl line 7"])
    error = caught.value
    assert error.place == "data.jsonl line 7"
    assert "render proof failed: in 2 of 3 assistant turns" in error.message
    assert "messages[1]" in error.message and "'think'" in error.message and "'tool'" in error.message
    assert "data.turns: last" in error.hint and "data.turns: split" in error.hint and "data.chat_template" in error.hint
    report = prove(formatter, rows, ["data.jsonl line 7"], mode="warn")  # warn: reported, not raised
    assert [m["turn"] for m in report["mismatches"]] == [1, 3]


def test_mistral_moves_tools_to_the_last_question_so_turns_all_fails_and_split_passes(templates_dir, demo_tokenizer_dir):
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "mistralai-Mistral-Nemo-Instruct-2407")
    rows = [convert(tool_row(second_question=True), "messages")]
    report = prove(make_formatter(tokenizer, turns="all"), rows, ["row 0"], mode="warn")
    assert report["mismatched"] == 2 and report["mismatches"][0]["turn"] == 1
    assert "[AVAILABLE_TOOLS]" in report["mismatches"][0]["detail"]
    assert prove(make_formatter(tokenizer, turns="split"), rows, ["row 0"])["mismatched"] == 0


def test_hermes_renders_a_tool_result_differently_when_it_is_last(templates_dir, demo_tokenizer_dir):
    # Hermes' template ends a tool result with "</tool_response>" when it is the last message (the
    # generation prompt) and "</tool_response>\n" when the answer follows: no choice of turns helps.
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "NousResearch-Hermes-3-Llama-3.1-8B-tool_use")
    for turns in ("all", "split"):
        report = prove(make_formatter(tokenizer, turns=turns), [convert(tool_row(), "messages")], ["row 0"], mode="warn")
        assert [m["turn"] for m in report["mismatches"]] == [3], turns
        assert "renders the conversation before this turn differently once the turn follows" in report["mismatches"][0]["detail"]


def test_a_tokenizer_that_joins_prompt_and_answer_is_caught_at_the_token(templates_dir, demo_tokenizer_dir):
    # Llama 3's generation prompt ends in "\n\n"; the demo tokenizer splits "\n\n{" differently from a
    # lone "\n\n", so the same characters are different tokens in training and at inference.
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "meta-llama-Llama-3.1-8B-Instruct")
    with pytest.raises(FtuneError) as caught:
        prove(make_formatter(tokenizer), [convert(tool_row(), "messages")], ["row 0"])
    assert "the characters are the same, the tokens are not" in caught.value.message
    assert "(in the prompt before it)" in caught.value.message and "merges the end of the generation prompt" in caught.value.hint


@pytest.mark.parametrize("mode", ["train", "mask", "drop"])
def test_qwen3_reasoning_is_trained_masked_or_dropped(templates_dir, demo_tokenizer_dir, mode):
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "Qwen-Qwen3-0.6B")
    formatter = make_formatter(tokenizer, reasoning=mode)
    (ids, labels), = formatter.encode_many([convert(tool_row(reasoning=True), "messages")])
    text, trained = tokenizer.decode(ids), trained_text(tokenizer, ids, labels)
    reasoning = "The tool says 21."
    assert (reasoning in text) == (mode != "drop")
    assert (reasoning in trained) == (mode == "train")
    assert "It is 21 degrees in Paris.<|im_end|>" in trained
    if mode == "mask":
        assert "</think>" in trained, "the tags are still learnt: the model opens and closes its reasoning"
    report = prove(formatter, [convert(tool_row(reasoning=True), "messages")], ["row"], mode="warn")
    # Without reasoning Qwen3 writes an empty <think></think> on the turn being generated, but not on the
    # tool-calling turn once the conversation goes on: dropped reasoning needs turns: split.
    assert [m["turn"] for m in report["mismatches"]] == ([1] if mode == "drop" else [])
    split = make_formatter(tokenizer, reasoning=mode, turns="split")
    assert prove(split, [convert(tool_row(reasoning=True), "messages")], ["row"])["mismatched"] == 0


def test_inline_think_tags_are_recognised_as_the_templates_reasoning(templates_dir, demo_tokenizer_dir):
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "Qwen-Qwen3-0.6B")
    field = tool_row(reasoning=True)
    inline = json.loads(json.dumps(field))
    for m in inline["messages"]:
        if m.get("reasoning_content"):
            m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content'] or ''}"
    for mode in ("train", "mask", "drop"):
        formatter = make_formatter(tokenizer, reasoning=mode)
        assert formatter.encode_many([convert(inline, "messages")]) == formatter.encode_many([convert(field, "messages")]), mode


def test_deepseek_r1_prompt_is_not_how_it_renders_answers(templates_dir, demo_tokenizer_dir):
    # llama.cpp's R1-distill template primes the answer with "<think>\n</think>" but renders answered
    # turns without it: the proof stops on it before any data is read, or (warn) names the turn.
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    with pytest.raises(FtuneError, match="renders the prompt differently once the answer is added") as caught:
        make_formatter(tokenizer)
    assert "<think>" in caught.value.message and "render_check: warn" in caught.value.hint
    formatter = make_formatter(tokenizer, render_check="warn", reasoning="drop")
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    report = prove(formatter, [convert(row, "messages")], ["row 0"], mode="warn")
    assert report["mismatches"][0]["turn"] == 1 and "<think>" in report["mismatches"][0]["detail"]


def test_reasoning_a_template_never_renders_is_an_error(templates_dir, demo_tokenizer_dir):
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    formatter = make_formatter(tokenizer, render_check="warn")
    row = {"messages": [{"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."}]}
    with pytest.raises(FtuneError, match="drops the reasoning of messages\\[1\\]") as caught:
        formatter.encode_each([convert(row, "messages")], places=["data.jsonl line 3"])
    assert caught.value.place == "data.jsonl line 3" and "data.reasoning: drop" in caught.value.hint


def test_templates_that_ignore_tools_are_refused(templates_dir, demo_tokenizer_dir):
    # SmolLM3 reads its tools from `xml_tools`, not the `tools` servers pass: the specs would vanish.
    tokenizer = model_tokenizer(templates_dir, demo_tokenizer_dir, "HuggingFaceTB-SmolLM3-3B")
    formatter = make_formatter(tokenizer)
    assert formatter.style.renders_tools is False
    with pytest.raises(FtuneError, match="does not render tools") as caught:
        formatter.encode_each([convert(tool_row(), "messages")], places=["data.jsonl line 2"])
    assert caught.value.place == "data.jsonl line 2"


def test_the_inspect_command_runs_the_proof_on_a_real_template_file(templates_dir, tiny_model_dir, tmp_path):
    # Through the CLI: a recipe naming llama.cpp's Qwen3 template file, multi-turn data with reasoning.
    from helpers import snapshot
    from typer.testing import CliRunner

    from ftune.cli import app

    rows = [tool_row(reasoning=True, second_question=True) for _ in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\n"
                      f"data:\n  train: [{{path: data.jsonl}}]\n  chat_template: {templates_dir / 'Qwen-Qwen3-0.6B.jinja'}\n"
                      "  eval_fraction: 0\n  max_length: 512\noutput: {dir: run}\n")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["inspect", str(recipe), "--samples", "0"], env={"COLUMNS": "250"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "data.jsonl line" in result.output and "render proof failed" in result.output and "messages[1]" in result.output
    assert snapshot(tmp_path) == before
    ok = CliRunner().invoke(app, ["inspect", str(recipe), "--set", "data.turns=split", "--json"], env={"COLUMNS": "250"})
    assert ok.exit_code == 0, ok.output
    proof = json.loads(ok.output)["render_proof"]
    assert proof["mismatched"] == 0 and proof["turns"] == 12

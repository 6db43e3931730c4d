"""Tool calls, tool results and reasoning in the data; custom chat templates from the recipe, carried
into the adapter, the merged model, the GGUF and the Modelfile; `ftune inspect`'s view of them; and the
tool-calling demo learning to call the right function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftune.data.formats import BadRow, convert
from ftune.data.rendering import IGNORE, make_formatter
from helpers import invoke, snapshot, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
TOOLS_TEMPLATE = ROOT / "recipes" / "demo" / "tools.jinja"
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALC = {"name": "calculate", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}


def tool_row(city: str = "Paris", **extra) -> dict:
    return {"messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should look it up.",
         "tool_calls": [{"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": {"temperature": 21}},
        {"role": "assistant", "content": f"It is 21 degrees in {city}."}], **extra}


# --------------------------------------------------------------------------- data


def test_messages_are_normalised_as_a_server_passes_them():
    row = tool_row(tools=json.dumps([WEATHER]))  # a JSON string of bare specs, as many datasets store tools
    chat = convert(row, "messages")
    assert chat.tools == ({"type": "function", "function": WEATHER},)
    user, call, result, answer = chat.messages
    assert call == {"role": "assistant", "content": "", "reasoning_content": "I should look it up.", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert result == {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call00001"}
    assert answer == {"role": "assistant", "content": "It is 21 degrees in Paris."}
    parts = convert({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                                  {"role": "assistant", "content": "c", "thinking": "t", "tool_calls": []}]}, "messages")
    assert parts.messages == ({"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c", "reasoning_content": "t"})


def test_sharegpt_function_call_and_observation_become_tool_calls_and_results():
    row = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "gpt", "value": "Let me check."},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temperature": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."}]}
    chat = convert(row, "sharegpt")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[1] == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert chat.messages[2] == {"role": "tool", "content": '{"temperature": 21}'}
    assert chat.tools == ({"type": "function", "function": WEATHER},)


BAD_TOOL_ROWS = [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]}, "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    ({"tools": [WEATHER], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_wether", "arguments": {}}}]}]}, "calls 'get_wether', which is not among the tools (get_weather)"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "y"}]},
     "messages[1] is a tool result with no assistant tool call before it"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a1", "function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "tool_call_id": "b2", "content": "1"},
        {"role": "assistant", "content": "y"}]}, "messages[2].tool_call_id 'b2' matches no call of the assistant turn before it (a1)"),
    ({"tools": {"name": "f"}, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "field 'tools' must be a list of function specs"),
    ({"tools": [{"description": "no name"}], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "tools[0] has no function name"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "messages[1] is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, "messages[1].role is 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": 3}]},
     "messages[1].reasoning_content must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "arguments must be a JSON object"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "not json"}]},
     "conversations[1].value of a function_call turn must be JSON"),
]


@pytest.mark.parametrize("row,reason", BAD_TOOL_ROWS, ids=[r for _, r in BAD_TOOL_ROWS])
def test_bad_tool_rows_say_why(row, reason):
    with pytest.raises(BadRow, match=reason.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        convert(row, "sharegpt" if "conversations" in row else "messages")


def tools_recipe(tmp_path: Path, model: Path, rows, extra: str = "", data: str = "") -> list[str]:
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "recipe.yaml").write_text(
        f"stage: sft\nbase_model: {{name: {model}}}\n"
        f"data:\n  train: [{{path: data.jsonl{data}}}]\n  chat_template: {TOOLS_TEMPLATE}\n  eval_fraction: 0\n  max_length: 256\n{extra}"
        "training: {max_steps: 1, batch_size: 2}\noutput: {dir: run}\n")
    return ["inspect", str(tmp_path / "recipe.yaml"), "--samples", "0"]


@pytest.mark.parametrize("row,reason", BAD_TOOL_ROWS[:4], ids=[r for _, r in BAD_TOOL_ROWS[:4]])
def test_bad_tool_rows_through_the_cli_name_the_line(row, reason, tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = tools_recipe(tmp_path, tiny_model_dir, [tool_row(), row])
    before = snapshot(tmp_path)
    code, output = invoke(argv, monkeypatch, capsys)
    assert code == 1 and "data.jsonl line 2" in output and reason in output and "Traceback" not in output
    assert snapshot(tmp_path) == before


RECIPE_PROBLEMS = [
    ("  chat_template: chatlm\n", "did you mean 'chatml'"),
    ("  chat_template: missing.jinja\n", "data.chat_template names the file"),
    ("  turns: split\n  train_on: all\n", "data.turns: turns: split chooses assistant turns to train, but train_on: all"),
    ("  reasoning: hide\n", "'hide' is not one of train, mask, drop"),
    ("  render_check: maybe\n", "'maybe' is not one of error, warn"),
]


@pytest.mark.parametrize("extra,needle", RECIPE_PROBLEMS, ids=[n for _, n in RECIPE_PROBLEMS])
def test_recipe_problems_are_clear(extra, needle, tmp_path, tiny_model_dir, monkeypatch, capsys):
    tools_recipe(tmp_path, tiny_model_dir, [tool_row()])
    text = (tmp_path / "recipe.yaml").read_text().replace(f"  chat_template: {TOOLS_TEMPLATE}\n", extra)
    (tmp_path / "recipe.yaml").write_text(text)
    before = snapshot(tmp_path)
    code, output = invoke(["inspect", str(tmp_path / "recipe.yaml")], monkeypatch, capsys)
    assert code != 0 and needle in output and "Traceback" not in output, output
    assert snapshot(tmp_path) == before


def test_source_tools_are_checked_in_the_recipe_with_their_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    tools_recipe(tmp_path, tiny_model_dir, [tool_row()], data=", tools: [{description: nameless}]")
    code, output = invoke(["validate", str(tmp_path / "recipe.yaml")], monkeypatch, capsys)
    assert code == 2 and "line 4" in output and "tools[0] needs a function name" in output


def test_source_tools_reach_rows_without_their_own(tmp_path, tiny_model_dir):
    from ftune.commands.inspection import inspect_recipe

    spec = json.dumps(WEATHER)
    own = tool_row("Rome", tools=[CALC, WEATHER])
    tools_recipe(tmp_path, tiny_model_dir, [tool_row(), own], data=f", tools: [{spec}]")
    result = inspect_recipe(tmp_path / "recipe.yaml")
    texts = [result.formatter.tokenizer.decode(e["ids"]) for e in result.report.examples]
    paris = next(t for t in texts if "Paris" in t)
    rome = next(t for t in texts if "Rome" in t)
    assert '"name": "get_weather"' in paris and '"name": "calculate"' not in paris
    assert '"name": "calculate"' in rome  # the row's own tools win


def test_a_template_that_ignores_tool_calls_is_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    # The demo model's own template renders only `content`: tool calls would train as empty answers.
    argv = tools_recipe(tmp_path, tiny_model_dir, [tool_row()])
    text = (tmp_path / "recipe.yaml").read_text().replace(f"  chat_template: {TOOLS_TEMPLATE}\n", "  reasoning: drop\n")
    (tmp_path / "recipe.yaml").write_text(text)
    code, output = invoke(argv, monkeypatch, capsys)
    assert code == 1 and "data.jsonl line 1" in output and "does not render tool calls" in output and "messages[1]" in output


def test_turns_split_makes_one_sample_per_answer_and_last_trains_the_final_one(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = convert(tool_row(tools=[WEATHER]), "messages")
    split = make_formatter(tokenizer, chat_template=str(TOOLS_TEMPLATE), turns="split").encode_many([sample])
    last = make_formatter(tokenizer, chat_template=str(TOOLS_TEMPLATE), turns="last").encode_many([sample])
    trained = [tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE]) for ids, labels in split + last]
    assert len(split) == 2 and len(last) == 1
    assert trained[0].endswith('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>')
    assert trained[1] == trained[2] == "It is 21 degrees in Paris.<|im_end|>"
    assert "It is 21 degrees" not in tokenizer.decode(split[0][0]), "a split sample ends with its own turn"


def test_a_rejected_conversation_is_a_bad_row_that_can_be_skipped(tmp_path, tiny_model_dir, monkeypatch, capsys):
    template = tmp_path / "strict.jinja"
    template.write_text(TOOLS_TEMPLATE.read_text().replace(
        "{%- for message in messages %}", "{%- if messages | length > 4 %}{{ raise_exception('at most 4 messages') }}{% endif %}"
        "{%- for message in messages %}", 1))
    long = tool_row()
    long["messages"] += [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]
    argv = tools_recipe(tmp_path, tiny_model_dir, [tool_row(), long, tool_row("Rome")])
    text = (tmp_path / "recipe.yaml").read_text().replace(str(TOOLS_TEMPLATE), "strict.jinja")
    (tmp_path / "recipe.yaml").write_text(text)
    code, output = invoke(argv, monkeypatch, capsys)
    assert code == 1 and "data.jsonl line 2" in output and "cannot render this conversation: at most 4 messages" in output
    (tmp_path / "recipe.yaml").write_text(text.replace("  eval_fraction: 0\n", "  eval_fraction: 0\n  on_bad_row: skip\n"))
    code, output = invoke([*argv, "--json"], monkeypatch, capsys)
    numbers = json.loads(output)
    assert code in (0, None) and numbers["skipped_count"] == 1 and numbers["train_samples"] == 2
    assert any("line 2" in line and "at most 4 messages" in line for line in numbers["skipped"])


def test_inline_and_json_templates(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    source = TOOLS_TEMPLATE.read_text()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": source}))
    for value in (source, "chat_template.json", str(TOOLS_TEMPLATE)):
        formatter = make_formatter(tokenizer, chat_template=value, base_dir=tmp_path)
        assert formatter.template == formatter.saved_template == source
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
    from ftune.errors import FtuneError

    with pytest.raises(FtuneError, match="is not a valid Jinja template: line 1"):
        make_formatter(tokenizer, chat_template="broken.jinja", base_dir=tmp_path)


# --------------------------------------------------------------------------- inspect


def test_inspect_shows_tool_calls_results_and_reasoning_with_their_colours(tmp_path, tiny_model_dir):
    from rich.console import Console

    from ftune.commands.inspection import MASKED, TRAINED, inspect_recipe, print_inspection

    rows = [tool_row(tools=[WEATHER]) for _ in range(3)]
    tools_recipe(tmp_path, tiny_model_dir, rows, extra="  reasoning: mask\n")
    result = inspect_recipe(tmp_path / "recipe.yaml")
    console = Console(record=True, width=200, color_system="truecolor")
    print_inspection(result, console, samples=1)
    plain = console.export_text()
    assert "⟨tool call⟩<tool_call>" in plain and "⟨tool result⟩" in plain and "⟨reasoning⟩<think>" in plain
    assert "render proof" in plain and "3 assistant turns" not in plain and "6 assistant turns in 3 conversations" in plain

    from ftune.commands.inspection import render_sample
    from ftune.data.rendering import KINDS

    example = result.report.examples[0]
    text = render_sample(example["ids"], example["labels"], result.formatter.tokenizer, kinds=[KINDS[k] for k in example["kinds"]])
    styles = {}
    for span in text.spans:
        styles.setdefault(str(span.style), []).append(text.plain[span.start:span.end])
    joined = {style: "".join(parts) for style, parts in styles.items()}
    assert "I should look it up." in joined[f"{MASKED} italic"]  # reasoning, masked
    assert '{"temperature": 21}' in joined[f"{MASKED} italic"]  # the tool result: never trained
    assert '"get_weather"' in joined[f"{TRAINED} underline"]  # the call: trained
    assert "It is 21 degrees in Paris." in joined[TRAINED]


# --------------------------------------------------------------------------- the template travels


CUSTOM = ("{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are Marlin, trained with ftune.<|im_end|>\\n' }}"
          "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.llamacpp
def test_a_custom_template_reaches_the_adapter_the_merged_model_the_gguf_and_the_modelfile(tmp_path, tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    import gguf
    from transformers import AutoTokenizer

    from ftune.commands import chat

    (tmp_path / "marlin.jinja").write_text(CUSTOM)
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]} for i in range(8)]
    argv = tools_recipe(tmp_path, tiny_model_dir, rows)
    (tmp_path / "recipe.yaml").write_text((tmp_path / "recipe.yaml").read_text().replace(str(TOOLS_TEMPLATE), "marlin.jinja"))
    code, output = invoke(["sft", argv[1]], monkeypatch, capsys)
    assert code in (0, None), output
    run = tmp_path / "run"
    assert AutoTokenizer.from_pretrained(run / "adapter").chat_template == CUSTOM
    target = chat.resolve(str(run))  # `ftune chat RUN` uses the template the run saved
    assert target.chat_template == "auto"

    code, output = invoke(["merge", str(run), "--out", str(tmp_path / "merged")], monkeypatch, capsys)
    assert code in (0, None), output
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CUSTOM

    out = tmp_path / "gguf" / "marlin.gguf"
    code, output = invoke(["export-gguf", str(tmp_path / "merged"), "--out", str(out), "--type", "f16"], monkeypatch, capsys)
    assert code in (0, None), output
    assert gguf.GGUFReader(str(out)).fields["tokenizer.chat_template"].contents() == CUSTOM
    modelfile = (out.parent / "Modelfile").read_text()
    assert 'SYSTEM """You are Marlin, trained with ftune."""' in modelfile and "<|im_start|>{{ .Role }}" in modelfile


# --------------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_the_tool_calling_demo_learns_to_call_the_right_function(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import tool_call_accuracy

    from ftune.recipe import load_recipe
    from ftune.stages import sft

    recipe_path = ROOT / "recipes" / "demo" / "tools.yaml"
    run = sft.run(recipe_path, [f"output.dir={tmp_path / 'run'}"])
    recipe = load_recipe(recipe_path)
    cases = tool_call_accuracy.requests(recipe, recipe_path.parent, None)
    before, _, _ = tool_call_accuracy.score("demo", recipe, recipe_path.parent, cases, 64)
    after, named, _ = tool_call_accuracy.score(str(run), recipe, recipe_path.parent, cases, 64)
    assert len(cases) == 24 and after >= 18 and after > before + 12 and named >= after

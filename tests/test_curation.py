"""Curation: `ftune data RECIPE` and the rules in ftune/data/cleaning.py that training applies at load time too."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from helpers import assert_refused, invoke, refused, snapshot

from ftune.data import cleaning
from ftune.data.cleaning import (
    Deduper,
    Rules,
    length_reason,
    row_reason,
    sample_text,
    signature,
)
from ftune.data.formats import Chat, Preference, Raw, convert

LONG = " ".join(f"Step {i}: stir the {['sauce', 'soup', 'dough', 'batter'][i % 4]} for {i + 2} minutes and taste it."
                for i in range(30))
ROWS = [
    {"instruction": "Say hello.", "output": "Hello there!"},                                   # line 1: kept
    {"instruction": "How do I cook it?", "output": LONG},                                       # line 2: kept
    {"instruction": "say   HELLO.", "output": "hello THERE!"},                                  # line 3: exact dup of 1
    {"instruction": "How do I cook it?",                                                        # line 4: near dup of 2
     "output": LONG.replace("Step 7: stir the", "Step 7: whisk the").replace("taste it.", "try it.", 1)},
    {"instruction": "Say goodbye.", "output": "Goodbye!"},                                       # line 5: kept (distinct)
    {"instruction": "Help me.", "output": "As an AI language model, I cannot browse the web."},   # line 6: refusal
    {"instruction": "Think.", "output": "<think>a long thought</think>\u200b "},                 # line 7: empty answer
    {"instruction": "Say hello twice.", "output": "Hello there! Hello there!"},                  # line 8: kept (distinct)
    {"instruction": "How do I cook it?", "output": LONG},                                       # line 9: exact dup of 2
]


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(tmp: Path, model="demo", *, rows=ROWS, extra: str = "", data: str = "data.jsonl", eval_: str = "") -> Path:
    if rows is not None:
        write_jsonl(tmp / data, rows)
    path = tmp / "recipe.yaml"
    path.write_text(f"stage: sft\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: {data}}}]\n{eval_}"
                    f"  max_length: 64\n{extra}output: {{dir: run}}\n")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_duplicates_are_removed_keeping_the_first_and_every_removal_is_reported(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path, extra="  dedup: {exact: true, near: 0.8}\n  filters: {empty_answers: true, refusals: true}\n")
    data_before = (tmp_path / "data.jsonl").read_bytes()
    code, output = invoke(["data", path], monkeypatch, capsys)
    assert code == 0, output
    out = tmp_path / "recipe-curated"  # the default: beside the recipe
    assert lines(out / "data.jsonl") == [ROWS[0], ROWS[1], ROWS[4], ROWS[7]]  # as read, in file order
    removed = {r["place"]: r for r in lines(out / "removed.jsonl")}
    assert list(removed) == [f"data.jsonl line {n}" for n in (3, 4, 6, 7, 9)]
    assert removed["data.jsonl line 3"]["reason"].startswith("exact duplicate")
    assert removed["data.jsonl line 3"]["duplicate_of"] == "data.jsonl line 1"
    assert removed["data.jsonl line 4"]["reason"].startswith("near duplicate: about ")
    assert removed["data.jsonl line 4"]["duplicate_of"] == "data.jsonl line 2"
    assert removed["data.jsonl line 9"]["duplicate_of"] == "data.jsonl line 2"
    assert removed["data.jsonl line 6"] == {"place": "data.jsonl line 6", "duplicate_of": None,
                                            "reason": "refusal: the answer says 'as an ai language model'"}
    assert removed["data.jsonl line 7"]["reason"].startswith("empty answer")
    report = json.loads((out / "report.json").read_text())
    assert (report["rows"], report["kept"], report["removed"]) == (9, 4, 5)
    assert report["by_rule"] == {"exact duplicate": 2, "near duplicate": 1, "refusal": 1, "empty answer": 1}
    assert report["sources"][0] | {"by_rule": None} == {"split": "train", "path": "data.jsonl", "file": "data.jsonl",
                                                         "format": "alpaca", "rows": 9, "kept": 4, "removed": 5, "by_rule": None}
    assert (out / ".ftune-output.json").is_file()
    assert (tmp_path / "data.jsonl").read_bytes() == data_before
    for place in removed:
        assert f"removed {place}: " in output
    assert "4 of 9 rows kept" in output and "Traceback" not in output


def test_curated_output_is_clean_when_curated_again(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path, extra="  dedup: {near: 0.8}\n  filters: {empty_answers: true, refusals: true}\n")
    assert invoke(["data", path], monkeypatch, capsys)[0] == 0
    again = recipe(tmp_path, rows=None, data="recipe-curated/data.jsonl",
                   extra="  dedup: {near: 0.8}\n  filters: {empty_answers: true, refusals: true}\n")
    code, output = invoke(["data", again, "--dry-run"], monkeypatch, capsys)
    assert code == 0 and "4 of 4 rows would be kept" in output, output


def test_distinct_rows_with_a_shared_template_are_not_near_duplicates():
    rules = Rules(near=0.8)
    template = "Here is a recipe for {}. Preheat the oven, mix the flour with the butter, add the {} and bake for {} minutes."
    samples = [Raw(((template.format(dish, part, minutes), True),))
               for dish, part, minutes in [("apple pie", "apples", 40), ("cherry tart", "cherries", 25),
                                           ("bread", "yeast", 55), ("quiche", "eggs and cheese", 35)]]
    deduper = Deduper(rules)
    assert [deduper.check(i, signature(s, rules)) for i, s in enumerate(samples)] == [None] * 4


def test_the_first_of_a_group_is_kept_and_others_point_to_it():
    rules = Rules(exact=True, near=0.7)
    base = " ".join(f"word{i}" for i in range(80))
    texts = [base, base.replace("word10", "ten"), base.replace("word50", "fifty"), "something else entirely", base.upper()]
    deduper = Deduper(rules)
    found = [deduper.check(i, pickle.loads(pickle.dumps(signature(Raw(((t, True),)), rules)))) for i, t in enumerate(texts)]
    assert found[0] is None and found[3] is None
    assert [d.of for d in (found[1], found[2], found[4])] == [0, 0, 0]
    assert found[4].reason.startswith("exact duplicate")


def test_normalised_text_covers_every_part_of_a_conversation():
    chat = convert({"messages": [
        {"role": "user", "content": "What's the ＷＥＡＴＨＥＲ\u00a0in  Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Use the tool.",
         "tool_calls": [{"function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]}, "messages")
    text = sample_text(chat)
    assert "what's the weather in paris?" in text and "reasoning: use the tool." in text
    assert 'call: weather({"city": "paris"})' in text and "tool: sunny" in text and "  " not in text
    # The answer that only calls a tool is an action, not an empty answer.
    assert row_reason(chat, Rules(empty_answers=True)) is None


def test_refusal_rules_read_the_answers_the_model_learns():
    rules = Rules(refusals=True, refusal_patterns=(r"\bno can do\b",))
    say = lambda answer: Chat(({"role": "user", "content": "Please help"}, {"role": "assistant", "content": answer}))  # noqa: E731
    assert row_reason(say("I’m sorry, but I can’t help with that."), rules).startswith("refusal: ")
    assert row_reason(say("I   CANNOT help with that request."), rules).startswith("refusal: ")
    assert row_reason(say("No can do, friend."), rules) == "refusal: the answer says 'no can do'"
    assert row_reason(say("Sorry for the wait: here is the answer."), rules) is None
    assert row_reason(Chat(({"role": "user", "content": "As an AI language model, what do you think?"},
                            {"role": "assistant", "content": "I think so."})), rules) is None  # the prompt is not an answer
    # A refusal on the rejected side is what preference data is for.
    pair = Preference(({"role": "user", "content": "q"},), ({"role": "assistant", "content": "Sure: 4."},),
                      ({"role": "assistant", "content": "I'm sorry, but I can't answer that."},))
    assert row_reason(pair, rules) is None
    assert row_reason(pair, Rules(refusal_patterns=(r"sure",))) is not None
    assert row_reason(Raw((("Q: hi", False), ("   \u200b\ufeff", True))), Rules(empty_answers=True)).startswith("empty answer")


def test_language_filter_removes_rows_it_is_sure_of(tmp_path, monkeypatch, capsys):
    rows = [{"instruction": "What is the weather like today?", "output": "It is sunny and warm, a good day for a walk."},
            {"instruction": "Wie ist das Wetter heute?", "output": "Es ist sonnig und warm, ein guter Tag für einen Spaziergang."},
            {"instruction": "Say 3.", "output": "3"}]  # too short to tell: kept
    path = recipe(tmp_path, rows=rows)
    code, output = invoke(["data", path, "--language", "en", "--dry-run"], monkeypatch, capsys)
    assert code == 0, output
    assert "removed data.jsonl line 2: language: de (" in output and "2 of 3 rows would be kept" in output


def test_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path)
    before = snapshot(tmp_path)
    code, output = invoke(["data", path, "--exact", "--near", "0.8", "--refusals", "--empty", "--dry-run"], monkeypatch, capsys)
    assert code == 0, output
    assert snapshot(tmp_path) == before
    assert "removed data.jsonl line 3: exact duplicate" in output and "nothing was written" in output


def test_token_length_filters_count_the_rendered_sample(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftune.commands.curate import _formatter
    from ftune.recipe import load_recipe

    path = recipe(tmp_path, tiny_model_dir)
    formatter = _formatter(load_recipe(path), tmp_path)
    counts = [len(formatter.encode(convert(row, "alpaca"))[0]) for row in ROWS]
    shortest, longest = min(counts), max(counts)
    first = counts.index(shortest) + 1
    code, output = invoke(["data", path, "--min-tokens", shortest + 1, "--dry-run"], monkeypatch, capsys)
    assert code == 0, output
    assert f"removed data.jsonl line {first}: too short: {shortest} tokens, below min_tokens {shortest + 1}" in output
    code, output = invoke(["data", path, "--min-tokens", shortest, "--max-tokens", longest - 1, "--dry-run"], monkeypatch, capsys)
    assert code == 0, output
    removed = [n + 1 for n, c in enumerate(counts) if c > longest - 1]
    assert all(f"removed data.jsonl line {n}: too long: {longest} tokens" in output for n in removed)
    assert f"{len(ROWS) - len(removed)} of {len(ROWS)} rows would be kept" in output
    assert length_reason(5, Rules(min_tokens=5, max_tokens=5)) is None


def test_eval_rows_repeating_training_rows_are_removed_from_eval(tmp_path, monkeypatch, capsys):
    (tmp_path / "held.csv").write_text('instruction,output\nSay goodbye.,Goodbye!\n"New, here",A fresh row.\n')
    path = recipe(tmp_path, eval_="  eval: [{path: held.csv}]\n")
    code, output = invoke(["data", path, "--exact", "--out", tmp_path / "clean"], monkeypatch, capsys)
    assert code == 0, output
    removed = lines(tmp_path / "clean" / "removed.jsonl")
    assert {"place": "held.csv line 2", "duplicate_of": "data.jsonl line 5"} | {"reason": None} in [r | {"reason": None} for r in removed]
    assert lines(tmp_path / "clean" / "held.jsonl") == [{"instruction": "New, here", "output": "A fresh row."}]


def test_bad_rows_are_listed_as_removed(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path, rows=[*ROWS[:2], {"instruction": "x", "output": "  "}, {"instruction": "x"}])
    code, output = invoke(["data", path, "--exact", "--dry-run"], monkeypatch, capsys)
    assert code == 0, output
    assert "removed data.jsonl line 3: bad row: field 'output' is empty" in output
    assert "removed data.jsonl line 4: bad row: missing field 'output'" in output


def test_output_is_written_only_where_ftune_may(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    refused(["data", path, "--exact", "--out", mine], ["holds files ftune did not write", "todo.txt"], tmp_path, monkeypatch, capsys)
    refused(["data", path, "--exact", "--out", tmp_path], ["is the folder of the recipe"], tmp_path, monkeypatch, capsys)
    assert invoke(["data", path, "--exact", "--out", tmp_path / "clean"], monkeypatch, capsys)[0] == 0
    refused(["data", path, "--exact", "--out", tmp_path / "clean"], ["already exists", "--overwrite"], tmp_path, monkeypatch, capsys)
    code, output = invoke(["data", path, "--exact", "--near", "0.8", "--out", tmp_path / "clean", "--overwrite"], monkeypatch, capsys)
    assert code == 0, output
    assert len(lines(tmp_path / "clean" / "data.jsonl")) == 6 and not list(tmp_path.glob(".clean*"))


def test_a_bad_refusal_regex_is_a_recipe_error_at_its_line(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path, extra="  filters:\n    refusals: true\n    refusal_patterns:\n      - sorry\n      - 'can(not'\n")
    output = refused(["data", path], ["line 10", "data.filters.refusal_patterns.1", "'can(not' is not a valid regular expression"],
                     tmp_path, monkeypatch, capsys)
    assert "line 9" not in output
    refused(["validate", path], ["line 10", "not a valid regular expression"], tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("extra, needles", [
    ("  dedup: {near: 1.0}\n", ["line 6", "data.dedup.near", "less than 1"]),
    ("  filters: {min_tokens: 50, max_tokens: 10}\n", ["line 6", "data.filters.max_tokens", "below min_tokens (50)"]),
    ("  filters: {languages: [english]}\n", ["line 6", "'english' is not a language code"]),
    ("  filters: {refusal_patterns: ['']}\n", ["data.filters.refusal_patterns.0", "is empty"]),
    ("  dedup: {exact: true, nera: 0.8}\n", ["data.dedup", "did you mean 'near'"]),
])
def test_bad_curation_keys_are_recipe_errors(extra, needles, tmp_path, monkeypatch, capsys):
    refused(["data", recipe(tmp_path, extra=extra)], needles, tmp_path, monkeypatch, capsys)


def test_bad_command_line_values_are_refused_like_the_recipe(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path)
    refused(["data", path, "--near", "1.5"], ["data.dedup.near", "less than 1"], tmp_path, monkeypatch, capsys)
    refused(["data", path, "--min-tokens", "0"], ["data.filters.min_tokens"], tmp_path, monkeypatch, capsys)
    refused(["data", path, "--language", "xx"], ["'xx' is not a language code"], tmp_path, monkeypatch, capsys)


def test_nothing_to_do_is_refused_and_default_recipes_curate_nothing(tmp_path, monkeypatch, capsys):
    from ftune.recipe import load_recipe

    path = recipe(tmp_path)
    assert not Rules.from_section(load_recipe(path).data).active
    refused(["data", path], ["no curation rule is on", "--exact"], tmp_path, monkeypatch, capsys)
    code, output = invoke(["data", path, "--min-tokens", "4", "--set", "stage=dpo", "--set", "preference={}"], monkeypatch, capsys)
    assert_refused(code, output, ["data.filters.min_tokens: applies to stage: sft"])


def test_the_language_codes_are_the_detectors():
    from ftune.recipe.data import LANGUAGE_CODES

    identifier = cleaning._language_identifier()
    assert sorted(set(identifier.nb_classes)) == sorted(LANGUAGE_CODES)

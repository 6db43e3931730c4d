"""Inputs (issue #23, classes 3, 4, 8, 9), through the real entry point.

Every command that reads user data meets every input class: empty, binary, not UTF-8, a huge
line, JSON nested 100,000 deep (also in tool-call arguments, and inside a tokenization worker),
numbers JSON cannot hold, and U+2028 / form feed inside a valid line (accepted, and the lines
after it keep their numbers). Then ftune's own files read back: a damaged cache entry is rebuilt,
a damaged labelling session, checkpoint or metrics file is refused by name. And every JSON ftune
writes is valid JSON: a NaN score is an explicit null, counted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import GOOD_ROWS, PAIRS, invoke, recipe_text, refused, snapshot, write_jsonl

DEEP = 100_000
PROMPTS = [f"Say {i}." for i in range(8)]
JUDGE = "def judge(prompt, answers):\n    return ['good'] + ['bad'] * (len(answers) - 1)\n"


# --------------------------------------------------------------------------- the commands


def _recipe(tmp: Path, model: Path, stage: str, extra: str = "") -> str:
    if stage == "grpo":
        (tmp / "rewards.py").write_text("def short(prompts, completions, **columns):\n    return [-len(c) / 10 for c in completions]\n")
        extra += "grpo: {num_generations: 2, max_completion_length: 4}\nrewards: [{type: function, function: rewards.py:short}]\n"
    if stage == "rm":
        extra += "rm: {}\n"
    (tmp / "recipe.yaml").write_text(recipe_text(model, stage=stage, extra=extra))
    return str(tmp / "recipe.yaml")


def _label(tmp: Path, model: Path, prompts: str = "data.jsonl", *extra: str) -> list[str]:
    (tmp / "judge.py").write_text(JUDGE)
    return ["label", str(model), "--prompts", str(tmp / prompts), "--out", str(tmp / "session"), "--n", "2",
            "--max-new-tokens", "4", *extra]


def _decisions(tmp: Path, model: Path) -> list[str]:
    (tmp / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    return _label(tmp, model, "prompts.txt", "--decisions", str(tmp / "data.jsonl"))


# name -> (the rows it reads, as JSON objects, or None for a prompts file of text lines; argv(tmp, model))
COMMANDS = {
    "sft": (GOOD_ROWS, lambda t, m: ["sft", _recipe(t, m, "sft")]),
    "dpo": (PAIRS, lambda t, m: ["dpo", _recipe(t, m, "dpo")]),
    "rm": (PAIRS, lambda t, m: ["rm", _recipe(t, m, "rm")]),
    "grpo": ([{"prompt": p} for p in PROMPTS], lambda t, m: ["grpo", _recipe(t, m, "grpo")]),
    "inspect": (GOOD_ROWS, lambda t, m: ["inspect", _recipe(t, m, "sft")]),
    "data": (GOOD_ROWS, lambda t, m: ["data", _recipe(t, m, "sft"), "--exact", "--out", str(t / "curated")]),
    "eval-data": (GOOD_ROWS, lambda t, m: ["eval", str(m), "--data", str(t / "data.jsonl")]),
    "score-data": (PAIRS, lambda t, m: ["score", str(_RM["run"]), "--data", str(t / "data.jsonl"), "--out", str(t / "scored.jsonl")]),
    "export-gguf-report": (GOOD_ROWS, lambda t, m: ["export-gguf", str(m), "--out", str(t / "out" / "m.gguf"), "--type", "q8_0", "--report",
                                                    "--data", str(t / "data.jsonl")]),
    "label-prompts": (None, lambda t, m: _label(t, m, "data.jsonl", "--judge", f"{t / 'judge.py'}:judge")),
    "label-decisions": ([{"line": i + 1, "best": 0} for i in range(len(PROMPTS))], _decisions),
}


def _good_lines(command: str) -> list[bytes]:
    rows = COMMANDS[command][0]
    if rows is None:
        return [p.encode() for p in PROMPTS]
    return [json.dumps(r).encode() for r in rows]


def _row_with(command: str, field: str) -> bytes:
    """A row of the command's own kind with one more field, given as raw JSON text."""
    rows = COMMANDS[command][0]
    first = rows[0] if rows is not None else {"prompt": "Say it."}
    return (json.dumps(first)[:-1] + f', "extra": {field}}}').encode()


# --------------------------------------------------------------------------- the input cases


# name -> (line 2 of the file, or the whole file; what the one-line error must hold)
CASES = {
    "empty": (lambda c: b"", ["data.jsonl"]),
    "binary": (lambda c: b"\x00\x01\x02\xff binary", ["data.jsonl line 2", "NUL byte"]),
    "not-utf8": (lambda c: _row_with(c, '"cafX"').replace(b"X", b"\xe9"), ["data.jsonl line 2", "invalid UTF-8"]),
    "huge-line": (lambda c: b'{"instruction": "' + b"a" * (50 << 20) + b'"}', ["data.jsonl line 2", "longer than"]),
    "deeply-nested": (lambda c: _row_with(c, "[" * DEEP + "]" * DEEP), ["data.jsonl line 2", "nested too deeply"]),
    "nan": (lambda c: _row_with(c, "NaN"), ["data.jsonl line 2", "NaN is not a JSON number", "field 'extra'"]),
    "infinity": (lambda c: _row_with(c, "-Infinity"), ["data.jsonl line 2", "Infinity is not a JSON number", "field 'extra'"]),
    "1e400": (lambda c: _row_with(c, "1e400"), ["data.jsonl line 2", "beyond the range of a float", "field 'extra'"]),
}


def _file(command: str, case: str) -> bytes:
    make = CASES[case][0]
    if case == "empty":
        return b""
    good = _good_lines(command)
    return b"\n".join([good[0], make(command), *good[1:]]) + b"\n"


_RM: dict = {}  # the reward model run, for score --data


def _tmp(tmp_path: Path, command: str, request) -> Path:
    if command == "export-gguf-report":
        pytest.importorskip("llama_cpp")  # as tests/test_gguf_report.py: export needs llama.cpp's Python package
    if command == "score-data":
        _RM["run"] = request.getfixturevalue("rm_run")
    return tmp_path


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_every_bad_input_by_its_line(command, case, tmp_path, tiny_model_dir, request, monkeypatch, capsys):
    tmp = _tmp(tmp_path, command, request)
    argv = COMMANDS[command][1](tmp, tiny_model_dir)
    (tmp / "data.jsonl").write_bytes(_file(command, case))
    output = refused(argv, CASES[case][1], tmp_path, monkeypatch, capsys)
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1, output


@pytest.mark.parametrize("command", COMMANDS)
def test_u2028_and_form_feed_inside_a_line_keep_every_later_line_number(command, tmp_path, tiny_model_dir, request, monkeypatch, capsys):
    # Line 2 holds U+2028, U+2029, \x85 and a form feed inside a string (valid JSON, one line);
    # the file's line 6 is broken: the error must say line 6, not a line counted from split pieces.
    tmp = _tmp(tmp_path, command, request)
    argv = COMMANDS[command][1](tmp, tiny_model_dir)
    good = _good_lines(command)
    odd = _row_with(command, json.dumps("a\u2028b\u2029c\x85d\x0ce", ensure_ascii=False))
    broken = b'{"prompt": oops}'
    (tmp / "data.jsonl").write_bytes(b"\n".join([good[0], odd, *good[1:4], broken, *good[4:]]) + b"\n")
    refused(argv, ["data.jsonl line 6", "invalid JSON"], tmp_path, monkeypatch, capsys)


ACCEPTING = ["sft", "inspect", "data", "eval-data", "label-prompts"]


@pytest.mark.parametrize("command", ACCEPTING)
def test_u2028_and_form_feed_inside_a_line_are_accepted(command, tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = COMMANDS[command][1](tmp_path, tiny_model_dir)
    good = _good_lines(command)
    if command == "label-prompts":
        odd = "Say\u2028it\x0cnow.".encode()  # a plain-text prompt: one line, whole
    else:
        odd = json.dumps({"instruction": "a\u2028b\x0cc", "output": "d\u2029e"}, ensure_ascii=False).encode()
    (tmp_path / "data.jsonl").write_bytes(b"\n".join([good[0], odd, *good[1:]]) + b"\n")
    code, output = invoke(argv, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in output, output
    if command == "label-prompts":
        session = json.loads((tmp_path / "session" / "label-session.json").read_text())
        assert [(i["line"], i["prompt"]) for i in session["items"]][:3] == [(1, PROMPTS[0]), (2, "Say\u2028it\x0cnow."), (3, PROMPTS[1])]
    if command == "data":
        curated = [json.loads(line) for line in (tmp_path / "curated" / "data.jsonl").read_text().split("\n") if line]
        assert {"instruction": "a\u2028b\x0cc", "output": "d\u2029e"} in curated


# --------------------------------------------------------------------------- more cases, where they apply


def _tool_row(arguments) -> dict:
    return {"messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("shape", ["object", "string"])
def test_tool_call_arguments_nested_100000_deep_name_the_line_in_any_process(shape, num_proc, tmp_path, tiny_model_dir, monkeypatch, capsys):
    deep = '{"a": ' + "[" * DEEP + "]" * DEEP + "}"
    rows = [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"}]}) for i in range(1500)]
    bad = (json.dumps(_tool_row("ARGS"))).replace('"ARGS"', deep if shape == "object" else json.dumps(deep))
    rows[1400] = bad  # in the second job of 1024 rows: with num_proc 2, a worker process reads it
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "recipe.yaml").write_text(recipe_text(tiny_model_dir).replace("  max_length: 64\n", f"  max_length: 64\n  num_proc: {num_proc}\n"))
    output = refused(["inspect", str(tmp_path / "recipe.yaml")], ["data.jsonl line 1401", "nested too deeply"], tmp_path, monkeypatch, capsys)
    assert "Traceback" not in output and "worker failed" not in output


NUMBERS = {
    # a KTO label must be true/false or 1/0: 2^70 is neither, and is named at its line
    "kto-label-2^70": ("dpo", {"prompt": "q", "completion": "a", "label": 2 ** 70}, ["data.jsonl line 2", "field 'label' must be true or false"]),
    "kto-label-1e400": ("dpo", '{"prompt": "q", "completion": "a", "label": 1e400}', ["data.jsonl line 2", "beyond the range"]),
    "decision-line-2^70": ("label-decisions", {"line": 2 ** 70, "best": 0}, ["data.jsonl line 2", f"no prompt on line {2 ** 70}"]),
    "decision-best-nan": ("label-decisions", '{"line": 2, "best": NaN}', ["data.jsonl line 2", "NaN"]),
}


@pytest.mark.parametrize("name", NUMBERS)
def test_numbers_a_field_cannot_hold_are_refused_at_their_line(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    command, row, needles = NUMBERS[name]
    argv = COMMANDS[command][1](tmp_path, tiny_model_dir)
    if command == "dpo":
        argv = ["dpo", _recipe(tmp_path, tiny_model_dir, "dpo", extra="preference: {method: kto}\n")]
        first = json.dumps({"prompt": "p", "completion": "c", "label": True})
    else:
        first = json.dumps({"line": 1, "best": 0})
    (tmp_path / "data.jsonl").write_text(first + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    refused(argv, needles, tmp_path, monkeypatch, capsys)


def test_a_2_to_the_70_in_a_field_ftune_does_not_read_is_accepted(tmp_path, tiny_model_dir, monkeypatch, capsys):
    rows = [{**r, "id": 2 ** 70 + i} for i, r in enumerate(GOOD_ROWS)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    code, output = invoke(["inspect", _recipe(tmp_path, tiny_model_dir, "sft")], monkeypatch, capsys)
    assert code == 0, output


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("command", ["sft", "eval-data", "label-prompts", "label-decisions"])
def test_a_fifo_or_a_directory_as_the_data_file_is_refused_not_read(command, kind, tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = COMMANDS[command][1](tmp_path, tiny_model_dir)
    if kind == "fifo":
        os.mkfifo(tmp_path / "data.jsonl")  # reading it would wait for a writer for ever
    else:
        (tmp_path / "data.jsonl").mkdir()
    refused(argv, ["data.jsonl", "directory" if kind == "directory" else "not a regular file"], tmp_path, monkeypatch, capsys)


# A recipe: YAML ends a line at U+2028, U+2029 and \x85 where an editor shows one, so later line
# numbers would be off (or a comment's tail parsed as a key); a FIFO would hang the reader.
RECIPE_CASES = {
    "u2028-in-a-comment": (lambda t: t.replace("stage: sft\n", "stage: sft  # a\u2028b\n"), ["line 1, column 16", "U+2028"]),
    "u2029-in-a-value": (lambda t: t.replace("output: {dir: run}", "output: {dir: r\u2029un}"), ["line 8, column 16", "U+2029"]),
    "nel-in-a-value": (lambda t: t.replace("output: {dir: run}", "output: {dir: r\x85un}"), ["line 8, column 16", "U+0085"]),
    "fifo": (None, ["recipe.yaml", "not a regular file"]),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
@pytest.mark.parametrize("command", ["validate", "inspect", "sft", "data"])
def test_a_recipe_with_a_hidden_line_break_or_a_fifo_is_refused_at_its_place(command, case, tmp_path, tiny_model_dir, monkeypatch, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    edit, needles = RECIPE_CASES[case]
    if edit is None:
        os.mkfifo(tmp_path / "recipe.yaml")
    else:
        (tmp_path / "recipe.yaml").write_text(edit(recipe_text(tiny_model_dir)))
    refused([command, str(tmp_path / "recipe.yaml")], needles, tmp_path, monkeypatch, capsys)


def test_a_huge_set_value_is_shown_cut_short_in_its_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "recipe.yaml").write_text(recipe_text(tiny_model_dir))
    deep = "{a: " + "{b: " * 5000 + "1" + "}" * 5001
    for item in ["data.eval_fraction=" + "9" * 100_000, f"training={deep}", "stage=" + "x" * 100_000]:
        output = refused(["validate", str(tmp_path / "recipe.yaml"), "--set", item], ["characters)"], tmp_path, monkeypatch, capsys)
        assert len(output) < 2000, output[:3000]


# --------------------------------------------------------------------------- ftune's own files read back


def _cache_entry(cache: Path) -> Path:
    return next(p for p in (cache / "data").iterdir() if (p / "meta.json").exists())


CACHE_DAMAGE = {
    "array-truncated-to-0-bytes": lambda e: (e / "train_ids.npy").write_bytes(b""),
    "meta-truncated-to-0-bytes": lambda e: (e / "meta.json").write_bytes(b""),
    "meta-cut-short": lambda e: (e / "meta.json").write_bytes((e / "meta.json").read_bytes()[:40]),
    "array-missing": lambda e: (e / "eval_labels.npy").unlink(),
    "ids-beyond-the-vocabulary": lambda e: np.save(e / "train_ids.npy", np.full_like(np.load(e / "train_ids.npy"), 10 ** 6)),
    "labels-beyond-the-vocabulary": lambda e: np.save(e / "train_labels.npy", np.full_like(np.load(e / "train_labels.npy"), 10 ** 6)),
    "meta-edited": lambda e: (e / "meta.json").write_text((e / "meta.json").read_text().replace('"skipped_count": 0', '"skipped_count": 5')),
    "meta-wrong-types": lambda e: (e / "meta.json").write_text(json.dumps({"trained": "many", "arrays": 3})),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_a_damaged_cache_entry_is_rebuilt_with_a_note_and_training_succeeds(damage, tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    argv = ["sft", _recipe(tmp_path, tiny_model_dir, "sft")]
    write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    entry = _cache_entry(tmp_path / "cache")
    CACHE_DAMAGE[damage](entry)
    code, output = invoke([*argv, "--set", "output.dir=run2"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in output, output
    assert f"the data cache entry {entry} is damaged" in output and "rebuilding it" in output
    assert _cache_entry(tmp_path / "cache") == entry  # rebuilt in place: the next run is a plain hit
    code, output = invoke([*argv, "--set", "output.dir=run3"], monkeypatch, capsys)
    assert code == 0 and "is damaged" not in output, output


def test_a_damaged_cache_folder_ftune_did_not_mark_is_left_alone(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    argv = ["inspect", _recipe(tmp_path, tiny_model_dir, "sft")]
    write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    entry = _cache_entry(tmp_path / "cache")
    (entry / ".ftune-output.json").unlink()  # no marker: not provably ftune's, never removed
    (entry / "train_ids.npy").write_bytes(b"")
    before = sorted(p.name for p in entry.iterdir())
    code, output = invoke(argv, monkeypatch, capsys)
    assert code == 0 and "is damaged" in output, output
    assert sorted(p.name for p in entry.iterdir()) == before and (entry / "train_ids.npy").read_bytes() == b""


@pytest.fixture
def session_dir(tmp_path, tiny_model_dir, monkeypatch, capsys) -> Path:
    (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS[:3]))
    argv = _label(tmp_path, tiny_model_dir, "prompts.txt", "--judge", f"{tmp_path / 'judge.py'}:judge")
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    return tmp_path / "session"


def _edit_session(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


SESSION_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:50]), ["label-session.json", "unreadable labelling session"]),
    "empty": (lambda p: p.write_bytes(b""), ["label-session.json", "unreadable labelling session"]),
    "items-not-a-list": (lambda p: _edit_session(p, lambda d: d.update(items=7)), ["label-session.json", "field 'items' must be a list, not int"]),
    "line-a-string": (lambda p: _edit_session(p, lambda d: d["items"][1].update(line="2")), ["label-session.json", "field 'items[1].line'"]),
    "best-out-of-range": (lambda p: _edit_session(p, lambda d: d["items"][0].update(best=99)), ["field 'items[0].best'", "answer's index"]),
    "label-unknown": (lambda p: _edit_session(p, lambda d: d["items"][0].update(labels=["great", None])), ["field 'items[0].labels'"]),
    "sampling-n-negative": (lambda p: _edit_session(p, lambda d: d["sampling"].update(n=-1)), ["field 'sampling.n'"]),
    "history-wrong-item": (lambda p: _edit_session(p, lambda d: d.update(history=[{"item": 50, "before": {}}])), ["field 'history[0].item'"]),
    "nested-deeply": (lambda p: p.write_text('{"format": "ftune-label-session", "x": ' + "[" * DEEP + "]" * DEEP + "}"),
                      ["label-session.json", "nested too deeply"]),
    "nan": (lambda p: p.write_text(p.read_text().replace('"seed": 0', '"seed": NaN')), ["label-session.json", "NaN"]),
}


@pytest.mark.parametrize("damage", SESSION_DAMAGE)
def test_a_damaged_labelling_session_is_refused_naming_the_file_and_field(damage, session_dir, tiny_model_dir, monkeypatch, capsys):
    change, needles = SESSION_DAMAGE[damage]
    change(session_dir / "label-session.json")
    tmp = session_dir.parent
    refused(_label(tmp, tiny_model_dir, "prompts.txt", "--judge", f"{tmp / 'judge.py'}:judge"), needles, tmp, monkeypatch, capsys)


def _checkpoint(tmp: Path) -> tuple[Path, tuple]:
    import torch

    from ftune.train.checkpoints import save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(tmp, 1, model, optimizer, scheduler, {"epoch": 0, "batch": 1}, keep=2)
    return path, (model, optimizer, scheduler)


CHECKPOINT_DAMAGE = {
    "state-empty": (lambda p: (p / "state.json").write_bytes(b""), "state.json", "invalid JSON"),
    "state-cut-short": (lambda p: (p / "state.json").write_bytes((p / "state.json").read_bytes()[:30]), "state.json", "invalid JSON"),
    "step-a-string": (lambda p: (p / "state.json").write_text((p / "state.json").read_text().replace('"step": 1', '"step": "one"')),
                      "state.json", "field 'step' must be a int"),
    "scheduler-a-list": (lambda p: (p / "state.json").write_text(re.sub(r'"scheduler": \{[^}]*\}', '"scheduler": []', (p / "state.json").read_text())),
                         "state.json", "field 'scheduler' must be a dict"),
    "weights-truncated": (lambda p: (p / "trainable.safetensors").write_bytes(b"\x10"), "trainable.safetensors", "unreadable checkpoint file"),
    "optimizer-missing": (lambda p: (p / "optimizer.safetensors").unlink(), "optimizer.safetensors", "missing"),
    "rng-garbage": (lambda p: (p / "rng.safetensors").write_bytes(b"x" * 64), "rng.safetensors", "unreadable checkpoint file"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_file(damage, tmp_path):
    from ftune.errors import FtuneError
    from ftune.train.checkpoints import load_checkpoint

    path, parts = _checkpoint(tmp_path)
    assert load_checkpoint(path, *parts)["step"] == 1  # whole, it restores
    change, name, message = CHECKPOINT_DAMAGE[damage]
    change(path)
    with pytest.raises(FtuneError) as caught:
        load_checkpoint(path, *parts)
    assert name in str(caught.value) and message in str(caught.value), str(caught.value)
    assert "\n" not in caught.value.message


def test_damaged_metrics_are_refused_at_their_line(tmp_path):
    from ftune.errors import FtuneError
    from ftune.train.progress import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "note": "a\u2028b"}\n{"step": 2, "loss": null}\n')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    for bad in ('{"step": "x"}', '{"step": -3, "loss": 1.0}', "[" * DEEP, "\x00", "{"):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n' + bad + "\n")
        with pytest.raises(FtuneError) as caught:
            read_metrics(tmp_path)
        assert caught.value.place == f"{tmp_path / 'metrics.jsonl'} line 2", bad[:20]


# --------------------------------------------------------------------------- every JSON ftune writes is JSON


def test_no_module_but_textio_writes_json_itself():
    # The root of class 8: one writer (allow_nan=False), so no command can write NaN into a .json or .jsonl.
    root = Path(__file__).resolve().parent.parent / "ftune"
    offenders = [f"{path.relative_to(root)}:{number}" for path in sorted(root.rglob("*.py")) if path.name != "textio.py"
                 for number, line in enumerate(path.read_text().split("\n"), start=1)
                 if re.search(r"\bjson\.dumps?\(", line) and not line.lstrip().startswith("#")]
    assert offenders == []


def test_no_line_is_split_by_str_splitlines_in_a_reader():
    # The root of class 9: one line reader (textio); splitlines would split at U+2028 and form feeds.
    root = Path(__file__).resolve().parent.parent / "ftune"
    offenders = [f"{path.relative_to(root)}:{number}" for path in sorted(root.rglob("*.py"))
                 for number, line in enumerate(path.read_text().split("\n"), start=1)
                 if re.search(r"read_text\([^)]*\)\.splitlines\(\)|\.readlines\(\)", line)]
    assert offenders == []


def test_a_nan_score_is_written_as_null_and_counted(rm_run, tmp_path, monkeypatch, capsys):
    from ftune.modeling import reward_model

    write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    real = reward_model.RewardModel.score_ids

    def some_nan(self, sequences):
        scores = real(self, sequences)
        return [float("nan") if i == 2 else float("inf") if i == 5 else s for i, s in enumerate(scores)]

    monkeypatch.setattr(reward_model.RewardModel, "score_ids", some_nan)
    code, output = invoke(["score", str(rm_run), "--data", str(tmp_path / "pairs.jsonl")], monkeypatch, capsys)
    assert code == 0 and "+nan" not in output and "+inf" not in output, output
    assert "2 not scored" in output and "pairs.jsonl line 2" in output
    lines = (tmp_path / "pairs.scored.jsonl").read_text().split("\n")[:-1]
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written into JSON")) for line in lines]
    assert rows[1]["reward_chosen"] is None and rows[1]["reward_margin"] is None and rows[2]["reward_rejected"] is None
    assert rows[0]["reward_margin"] is not None
    meta = json.loads((tmp_path / "pairs.scored.jsonl.score.json").read_text())
    assert meta["not_finite"] == 2 and meta["pairs"] == 1


def test_the_writer_refuses_nan_and_a_report_says_where_it_wrote_null():
    from ftune.errors import FtuneError
    from ftune.guards import textio

    with pytest.raises(FtuneError) as caught:
        textio.dumps({"loss": float("nan")}, place="run.json")
    assert caught.value.place == "run.json"
    value, nulls = textio.nulled({"loss": float("inf"), "per": [1.0, float("nan")], "ok": 2})
    assert value == {"loss": None, "per": [1.0, None], "ok": 2} and nulls == ["loss", "per[1]"]
    assert json.loads(textio.dumps(value)) == value

"""A corpus of bad recipes, YAML, data and models: each, through the real entry point, gives a
clear message naming the problem and its place, a non-zero exit, no traceback, and leaves the
disk byte for byte as it was. Then the good neighbours of those cases: they still work."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import get_args

import pytest
from helpers import GOOD_ROWS, PAIRS, invoke, refused, snapshot, write_jsonl

from ftune import recipe as recipes

# --------------------------------------------------------------------------- building recipes


def block_recipe(model, values: dict[str, str] | None = None, *, stage: str = "sft", data: str = "data.jsonl") -> str:
    """A small valid recipe in block style; `values` sets "section.key" (or "data.train.0.key") to raw YAML."""
    train = {"path": data}
    sections: dict[str, dict] = {
        "base_model": {"name": str(model)},
        "data": {"train": [train], "eval_fraction": "0.25", "max_length": "64"},
        "training": {"max_steps": "1", "batch_size": "2"},
        "output": {"dir": "run"},
    }
    if stage == "dpo":
        sections["preference"] = {"method": "dpo"}
    lists: dict[str, dict] = {}  # sections that are lists of mappings (rewards): one item
    for key, raw in (values or {}).items():
        parts = key.split(".")
        if parts[:3] == ["data", "train", "0"]:
            train[parts[3]] = raw
        elif len(parts) == 3 and parts[1] == "0":
            lists.setdefault(parts[0], {})[parts[2]] = raw
        else:
            sections.setdefault(parts[0], {})[parts[1]] = raw
    lines = [f"stage: {stage}"]
    for name, body in sections.items():
        lines.append(f"{name}:")
        for key, value in body.items():
            if key == "train":
                lines.append("  train:")
                for item in value:
                    pairs = [f"{k}: {v}" for k, v in item.items()]
                    lines += ["    - " + pairs[0], *("      " + p for p in pairs[1:])]
            else:
                lines.append(f"  {key}: {value}")
    for name, item in lists.items():
        pairs = [f"{k}: {v}" for k, v in item.items()]
        lines += [f"{name}:", "  - " + pairs[0], *("    " + p for p in pairs[1:])]
    return "\n".join(lines) + "\n"


def line_of(text: str, fragment: str) -> int:
    """1-based line of the first line holding `fragment`."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if fragment in line)


def write_case(tmp: Path, text: str | bytes, *, rows=GOOD_ROWS, data: str = "data.jsonl") -> Path:
    if rows is not None:
        write_jsonl(tmp / data, rows)
    path = tmp / "recipe.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def stage_of(text: str | bytes) -> str:
    return "dpo" if (b"stage: dpo" if isinstance(text, bytes) else "stage: dpo") in text else "sft"




def numeric_fields(kind: type) -> list[tuple[str, str]]:
    """("section.key", stage) for every recipe field of this number type (optional ones too)."""
    found = []
    for section, field in recipes.Recipe.model_fields.items():
        model = recipes._inner_model(field.annotation)
        if model is None:
            continue
        listed = "list[" in str(field.annotation)  # e.g. rewards: a list of sections, written as one item
        for name, inner in model.model_fields.items():
            if inner.annotation is kind or set(get_args(inner.annotation)) == {kind, type(None)}:
                found.append((f"{section}{'.0' if listed else ''}.{name}", "dpo" if section == "preference" else "sft"))
    found += [(f"data.train.0.{name}", "sft") for name, inner in recipes.DataSource.model_fields.items()
              if inner.annotation is kind or set(get_args(inner.annotation)) == {kind, type(None)}]
    return sorted(set(found))


FLOAT_FIELDS = numeric_fields(float)
INT_FIELDS = numeric_fields(int)


# --------------------------------------------------------------------------- the recipe corpus
# name -> (build(tmp, model) -> (recipe text or bytes, extra argv), substrings of the message).
# Each runs through `ftune validate` and through the stage command (`ftune sft` or `ftune dpo`).


def field_case(key: str, stage: str, raw: str, needle: str):
    def build(tmp, model):
        text = block_recipe(model, {key: raw}, stage=stage)
        return text, []

    def needles(text: str) -> list[str]:
        return [f"line {line_of(text, key.split('.')[-1] + ': ' + raw)}", key, needle]

    return build, needles


RECIPE_CASES: dict = {}
for key, stage in FLOAT_FIELDS:
    for raw in (".inf", "-.inf", ".nan", "1e999", "-1.0e+999"):
        RECIPE_CASES[f"{key}={raw}"] = field_case(key, stage, raw, "finite number")
for key, stage in INT_FIELDS:
    RECIPE_CASES[f"{key}=2^70"] = field_case(key, stage, str(2**70), "less than or equal to")
RECIPE_CASES["training.seed=-1"] = field_case("training.seed", "sft", "-1", "greater than or equal to 0")
RECIPE_CASES["training.seed=2^64"] = field_case("training.seed", "sft", str(2**64), "less than or equal to")
RECIPE_CASES["data.max_length=2^40"] = field_case("data.max_length", "sft", str(2**40), "less than or equal to")
RECIPE_CASES["output.dir-empty"] = field_case("output.dir", "sft", '""', "at least 1 character")
RECIPE_CASES["data-path-nul"] = field_case("data.train.0.path", "sft", '"a\\0b.jsonl"', "NUL")


def fixed(text_of, *needles, argv=()):
    """A case whose text is built from the model path; needles are fixed strings."""
    return (lambda tmp, model: (text_of(tmp, model), list(argv))), (lambda text: list(needles))


def with_set(item: str, needle: str):
    return fixed(lambda t, m: block_recipe(m), f"--set {item}", needle, argv=["--set", item])


BOMB = "".join(f"{a}: &{a} [{','.join([f'*{p}'] * 9) if p else ','.join(['lol'] * 9)}]\n"
               for p, a in zip([None, *"abcdefgh"], "abcdefghi"))


def nested_bomb(tmp, model):
    """A billion laughs hidden in evaluation.prompts: 10^9 strings from nine short lines."""
    anchors = "".join(f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
    return block_recipe(model) + "evaluation:\n  prompts:\n    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + anchors


def indented(depth: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v\n"


RECIPE_CASES.update({
    # numbers through --set
    "set-lr-inf": with_set("training.learning_rate=.inf", "finite number"),
    "set-lr-1e999": with_set("training.learning_rate=1e999", "finite number"),
    "set-alpha-nan": with_set("adapter.alpha=nan", "finite number"),
    "set-epochs-inf": with_set("training.epochs=inf", "finite number"),
    "set-seed-2^65": with_set(f"training.seed={2**65}", "less than or equal to"),
    "set-duplicate-key": with_set("training={max_steps: 1, max_steps: 2}", "appears twice"),
    "set-alias-bomb": with_set("evaluation.prompts=[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                               "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                               "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]", "more than 100,000 values"),
    # YAML structure: aliases, recursion, depth
    "billion-laughs": fixed(lambda t, m: BOMB, "line 6", "expand to more than 100,000 values"),
    "billion-laughs-in-prompts": fixed(nested_bomb, "expand to more than 100,000 values", "alias bomb"),
    "recursive-alias-list": fixed(lambda t, m: block_recipe(m) + "evaluation:\n  prompts: &p [a, *p]\n", "line 15", "recursive"),
    "recursive-alias-map": fixed(lambda t, m: block_recipe(m) + "adapter: &a\n  method: lora\n  extra: *a\n", "line 16", "recursive"),
    "deep-flow-nesting": fixed(lambda t, m: block_recipe(m) + "evaluation:\n  prompts: " + "[" * 10000 + "]" * 10000 + "\n",
                               "line 15", "nested deeper than 32 levels"),
    "deep-block-nesting": fixed(lambda t, m: block_recipe(m) + indented(200), "nested deeper than 32 levels"),
    "deep-through-aliases": fixed(lambda t, m: block_recipe(m) + "evaluation:\n  prompts:\n    - &a0 [x]\n"
                                  + "".join(f"    - &a{i} [*a{i - 1}]\n" for i in range(1, 40)), "nested deeper than 32 levels"),
    "undefined-alias": fixed(lambda t, m: block_recipe(m) + "evaluation:\n  prompts: *nothing\n", "line 15", "invalid YAML", "undefined alias"),
    # duplicate keys at every level
    "duplicate-top-level": fixed(lambda t, m: block_recipe(m) + "stage: dpo\n", "line 14", "key 'stage' appears twice", "first on line 1"),
    "duplicate-section": fixed(lambda t, m: block_recipe(m) + "training:\n  epochs: 2\n", "key 'training' appears twice",
                               "first on line 9", "again on line 14"),
    "duplicate-nested": fixed(lambda t, m: block_recipe(m).replace("  batch_size: 2\n", "  batch_size: 2\n  batch_size: 4\n"),
                              "key 'batch_size' appears twice", "first on line 11", "again on line 12"),
    "duplicate-in-flow-map": fixed(lambda t, m: block_recipe(m) + "adapter: {r: 8, alpha: 16, r: 4}\n", "line 14", "key 'r' appears twice"),
    "duplicate-in-source": fixed(lambda t, m: block_recipe(m, {"data.train.0.format": "alpaca"}).replace(
        "      format: alpaca\n", "      format: alpaca\n      format: text\n"), "key 'format' appears twice", "first on line 7"),
    "duplicate-column": fixed(lambda t, m: block_recipe(m, {"data.train.0.columns": "{instruction: q, instruction: r}"}),
                              "key 'instruction' appears twice"),
    # files that are not UTF-8 YAML text
    "latin-1": fixed(lambda t, m: block_recipe(m).encode() + "training_note: café\n".encode("latin-1"), "recipe.yaml", "line 14",
                     "byte 0xe9 is not UTF-8"),
    "latin-1-in-value": fixed(lambda t, m: block_recipe(m).replace("dir: run", "dir: r\xe9sultats").encode("latin-1"),
                              "line 13", "not UTF-8"),
    "utf-16": fixed(lambda t, m: block_recipe(m).encode("utf-16"), "recipe.yaml", "UTF-16"),
    "binary-nul": fixed(lambda t, m: b"stage: sft\n\x00\x01\x02\x03", "recipe.yaml", "line 2", "binary"),
    "random-bytes": fixed(lambda t, m: bytes(range(128, 256)) * 4, "recipe.yaml", "not UTF-8"),
    "control-character": fixed(lambda t, m: block_recipe(m).replace("dir: run", "dir: run\x07"), "line 13", "U+0007"),
    "empty-file": fixed(lambda t, m: "", "recipe.yaml", "the recipe is empty"),
    "only-comments": fixed(lambda t, m: "# my recipe\n\n# to do\n", "the recipe is empty"),
    "only-null": fixed(lambda t, m: "~\n", "the recipe is empty"),
    "huge-file": fixed(lambda t, m: block_recipe(m) + "#" * (1 << 20) + "\n", "recipe.yaml", "larger than 1 MiB"),
    "scalar-document": fixed(lambda t, m: "just a sentence\n", "a recipe is a mapping"),
    "two-documents": fixed(lambda t, m: block_recipe(m) + "---\nstage: dpo\n", "line 14", "single document"),
    "python-tag": fixed(lambda t, m: block_recipe(m) + "evaluation: !!python/object/apply:os.system [echo hi]\n", "line 14",
                        "could not determine a constructor"),
    "unhashable-key": fixed(lambda t, m: block_recipe(m) + "? [a, b]\n: 1\n", "line 14", "unhashable key"),
    "bad-date": fixed(lambda t, m: block_recipe(m, {"training.seed": "2024-13-45"}), "line 12", "month must be in 1..12"),
    "5000-digit-int": fixed(lambda t, m: block_recipe(m, {"training.seed": "9" * 5000}), "line 12", "digits"),
    "epochs-overflow-int": fixed(lambda t, m: block_recipe(m, {"training.epochs": "1" + "0" * 400}), "line 12", "training.epochs"),
    # columns
    "column-mapped-twice": fixed(lambda t, m: block_recipe(m, {"data.train.0.columns": "{instruction: question, output: question}"}),
                                 "line 7", "data.train.0.columns.output", "'question' is mapped twice"),
    "column-mapped-twice-block": fixed(lambda t, m: block_recipe(m, {"data.train.0.columns": "\n        prompt: q\n        completion: a\n"
                                                                     "        text: q"}), "line 10", "columns.text", "mapped twice"),
    "column-unknown-name": fixed(lambda t, m: block_recipe(m, {"data.train.0.columns": "{instrucion: question}"}), "line 7",
                                 "'instrucion' is not a column ftune reads", "did you mean 'instruction'"),
    "column-wrong-for-format": fixed(lambda t, m: block_recipe(m, {"data.train.0.format": "text", "data.train.0.columns": "{output: body}"}),
                                     "line 8", "'output' is not a column", "of text: text"),
    "column-in-eval-source": fixed(lambda t, m: block_recipe(m).replace("  eval_fraction: 0.25\n", "  eval:\n    - path: data.jsonl\n"
                                                                       "      columns: {chosen: a, rejected: a}\n"),
                                   "line 9", "data.eval.0.columns.rejected", "mapped twice"),
    # output.dir
    "output-dir-is-a-file": fixed(lambda t, m: file_at(t / "run", block_recipe(m)), "line 13", "output.dir", "is an existing file, not a directory"),
    "output-dir-parent-is-a-file": fixed(lambda t, m: file_at(t / "notes.txt", block_recipe(m).replace("dir: run", "dir: notes.txt/run")),
                                         "line 13", "notes.txt is a file"),
    "output-dir-broken-link": fixed(lambda t, m: link_at(t / "run", t / "gone", block_recipe(m)), "line 13", "symbolic link"),
    "output-dir-unknown-user": fixed(lambda t, m: block_recipe(m).replace("dir: run", "dir: ~no-such-user-ftune/run"), "line 13",
                                     "no such user"),
    "set-output-dir-is-a-file": fixed(lambda t, m: file_at(t / "taken", block_recipe(m)), "--set output.dir=taken", "existing file",
                                      argv=["--set", "output.dir=taken"]),
})


def file_at(path: Path, text: str) -> str:
    path.write_text("the user's notes\n")
    return text


def link_at(path: Path, target: Path, text: str) -> str:
    path.symlink_to(target)
    return text


@pytest.mark.parametrize("command", ["validate", "stage"])
@pytest.mark.parametrize("name", RECIPE_CASES, ids=list(RECIPE_CASES))
def test_bad_recipe_is_refused_with_its_place(name, command, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = RECIPE_CASES[name]
    text, argv = build(tmp_path, tiny_model_dir)
    stage = stage_of(text)
    path = write_case(tmp_path, text, rows=PAIRS if stage == "dpo" else GOOD_ROWS)
    before = snapshot(tmp_path)
    started = time.perf_counter()
    code, output = invoke([stage if command == "stage" else "validate", str(path), *argv], monkeypatch, capsys)
    assert time.perf_counter() - started < 30, "a bad recipe must be refused fast"
    assert code == 2, output
    assert "error: " in output and "recipe.yaml" in output, output
    for needle in needles(text if isinstance(text, str) else ""):
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert "Traceback" not in output
    assert snapshot(tmp_path) == before, "a refused recipe must leave the disk as it was"


def test_billion_laughs_fails_fast_in_validate(tmp_path, monkeypatch, capsys):
    path = write_case(tmp_path, BOMB, rows=None)
    assert len(BOMB) < 1024
    started = time.perf_counter()
    code, output = invoke(["validate", str(path)], monkeypatch, capsys)
    assert code == 2 and "alias bomb" in output and time.perf_counter() - started < 2


def test_every_number_field_is_bounded():
    """New fields get the same guards: finite floats everywhere, an upper bound on every integer."""
    assert recipes.Section.model_config["allow_inf_nan"] is False
    assert len(FLOAT_FIELDS) >= 14 and len(INT_FIELDS) >= 19
    for key, _ in INT_FIELDS:
        section, name = key.rsplit(".", 1)
        model = recipes.DataSource if section == "data.train.0" else recipes._model_at((section.split(".")[0],))
        limits = [m for m in model.model_fields[name].metadata if hasattr(m, "le") or hasattr(m, "lt")]
        assert limits, f"{key} has no upper bound"


def test_inspect_refuses_infinite_epochs(tmp_path, tiny_model_dir, monkeypatch, capsys):
    path = write_case(tmp_path, block_recipe(tiny_model_dir, {"training.epochs": ".inf"}).replace("  max_steps: 1\n", ""))
    before = snapshot(tmp_path)
    code, output = invoke(["inspect", str(path)], monkeypatch, capsys)
    assert code == 2 and "line 11" in output and "training.epochs" in output and "finite number" in output, output
    assert "Traceback" not in output and snapshot(tmp_path) == before


# --------------------------------------------------------------------------- data and models
# name -> (build(tmp, model) -> argv, substrings). Run through the stage command only.


def data_case(files: dict[str, bytes | str | list], values: dict | None = None, *, stage: str = "sft", data: str = "data.jsonl"):
    def build(tmp: Path, model: Path) -> list[str]:
        for name, content in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, list):
                write_jsonl(target, content)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        path = write_case(tmp, block_recipe(model, values, stage=stage, data=data), rows=None)
        return [stage, str(path)]

    return build


def parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


CSV_HEADER = "instruction,output\n"
CSV_GOOD = "".join(f"Say {i}.,{i}\n" for i in range(6))
SKIP = {"data.on_bad_row": "skip"}
IDENTICAL = [*PAIRS[:5], {"prompt": "q", "chosen": "Same  answer.", "rejected": "Same answer. "}]
CONV_PAIR = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello\nthere"}]}
HH_PAIR = {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same "}
KTO = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(6)]
KTO_RECIPE = {"preference.method": "kto"}

DATA_CASES = {
    # JSONL lines and rows
    "row-is-a-list": (data_case({"data.jsonl": [*GOOD_ROWS[:3], "[1, 2]"]}), ["data.jsonl line 4", "must be an object", "not list"]),
    "row-is-a-string": (data_case({"data.jsonl": [*GOOD_ROWS[:2], '"text"']}), ["data.jsonl line 3", "must be an object", "not str"]),
    "row-is-a-number": (data_case({"data.jsonl": [*GOOD_ROWS[:2], "42"]}), ["data.jsonl line 3", "not int"]),
    "row-is-null": (data_case({"data.jsonl": [*GOOD_ROWS[:2], "null"]}), ["data.jsonl line 3", "not null"]),
    "first-row-not-an-object": (data_case({"data.jsonl": ["null"] * 3}), ["data.jsonl line", "must be an object", "not null"]),
    "null-output": (data_case({"data.jsonl": [*GOOD_ROWS[:4], {"instruction": "x", "output": None}]}), ["data.jsonl line 5", "missing field 'output'"]),
    "number-output": (data_case({"data.jsonl": [*GOOD_ROWS[:4], {"instruction": "x", "output": 5}]}),
                      ["data.jsonl line 5", "field 'output' must be a string, not int"]),
    "object-instruction": (data_case({"data.jsonl": [*GOOD_ROWS[:1], {"instruction": {"a": 1}, "output": "y"}]}),
                           ["data.jsonl line 2", "not dict"]),
    "number-input": (data_case({"data.jsonl": [*GOOD_ROWS[:3], {"instruction": "x", "input": 3, "output": "y"}]}),
                     ["data.jsonl line 4", "field 'input' must be a string"]),
    "bool-system": (data_case({"data.jsonl": [*GOOD_ROWS[:3], {"instruction": "x", "system": True, "output": "y"}]}),
                    ["data.jsonl line 4", "field 'system' must be a string, not bool"]),
    "null-message-content": (data_case({"data.jsonl": [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}]}),
                             ["data.jsonl line 1", "messages[0].content must be a string, not null"]),
    "null-text": (data_case({"data.jsonl": [{"text": "ok"}, {"text": None}]}), ["data.jsonl line 2", "missing field 'text'"]),
    "number-text": (data_case({"data.jsonl": [{"text": "ok"}, {"text": 1.5}]}), ["data.jsonl line 2", "not float"]),
    "deeply-nested-json": (data_case({"data.jsonl": [*GOOD_ROWS[:2], "[" * 100000 + "]" * 100000]}), ["data.jsonl line 3", "nested too deeply"]),
    "5000-digit-number": (data_case({"data.jsonl": [*GOOD_ROWS[:2], '{"instruction": "x", "output": ' + "9" * 5000 + "}"]}),
                          ["data.jsonl line 3", "unreadable JSON"]),
    "invalid-json-after-u2028": (data_case({"data.jsonl": [{"instruction": "a\u2028b", "output": "c"}, '{"instruction": oops}']}),
                                 ["data.jsonl line 2", "invalid JSON"]),
    "json-list-with-bad-row": (data_case({"d.json": json.dumps([*GOOD_ROWS[:2], 7])}, data="d.json"), ["d.json row 2", "must be an object"]),
    "json-deeply-nested": (data_case({"d.json": "[" * 100000 + "]" * 100000}, data="d.json"), ["d.json", "nested too deeply"]),
    "data-path-is-a-directory": (data_case({"folder/x.jsonl": "[]"}, {"data.train.0.path": "folder"}), ["folder is a directory"]),
    "swapped-columns-still-checked": (data_case({"data.jsonl": [{"a": "q", "b": None}]}, {"data.train.0.columns": "{instruction: a, output: b}"}),
                                      ["data.jsonl line 1", "missing field 'output'"]),
    # CSV: places are where a record starts
    "csv-multiline-record-bad": (data_case({"d.csv": CSV_HEADER + 'Say 1.,"one\nand\nmore"\n"Say 2.",\n'}, data="d.csv"),
                                 ["d.csv line 5", "field 'output' is empty"]),
    "csv-unterminated-quote": (data_case({"d.csv": CSV_HEADER + CSV_GOOD + 'x,"never\nclosed\n'}, data="d.csv"),
                               ["d.csv line 8", "invalid CSV", "unexpected end of data"]),
    "csv-text-after-quote": (data_case({"d.csv": CSV_HEADER + 'x,y\n"a" b,c\n'}, data="d.csv"), ["d.csv line 3", "invalid CSV"]),
    "csv-too-many-fields": (data_case({"d.csv": CSV_HEADER + "Say 0.,0\nSay 1.,1\n" + '"a\nb",c,d\n'}, data="d.csv"),
                            ["d.csv line 4", "3 fields but the header names 2"]),
    "csv-too-few-fields": (data_case({"d.csv": CSV_HEADER + 'Say 1.,1\n"only\ninstruction"\n'}, {"data.train.0.format": "alpaca"}, data="d.csv"),
                           ["d.csv line 3", "missing field 'output'"]),
    "csv-duplicate-header": (data_case({"d.csv": "instruction,output,output\nx,y,z\n"}, data="d.csv"), ["d.csv line 1", "'output' twice"]),
    "csv-missing-column": (data_case({"d.csv": "instruction,answer\nx,y\n"}, {"data.train.0.format": "alpaca"}, data="d.csv"),
                           ["d.csv line 2", "missing field 'output'"]),
    "csv-mapped-column-missing": (data_case({"d.csv": CSV_HEADER + CSV_GOOD}, {"data.train.0.columns": "{text: body}"}, data="d.csv"),
                                  ["d.csv line ", "column 'body' (mapped to 'text') is missing"]),
    "csv-invalid-utf8": (data_case({"d.csv": (CSV_HEADER + "caf\xe9,x\n").encode("latin-1")}, data="d.csv"), ["d.csv line 2", "invalid UTF-8"]),
    # Parquet
    "parquet-missing-column": (data_case({"d.parquet": parquet_bytes([{"instruction": "x", "answer": "y"}] * 4)},
                                         {"data.train.0.format": "alpaca"}, data="d.parquet"), ["d.parquet row ", "missing field 'output'"]),
    "parquet-null-field": (data_case({"d.parquet": parquet_bytes([*GOOD_ROWS[:3], {"instruction": "x", "output": None}])}, data="d.parquet"),
                           ["d.parquet row 3", "missing field 'output'"]),
    "parquet-number-field": (data_case({"d.parquet": parquet_bytes([{"instruction": "x", "output": 1}] * 3)}, data="d.parquet"),
                             ["d.parquet row ", "must be a string, not int"]),
    "parquet-damaged": (data_case({"d.parquet": b"PAR1 this is not parquet PAR1"}, data="d.parquet"), ["d.parquet", "unreadable Parquet"]),
    # preference and KTO rows
    "identical-pair": (data_case({"data.jsonl": IDENTICAL}, stage="dpo"), ["data.jsonl line 6", "chosen and rejected are the same answer"]),
    "identical-pair-case-kept": (data_case({"data.jsonl": [*PAIRS[:1], {"prompt": "q", "chosen": "ok", "rejected": "ok"}]}, stage="dpo"),
                                 ["data.jsonl line 2", "same answer"]),
    "identical-conversational-pair": (data_case({"data.jsonl": [*PAIRS[:2], CONV_PAIR]}, stage="dpo"), ["data.jsonl line 3", "same answer"]),
    "identical-hh-pair": (data_case({"data.jsonl": [HH_PAIR]}, stage="dpo"), ["data.jsonl line 1", "same answer"]),
    "identical-message-list-answers": (data_case({"data.jsonl": [{"prompt": "q", "chosen": [{"role": "assistant", "content": "x y"}],
                                                                  "rejected": [{"role": "assistant", "content": "x  y"}]}]}, stage="dpo"),
                                       ["data.jsonl line 1", "same answer"]),
    "identical-pair-in-kto": (data_case({"data.jsonl": IDENTICAL}, KTO_RECIPE, stage="dpo"), ["data.jsonl line 6", "same answer"]),
    "all-pairs-identical-skipped": (data_case({"data.jsonl": [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3}, SKIP, stage="dpo"),
                                    ["no usable training rows"]),
    "kto-label-string": (data_case({"data.jsonl": [*KTO[:3], {"prompt": "q", "completion": "a", "label": "maybe"}]}, KTO_RECIPE, stage="dpo"),
                         ["data.jsonl line 4", "field 'label' must be true or false", "'maybe'"]),
    "kto-label-number": (data_case({"data.jsonl": [*KTO[:3], {"prompt": "q", "completion": "a", "label": 2}]}, KTO_RECIPE, stage="dpo"),
                         ["data.jsonl line 4", "not 2"]),
    "kto-label-null": (data_case({"data.jsonl": [*KTO[:1], {"prompt": "q", "completion": "a", "label": None}]}, KTO_RECIPE, stage="dpo"),
                       ["data.jsonl line 2", "missing field 'label'"]),
    "kto-label-list": (data_case({"data.jsonl": [*KTO[:1], {"prompt": "q", "completion": "a", "label": [True]}]}, KTO_RECIPE, stage="dpo"),
                       ["data.jsonl line 2", "not list"]),
    "kto-label-nan": (data_case({"data.jsonl": [*KTO[:1], '{"prompt": "q", "completion": "a", "label": NaN}']}, KTO_RECIPE, stage="dpo"),
                      ["data.jsonl line 2", "field 'label'"]),
    "kto-label-missing-csv": (data_case({"k.csv": "prompt,completion,label\nq,a,true\nq,b,\n"}, {**KTO_RECIPE, "data.train.0.format": "kto"},
                                        stage="dpo", data="k.csv"), ["k.csv line 3", "field 'label'"]),
    # models
    "config-cut-short": (lambda t, m: model_case(t, m, config='{"model_type": "llama", "hidden_size": '),
                         ["config.json is not valid JSON", "line 1", "copy or download the model again"]),
    "config-binary": (lambda t, m: model_case(t, m, config=b"\xff\xfe\x00\x01junk"), ["config.json is not UTF-8"]),
    "config-a-list": (lambda t, m: model_case(t, m, config="[1, 2]"), ["config.json must hold a JSON object"]),
    "config-no-model-type": (lambda t, m: model_case(t, m, config='{"hidden_size": 8}'), ["has no model_type"]),
    "config-unknown-model-type": (lambda t, m: model_case(t, m, config='{"model_type": "frobnicator"}'),
                                  ["model_type 'frobnicator'", "does not know", "pip install -U transformers"]),
    "needs-remote-code": (lambda t, m: model_case(t, m, remote=True), ["remote-model", "needs the Python code shipped with it",
                                                                         "base_model.trust_remote_code: true"]),
    "needs-remote-code-dpo": (lambda t, m: model_case(t, m, remote=True, stage="dpo"), ["needs the Python code", "trust_remote_code"]),
    "tokenizer-damaged": (lambda t, m: model_case(t, m, tokenizer="{not json"), ["cannot load the tokenizer", "tokenizer.json"]),
}


REMOTE_CONFIG = "from transformers import LlamaConfig\n\n\nclass RemoteConfig(LlamaConfig):\n    model_type = 'ftune_remote_llama'\n"
REMOTE_MODEL = ("from transformers import LlamaForCausalLM\n\nfrom .configuration_remote import RemoteConfig\n\n\n"
                "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n")


def remote_model(tmp: Path, model: Path) -> Path:
    """A model whose config names classes shipped as Python files next to it (a Llama underneath)."""
    target = tmp / "remote-model"
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="ftune_remote_llama", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig", "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (target / "modeling_remote.py").write_text(REMOTE_MODEL)
    return target


def model_case(tmp: Path, model: Path, *, config: str | bytes | None = None, tokenizer: str | None = None,
               remote: bool = False, stage: str = "sft") -> list[str]:
    if remote:
        target = remote_model(tmp, model)
    else:
        target = tmp / "damaged-model"
        shutil.copytree(model, target)
    if config is not None:
        (target / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    if tokenizer is not None:
        (target / "tokenizer.json").write_text(tokenizer)
    path = write_case(tmp, block_recipe(target, stage=stage), rows=PAIRS if stage == "dpo" else GOOD_ROWS)
    return [stage, str(path)]


@pytest.mark.parametrize("name", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_or_model_is_refused_with_its_place(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = DATA_CASES[name]
    refused(build(tmp_path, tiny_model_dir), needles, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("name", ["config-cut-short", "config-unknown-model-type", "needs-remote-code"])
def test_inspect_and_sft_share_the_model_checks(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = DATA_CASES[name]
    argv = build(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    code, output = invoke(["inspect", argv[1]], monkeypatch, capsys)
    assert code == 1 and all(n in output for n in needles) and "Traceback" not in output, output
    assert snapshot(tmp_path) == before


def test_the_corpus_is_large_enough():
    assert len(RECIPE_CASES) * 2 + len(DATA_CASES) >= 200


# --------------------------------------------------------------------------- what still works


def run_ok(argv: list[str], monkeypatch, capsys) -> str:
    code, output = invoke(argv, monkeypatch, capsys)
    assert code in (0, None), output
    return output


# JSON escapes control characters (\x0c, \x1c, \r), but these may stand raw in a string.
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_jsonl_strings_may_hold_unicode_line_separators(separator, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftune.data.pipeline import load_samples

    rows = [{"instruction": f"Line one{separator}line two {i}.", "output": f"A{separator}B {i}"} for i in range(8)]
    path = tmp_path / "data.jsonl"
    ending = "\r\n" if separator == "\x85" else "\n"  # Windows line ends too
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + ending for r in rows).encode("utf-8"))
    assert separator in path.read_text(encoding="utf-8")
    recipe = recipes.load_recipe(write_case(tmp_path, block_recipe(tiny_model_dir), rows=None))
    train, evaluation, report, _ = load_samples(recipe.data, base_dir=tmp_path, seed=0, allowed={"alpaca"})
    texts = {m["content"] for s in train.samples + evaluation.samples for m in s.messages}
    assert {f"A{separator}B {i}" for i in range(8)} <= texts and report.skipped_count == 0
    if separator == "\u2028":  # and it trains, through the real entry point
        output = run_ok(["sft", str(tmp_path / "recipe.yaml")], monkeypatch, capsys)
        assert "8 rows used of 8" in output


def test_csv_records_with_quoted_newlines_and_long_fields_load(tmp_path):
    from ftune.data.sources import read_source

    long = "x" * 300_000  # beyond the csv module's default field limit
    (tmp_path / "d.csv").write_text(f'{CSV_HEADER}"two\nlines",a\n"{long}",b\nq\u2028r,c\n', encoding="utf-8")
    rows, _ = read_source("d.csv", base_dir=tmp_path)
    assert [r.place.rsplit(" ", 1)[-1] for r in rows] == ["2", "4", "5"]
    assert rows[0].data == {"instruction": "two\nlines", "output": "a"} and rows[1].data["instruction"] == long
    assert rows[2].data == {"instruction": "q\u2028r", "output": "c"}


def test_swapped_columns_swap():
    from ftune.data.formats import rename_columns

    assert rename_columns({"a": 1, "b": 2, "c": 3}, {"b": "a", "a": "b"}) == {"a": 2, "b": 1, "c": 3}


def test_benign_aliases_and_merge_keys_still_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    text = (f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\n"
            "data:\n  train: [&source {path: data.jsonl, format: alpaca}]\n  eval: [*source]\n  max_length: 64\n"
            "training: &train\n  max_steps: 1\n  batch_size: 2\n"
            "evaluation:\n  prompts: &prompts [Say 1., Say 2.]\n  max_new_tokens: 4\n"
            "adapter: {<<: {r: 4, alpha: 8}, r: 8}\noutput: {dir: run}\n")
    path = write_case(tmp_path, "\ufeff" + text)  # with an editor's byte-order mark
    assert "ok (stage: sft" in run_ok(["validate", str(path)], monkeypatch, capsys)
    recipe = recipes.load_recipe(path, ["training.batch_size=4"])
    assert recipe.adapter.r == 8 and recipe.adapter.alpha == 8 and recipe.data.eval[0].path == "data.jsonl"
    run_ok(["sft", str(path)], monkeypatch, capsys)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_override_of_an_aliased_value_changes_only_that_place(tmp_path):
    text = block_recipe("demo").replace("  train:\n    - path: data.jsonl\n", "  train:\n    - &s {path: data.jsonl}\n  eval:\n    - *s\n")
    recipe = recipes.parse_recipe(text, "r.yaml", ["data.eval.0.path=held-out.jsonl"])
    assert recipe.data.train[0].path == "data.jsonl" and recipe.data.eval[0].path == "held-out.jsonl"


def test_identical_pairs_are_skipped_and_counted(tmp_path, tiny_model_dir, monkeypatch, capsys):
    rows = [*PAIRS, {"prompt": "q", "chosen": "same", "rejected": " same"}, CONV_PAIR]
    write_jsonl(tmp_path / "data.jsonl", rows)
    path = write_case(tmp_path, block_recipe(tiny_model_dir, SKIP, stage="dpo"), rows=None)
    output = run_ok(["dpo", str(path)], monkeypatch, capsys)
    assert "8 rows used of 10" in output and "2 skipped" in output, output
    assert output.count("chosen and rejected are the same answer") == 2


def test_kto_labels_from_csv_and_numbers(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftune.data.formats import convert

    for raw, label in [(True, True), (0, False), ("TRUE", True), (" false ", False), ("1", True), (1.0, True)]:
        assert convert({"prompt": "q", "completion": "a", "label": raw}, "kto").label is label
    rows = "".join(f"q{i},a{i},{'true' if i % 2 else 'false'}\n" for i in range(8))
    (tmp_path / "k.csv").write_text("prompt,completion,label\n" + rows)
    path = write_case(tmp_path, block_recipe(tiny_model_dir, {**KTO_RECIPE, "data.train.0.format": "kto"}, stage="dpo", data="k.csv"), rows=None)
    assert "8 rows used of 8" in run_ok(["dpo", str(path)], monkeypatch, capsys)


def test_trust_remote_code_in_the_recipe_runs_the_models_code(tmp_path, tiny_model_dir, monkeypatch, capsys):
    model = remote_model(tmp_path, tiny_model_dir)
    path = write_case(tmp_path, block_recipe(model, {"base_model.trust_remote_code": "true"}))
    run_ok(["sft", str(path)], monkeypatch, capsys)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


def test_output_dir_problem_is_one_function(tmp_path):
    (tmp_path / "f").write_text("x")
    assert recipes.output_dir_problem("f", tmp_path).endswith("is an existing file, not a directory")
    assert recipes.output_dir_problem("new/run", tmp_path) is None
    assert recipes.output_dir_problem(str(tmp_path), Path("/elsewhere")) is None
    assert os.path.isabs(recipes.output_dir_problem("f/run", tmp_path).split(" is a file")[0])

"""A corpus of bad inputs: each gives one clear message naming the problem and its place,
a non-zero exit, no traceback, and leaves the disk as it was."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from helpers import (
    GOOD_ROWS, PAIRS, bin_only_model, empty_dir, invoke, recipe_text, refused, setup, sft_run_dir, silent_template_model, snapshot,
    with_file,
)

# name -> (build(tmp, model) -> argv, substrings the message must contain)
CASES = {
    # recipes
    "invalid-yaml": (lambda t, m: setup(t, m, text="stage: sft\n  base_model: demo\n"), ["recipe.yaml", "line 2", "invalid YAML"]),
    "not-a-mapping": (lambda t, m: setup(t, m, text="- a\n- b\n"), ["recipe.yaml", "a recipe is a mapping"]),
    "unknown-key": (lambda t, m: setup(t, m, text=recipe_text(m, extra="trainig: {}\n")), ["line 8", "did you mean 'training'"]),
    "wrong-type": (lambda t, m: setup(t, m, text=recipe_text(m).replace("batch_size: 2", "batch_size: two")), ["line 7", "training.batch_size"]),
    "bad-enum": (lambda t, m: setup(t, m, text=recipe_text(m, extra="adapter: {method: lroa}\n")), ["adapter.method", "did you mean 'lora'"]),
    "missing-key": (lambda t, m: setup(t, m, text=recipe_text(m).replace("output: {dir: run}\n", "")), ["output", "required key is missing"]),
    "conflicting-options": (lambda t, m: setup(t, m, text=recipe_text(m, extra="quantization: {load_in_4bit: true}\nadapter: {method: none}\n")),
                            ["quantization.load_in_4bit", "QLoRA needs an adapter"]),
    "bad-override": (lambda t, m: [*setup(t, m), "--set", "training.lr=1"], ["--set training.lr=1", "unknown key 'lr'"]),
    "missing-recipe": (lambda t, m: ["sft", str(t / "nope.yaml")], ["no such recipe file", "nope.yaml"]),
    # data
    "missing-data-file": (lambda t, m: setup(t, m, rows=None), ["data.jsonl does not exist"]),
    "empty-data-file": (lambda t, m: setup(t, m, rows=[]), ["data.jsonl", "has no rows"]),
    "invalid-json-line": (lambda t, m: setup(t, m, rows=[*GOOD_ROWS[:3], '{"instruction": oops}']), ["data.jsonl line 4", "invalid JSON"]),
    "json-not-a-list": (lambda t, m: with_file(t, "d.json", b'{"instruction": "x"}', setup(t, m, rows=None, data="d.json")),
                        ["d.json", "must hold a list of rows"]),
    "missing-field": (lambda t, m: setup(t, m, rows=[*GOOD_ROWS[:5], {"instruction": "x"}], fmt="alpaca"), ["data.jsonl line 6", "missing field 'output'"]),
    "empty-answer": (lambda t, m: setup(t, m, rows=[*GOOD_ROWS[:2], {"instruction": "x", "output": " "}]), ["data.jsonl line 3", "'output' is empty"]),
    "wrong-type-field": (lambda t, m: setup(t, m, rows=[*GOOD_ROWS[:2], {"instruction": ["x"], "output": "y"}]), ["data.jsonl line 3", "must be a string, not list"]),
    "invalid-utf8": (lambda t, m: with_file(t, "data.jsonl", b'{"instruction": "ok", "output": "ok"}\n{"instruction": "caf\xe9", "output": "x"}\n',
                                            setup(t, m, rows=None)), ["data.jsonl line 2", "invalid UTF-8"]),
    "no-assistant-turn": (lambda t, m: setup(t, m, rows=[{"messages": [{"role": "user", "content": "hi"}]}]), ["data.jsonl line 1", "no assistant turn"]),
    "unknown-role": (lambda t, m: setup(t, m, rows=[{"messages": [{"role": "narrator", "content": "hi"}]}]), ["data.jsonl line 1", "'narrator'"]),
    "undetectable-format": (lambda t, m: setup(t, m, rows=[{"question": "q", "answer": "a"}]), ["data.jsonl line 1", "cannot tell the format", "columns:"]),
    "column-map-missing": (lambda t, m: setup(t, m, text=recipe_text(m).replace("{path: data.jsonl}", "{path: data.jsonl, columns: {instruction: question}}")),
                           ["data.jsonl line", "column 'question'"]),
    "all-rows-skipped": (lambda t, m: setup(t, m, rows=[{"instruction": "x", "output": ""}] * 3,
                                            text=recipe_text(m).replace("eval_fraction: 0.25", "eval_fraction: 0.25\n  on_bad_row: skip")),
                         ["no usable training rows"]),
    "preference-without-rejected": (lambda t, m: setup(t, m, rows=[{"prompt": "q", "chosen": "a"}], stage="dpo", fmt="preference"),
                                    ["data.jsonl line 1", "missing field 'rejected'"]),
    "sft-data-for-dpo": (lambda t, m: setup(t, m, rows=GOOD_ROWS, stage="dpo"), ["data.jsonl line", "alpaca format cannot train this stage"]),
    "preference-data-for-sft": (lambda t, m: setup(t, m, rows=PAIRS), ["data.jsonl line", "preference format cannot train this stage"]),
    "malformed-hh-pair": (lambda t, m: setup(t, m, rows=[{"chosen": "no dialogue here", "rejected": "none either"}], stage="dpo"),
                          ["data.jsonl line 1", "share no dialogue prefix"]),
    # models
    "missing-model-dir": (lambda t, m: setup(t, m, text=recipe_text("./no-such-model")), ["model directory ./no-such-model does not exist"]),
    "dir-without-config": (lambda t, m: setup(t, m, text=recipe_text(empty_dir(t / "empty-model"))), ["empty-model", "no config.json"]),
    "pickle-weights-refused": (lambda t, m: setup(t, m, text=recipe_text(bin_only_model(t, m))), ["no safetensors weights", "pickle"]),
    "hub-id-offline": (lambda t, m: setup(t, m, text=recipe_text("ftune-tests/not-cached")), ["ftune-tests/not-cached", "not in the local cache"]),
    "init-from-not-a-run": (lambda t, m: setup(t, m, rows=PAIRS, stage="dpo", extra=f"preference: {{method: dpo, init_from: {t}}}\n"),
                            ["is not an ftune run directory"]),
    "init-from-unfinished": (lambda t, m: setup(t, m, rows=PAIRS, stage="dpo",
                                                extra=f"preference: {{init_from: {sft_run_dir(t, status='interrupted', base=str(m))}}}\n"),
                             ["init_from", "not a completed run"]),
    "init-from-other-base": (lambda t, m: setup(t, m, rows=PAIRS, stage="dpo",
                                                extra=f"preference: {{init_from: {sft_run_dir(t, status='completed', base='demo')}}}\n"),
                             ["was trained on 'demo'"]),
    "init-from-pickle-adapter": (lambda t, m: setup(t, m, rows=PAIRS, stage="dpo",
                                                    extra=f"preference: {{init_from: {sft_run_dir(t, status='completed', base=str(m))}}}\n"),
                                 ["adapter_model.safetensors", "pickle"]),
    "template-never-ends-turns": (lambda t, m: setup(t, m, text=recipe_text(silent_template_model(t, m))), ["never emits an end-of-turn token"]),
}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_gets_a_clear_message_and_changes_nothing(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = CASES[name]
    refused(build(tmp_path, tiny_model_dir), needles, tmp_path, monkeypatch, capsys)


def test_disk_full_during_the_final_save_keeps_the_previous_state(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """--overwrite of a completed run whose final save meets a full disk: the earlier run is there, as it was."""
    argv = setup(tmp_path, tiny_model_dir)
    assert invoke([*argv], monkeypatch, capsys)[0] in (0, None)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    import peft.peft_model

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 16)  # a few bytes land, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)  # what peft's save_pretrained calls
    code, output = invoke([*argv, "--overwrite"], monkeypatch, capsys)  # the same run directory: a real replacement
    assert code == 1 and "No space left on device" in output and "Traceback" not in output
    assert "replacing the run in" in output  # it did set the earlier run aside to write its own in its place
    # The earlier run is back in its place, byte for byte (names, sizes, times, contents), and nothing is left beside it.
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "recipe.yaml", "run"]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30

"""Data at scale: parallel tokenization gives the same arrays, rows stream in bounded memory, the cache is
memory-mapped, and weighted mixtures draw each source's share, the same after a resume."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, recipe_for, write_rows
from helpers import adapter, kill_9_after_checkpoint, start

from ftune.data import build, mixture
from ftune.data.pipeline import prepare_sft
from ftune.errors import FtuneError
from ftune.train.steps import epoch_samples


def alpaca(i: int, words: int = 6) -> dict:
    return {"instruction": f"Question {i}: " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(words)),
            "input": "", "output": f"Answer {i} " + "x" * (i % 13)}


def mixed_file(path: Path, n: int) -> Path:
    """Alpaca rows with a blank line, rows that are bad (skipped) and a conversation in between."""
    lines = []
    for i in range(n):
        if i % 301 == 7:
            lines.append(json.dumps({"instruction": f"q{i}"}))  # no output: a bad row
        elif i % 500 == 3:
            lines.append("")
        else:
            lines.append(json.dumps(alpaca(i)))
    path.write_text("\n".join(lines) + "\n")
    return path


def arrays(result) -> list[np.ndarray]:
    train, evaluation, _ = result
    return [np.asarray(a) for a in (train.ids, train.labels, train.offsets, train.source, evaluation.ids, evaluation.labels, evaluation.offsets)]


def test_parallel_and_single_process_tokenization_give_identical_arrays(tmp_path, tokenizer, formatter):
    mixed_file(tmp_path / "a.jsonl", 2600)  # three jobs of build.CHUNK rows, the last one short
    write_rows(tmp_path / "b.jsonl", [alpaca(10_000 + i) for i in range(700)])
    extra = "  on_bad_row: skip\n"
    results = []
    for procs in (1, 3):
        recipe = recipe_for(tmp_path, extra + f"  num_proc: {procs}\n", data="a.jsonl}, {path: b.jsonl, samples: 500")
        results.append(prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=None))
    for one, three in zip(arrays(results[0]), arrays(results[1])):
        assert np.array_equal(one, three)
    assert results[0][2].as_dict() == results[1][2].as_dict() and results[0][2].examples == results[1][2].examples
    report = results[0][2]
    assert report.sources[0]["rows"] == 2600 - 6 and report.sources[0]["skipped"] == 9 and report.sources[1]["used"] == 500
    assert report.skipped[0].startswith(f"{tmp_path / 'a.jsonl'} line 8:")  # places stay exact: the file's own line numbers


def test_a_bad_row_deep_in_a_parallel_read_is_named_by_its_line(tmp_path, tokenizer, formatter):
    rows = [json.dumps(alpaca(i)) for i in range(3000)]
    rows[2499] = '{"instruction": "q", "output": oops}'
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    recipe = recipe_for(tmp_path, "  num_proc: 2\n")
    with pytest.raises(FtuneError) as caught:
        prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=None)
    assert caught.value.place == f"{tmp_path / 'train.jsonl'} line 2500" and "invalid JSON" in caught.value.message
    rows[2499] = json.dumps({"instruction": "q"})  # converts badly: stops the run unless on_bad_row: skip
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(FtuneError) as caught:
        prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=None)
    assert caught.value.place == f"{tmp_path / 'train.jsonl'} line 2500"


def _peak_bytes(tmp_path: Path, tokenizer, formatter, rows: int) -> int:
    folder = tmp_path / str(rows)
    folder.mkdir()
    write_rows(folder / "train.jsonl", [alpaca(i, words=30) for i in range(rows)])
    recipe = recipe_for(folder, "  num_proc: 1\n")
    tracemalloc.start()
    try:
        prepare_sft(recipe, tokenizer, formatter, base_dir=folder, cache_root=folder / "cache")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rows_stream_through_in_bounded_memory(tmp_path, tokenizer, formatter):
    # Python objects for rows live one job at a time: 8x the rows is far less than 8x the peak.
    small, large = (_peak_bytes(tmp_path, tokenizer, formatter, n) for n in (2 * build.CHUNK, 16 * build.CHUNK))
    assert large < 2.5 * small, (small, large)


def test_the_cache_opens_memory_mapped_and_reads_no_row(tmp_path, tokenizer, formatter, monkeypatch):
    write_rows(tmp_path / "train.jsonl", [alpaca(i) for i in range(300)])
    recipe = recipe_for(tmp_path)
    first = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")
    from ftune.data import encode, pipeline

    monkeypatch.setattr(encode, "parse", lambda *a, **k: pytest.fail("a row was parsed on a cache hit"))
    monkeypatch.setattr(pipeline, "build", lambda *a, **k: pytest.fail("tokenized again"))
    train, evaluation, report = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")
    assert isinstance(train.ids, np.memmap) and isinstance(evaluation.labels, np.memmap)
    assert train.trained_tokens() == first[0].trained_tokens() and report.sources == first[2].sources
    # A damaged entry is rebuilt, not trusted.
    entry = next(p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").exists())
    (entry / "train_offsets.npy").write_bytes(b"garbage")
    monkeypatch.undo()
    again = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")
    assert np.array_equal(again[0].ids, first[0].ids)


# --------------------------------------------------------------------------- mixtures


def test_quotas_follow_the_weights_to_one_sample():
    assert mixture.quotas([1, 1, 2], 10) == [2, 3, 5] or mixture.quotas([1, 1, 2], 10) == [3, 2, 5]
    counts = mixture.quotas([0.7, 0.2, 0.1], 12_345)
    assert sum(counts) == 12_345 and all(abs(c - w * 12_345) < 1 for c, w in zip(counts, (0.7, 0.2, 0.1)))


def test_each_epoch_draws_the_planned_share_afresh():
    source_of = np.array([0] * 1000 + [1] * 100, dtype=np.int16)
    epochs = [mixture.draw(source_of, [300, 100], replacement=False, seed=3, epoch=e) for e in range(3)]
    for chosen in epochs:
        assert np.bincount(source_of[chosen]).tolist() == [300, 100] and len(set(chosen.tolist())) == 400
    assert not np.array_equal(epochs[0], epochs[1])  # the down-weighted source shows other rows next epoch
    assert np.array_equal(epochs[0], mixture.draw(source_of, [300, 100], replacement=False, seed=3, epoch=0))
    # With replacement, a small source repeats as evenly as it can: every sample 2 or 3 times.
    upsampled = mixture.draw(source_of, [100, 250], replacement=True, seed=3, epoch=0)
    repeats = np.bincount(upsampled[source_of[upsampled] == 1] - 1000, minlength=100)
    assert repeats.min() >= 2 and repeats.max() <= 3 and repeats.sum() == 250


def weighted_recipe(folder: Path, model: Path, *, weights=(3, 1), extra: str = "", steps: int = 6) -> Path:
    write_rows(folder / "big.jsonl", [{"instruction": f"Say big {i}.", "output": f"Big {i}."} for i in range(60)])
    write_rows(folder / "small.jsonl", [{"instruction": f"Say small {i}.", "output": f"Small {i}."} for i in range(20)])
    path = folder / "recipe.yaml"
    path.write_text(
        f"stage: sft\nbase_model: {{name: {model}}}\n"
        f"data:\n  train:\n    - {{path: big.jsonl, weight: {weights[0]}}}\n    - {{path: small.jsonl, weight: {weights[1]}}}\n"
        f"  eval: [{{path: small.jsonl, samples: 4}}]\n  max_length: 64\n{extra}"
        "adapter: {r: 8, alpha: 16, dropout: 0.1}\n"
        f"training: {{learning_rate: 2.0e-2, batch_size: 2, max_steps: {steps}, save_steps: 1, save_total_limit: 2, warmup_ratio: 0}}\n"
        "output: {dir: run}\n"
    )
    return path


def test_inspect_shows_each_sources_planned_and_drawn_share(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = weighted_recipe(tmp_path, tiny_model_dir, extra="  epoch_samples: 40\n")
    code, output = invoke(["inspect", str(recipe), "--json"], monkeypatch, capsys)
    assert code == 0, output
    shares = json.loads(output[output.index("{"):])["shares"]
    assert [s["planned"] for s in shares] == [0.75, 0.25] and [s["drawn"] for s in shares] == [0.75, 0.25]
    code, output = invoke(["inspect", str(recipe)], monkeypatch, capsys)
    assert "planned share" in output and "75.0%" in output and "25.0%" in output


def test_a_source_asked_for_more_than_it_has_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = weighted_recipe(tmp_path, tiny_model_dir, weights=(1, 3))  # small.jsonl: 20 rows asked for 60 of 80
    code, output = invoke(["sft", str(recipe)], monkeypatch, capsys)
    assert code != 0 and "Traceback" not in output
    assert "data.train[1] (small.jsonl)" in output and "asks for 60" in output and "data.replacement" in " ".join(output.split())
    assert not (tmp_path / "run" / "adapter").exists()
    recipe = weighted_recipe(tmp_path, tiny_model_dir, weights=(1, 3), extra="  replacement: true\n", steps=1)
    code, output = invoke(["sft", str(recipe), "--overwrite"], monkeypatch, capsys)
    assert code == 0, output


def test_a_weighted_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path, tiny_model_dir):
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    extra = "  epoch_samples: 16\n"  # 8 steps of 2: two epochs of 16 samples, each drawn afresh
    straight = start("sft", weighted_recipe(tmp_path / "straight", tiny_model_dir, extra=extra, steps=12))
    assert straight.wait(timeout=600) == 0, straight.communicate()[0][-3000:]
    recipe = weighted_recipe(tmp_path / "killed", tiny_model_dir, extra=extra, steps=12)
    kill_9_after_checkpoint("sft", recipe, 7)
    resumed = start("sft", recipe)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and "resuming from step-" in output, output[-3000:]
    expected, got = adapter(tmp_path / "straight" / "run"), adapter(tmp_path / "killed" / "run")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_epoch_draws_are_what_training_batches(tmp_path, tiny_model_dir):
    from ftune.recipe import load_recipe

    recipe = load_recipe(weighted_recipe(tmp_path, tiny_model_dir, extra="  epoch_samples: 40\n"))
    from ftune.data.packing import Encoded

    train = Encoded(np.zeros(80, np.int32), np.zeros(80, np.int32), np.arange(81), np.array([0] * 60 + [1] * 20, np.int16))
    chosen = epoch_samples(recipe, train, 0)
    assert np.bincount(train.source[chosen]).tolist() == [30, 10]
    assert os.environ.get("FTUNE_NO_PROGRESS") == "1"


def test_load_time_dedup_keeps_the_first_across_parallel_jobs_and_names_both_rows(tmp_path, tokenizer, formatter):
    rows = [alpaca(i) for i in range(2500)]
    long_answer = " ".join(f"word{k}" for k in range(60))
    rows[10] = {"instruction": "Describe the river.", "input": "", "output": long_answer}
    rows[1500] = {"instruction": "Describe the river.", "input": "", "output": long_answer.replace("word30", "other")}
    rows[2400] = {**rows[5], "instruction": "  " + rows[5]["instruction"].upper() + " "}  # same text but for case and spaces
    write_rows(tmp_path / "train.jsonl", rows)
    results = []
    for procs in (1, 2):
        recipe = recipe_for(tmp_path, f"  num_proc: {procs}\n  dedup: {{exact: true, near: 0.8}}\n")
        results.append(prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=None))
    report = results[0][2]
    assert report.removed == results[1][2].removed and report.removed_count == 2
    name = tmp_path / "train.jsonl"
    assert report.removed[0].startswith(f"{name} line 1501: near duplicate") and report.removed[0].endswith(f"(kept: {name} line 11)")
    assert report.removed[1].startswith(f"{name} line 2401: exact duplicate") and report.removed[1].endswith(f"(kept: {name} line 6)")
    assert report.sources[0]["used"] == 2498 and report.removed_by_rule == {"near duplicate": 1, "exact duplicate": 1}
    for one, two in zip(arrays(results[0]), arrays(results[1])):
        assert np.array_equal(one, two)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_parallel_tokenization_stops_every_worker(signal_name, tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import sys
    import time

    write_rows(tmp_path / "train.jsonl", [alpaca(i, words=40) for i in range(40 * build.CHUNK)])
    (tmp_path / "recipe.yaml").write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\n"
                                          "data: {train: [{path: train.jsonl}], num_proc: 2}\noutput: {dir: run}\n")
    env = {**os.environ, "FTUNE_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "ftune", "inspect", str(tmp_path / "recipe.yaml")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(_children(process.pid)) < 2:  # the workers have started
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-2000:]
        time.sleep(0.05)
    workers = _children(process.pid)
    process.send_signal(getattr(signal, signal_name))
    output = process.communicate(timeout=120)[0]
    assert process.returncode in (130, 143, -15), output[-2000:]
    assert "Traceback" not in output
    alive = lambda: [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text()]  # noqa: E731
    deadline = time.time() + 10  # they die with their parent, a moment after it
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive()
    left = sorted(p.name for p in (tmp_path / "cache" / "data").glob(".*"))
    assert not left, f"{signal_name} left its spill behind: {left}"  # either stop signal cleans up what it was writing


def test_a_cached_report_names_the_files_this_recipe_reads(tmp_path, tokenizer, formatter):
    # The same rows in two folders: the second recipe's report must not name the first folder's file.
    reports = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        write_rows(tmp_path / name / "train.jsonl", [alpaca(i) for i in range(20)] + [{"instruction": "q"}])
        recipe = recipe_for(tmp_path / name, "  on_bad_row: skip\n")
        reports.append(prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path / name, cache_root=tmp_path / "cache")[2])
    assert [r.skipped[0].split(" line ")[0] for r in reports] == [str(tmp_path / n / "train.jsonl") for n in ("one", "two")]


def test_smoke_on_a_weighted_recipe_trains_every_source(tmp_path, tiny_model_dir, monkeypatch, capsys):
    recipe = weighted_recipe(tmp_path, tiny_model_dir)
    code, output = invoke(["sft", str(recipe), "--smoke"], monkeypatch, capsys)
    assert code == 0, output


def test_trained_tokens_per_sample_are_known_without_reading_labels(tmp_path, tokenizer, formatter):
    from ftune.data.packing import Encoded
    from ftune.data.rendering import IGNORE

    write_rows(tmp_path / "train.jsonl", [alpaca(i) for i in range(300)])
    train = prepare_sft(recipe_for(tmp_path), tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")[0]
    plain = Encoded(np.asarray(train.ids), np.asarray(train.labels), train.offsets)  # nothing known: counted in blocks
    labels = np.asarray(train.labels) != IGNORE
    labels[train.offsets[:-1]] = False
    expected = np.add.reduceat(labels.astype(np.int64), train.offsets[:-1])
    assert np.array_equal(train.trained_per_sample(), expected) and np.array_equal(plain.trained_per_sample(), expected)
    assert train.trained_tokens() == plain.trained_tokens() == int(expected.sum())


def test_the_cache_removes_only_folders_ftune_marked(tmp_path, tokenizer, formatter):
    import shutil

    write_rows(tmp_path / "train.jsonl", [alpaca(i) for i in range(50)])
    recipe, cache = recipe_for(tmp_path), tmp_path / "cache"
    first = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=cache)[0]
    entry = next(p for p in cache.iterdir() if (p / "meta.json").exists())
    # A user's folders where ftune looks: one named as the entry (with a damaged meta.json), one
    # named as a dead process's spill. Neither carries ftune's marker, so both must survive.
    shutil.rmtree(entry)
    for folder in (entry, cache / ".spill.999999999.abc"):
        folder.mkdir()
        (folder / "meta.json").write_text("not json")
        (folder / "notes.txt").write_text("mine")
    again = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=cache)[0]
    assert np.array_equal(np.asarray(again.ids), np.asarray(first.ids))
    for folder in (entry, cache / ".spill.999999999.abc"):
        assert (folder / "notes.txt").read_text() == "mine" and (folder / "meta.json").read_text() == "not json"
    assert not [p for p in cache.glob(".spill.*") if p.name != ".spill.999999999.abc"]  # its own spill is gone

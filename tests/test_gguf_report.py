"""`ftune export-gguf --type A,B,C --report`: several types in one command, measured and one picked.

Fast tests: the command line's bad inputs (through the real entry point, before any
conversion: nothing on disk changes), the budget and the pick, the files' names and their
atomic writing. Slow tests: the demo model exported to q8_0, q6_k and q4_k_m with a report on
a few held-out rows, and a tiny fine-tuning run reported on its own held-out split; each
report's perplexity is what `ftune eval` says of the same file on the same data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import refused, write_jsonl
from typer.testing import CliRunner

from ftune.cli import app
from ftune.errors import FtuneError
from ftune.gguf import report as quant_report
from ftune.gguf.export import output_paths, parse_types

pytest.importorskip("llama_cpp")

ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of Spain?"}, {"role": "assistant", "content": "The capital of Spain is Madrid."}]},
    {"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red is a primary colour."}]},
    {"messages": [{"role": "user", "content": "Add two and three."}, {"role": "assistant", "content": "Two plus three is five."}]},
    {"messages": [{"role": "user", "content": "Which planet is red?"}, {"role": "assistant", "content": "Mars is known as the red planet."}]},
]


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


# --------------------------------------------------------------------------- bad input, through the real entry point


def _model(tmp: Path, model: Path) -> list[str]:
    write_jsonl(tmp / "rows.jsonl", ROWS)
    return ["export-gguf", str(model), "--out", str(tmp / "out" / "m.gguf")]


def _with(tmp: Path, name: str, content: str, argv: list[str]) -> list[str]:
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(content)
    return argv


# name -> (build(tmp, model) -> argv, substrings the message must contain)
CASES = {
    "unknown-type-in-list": (lambda t, m: [*_model(t, m), "--type", "q4_k_m,q5_km"], ["--type", "unknown GGUF type 'q5_km'", "did you mean 'q5_k_m'"]),
    "duplicate-type": (lambda t, m: [*_model(t, m), "--type", "q8_0,q4_k_m,Q8_0"], ["--type", "names q8_0 twice"]),
    "duplicate-type-spelled-differently": (lambda t, m: [*_model(t, m), "--type", "q4-k-m,q4_k_m"], ["--type", "names q4_k_m twice"]),
    "empty-type-entry": (lambda t, m: [*_model(t, m), "--type", "q8_0,,q4_k_m"], ["--type", "entry 2 is empty"]),
    "trailing-comma": (lambda t, m: [*_model(t, m), "--type", "q8_0,"], ["--type", "entry 2 is empty"]),
    "report-without-data-or-run": (lambda t, m: [*_model(t, m), "--type", "q8_0", "--report"],
                                   ["--report", "not an ftune run", "--data FILE"]),
    "report-data-missing": (lambda t, m: [*_model(t, m), "--report", "--data", str(t / "nope.jsonl")], ["--data", "nope.jsonl does not exist"]),
    "report-data-bad-row": (lambda t, m: _with(t, "bad.jsonl", json.dumps(ROWS[0]) + "\n{oops\n",
                                               [*_model(t, m), "--report", "--data", str(t / "bad.jsonl")]), ["bad.jsonl line 2", "invalid JSON"]),
    "data-without-report": (lambda t, m: [*_model(t, m), "--data", str(t / "rows.jsonl")], ["--data", "--report is not given"]),
    "budget-without-report": (lambda t, m: [*_model(t, m), "--ppl-budget", "5%"], ["--ppl-budget", "--report is not given"]),
    "budget-not-a-number": (lambda t, m: [*_model(t, m), "--report", "--data", str(t / "rows.jsonl"), "--ppl-budget", "lots"],
                            ["--ppl-budget", "'lots' is not a non-negative number"]),
    "budget-negative": (lambda t, m: [*_model(t, m), "--report", "--data", str(t / "rows.jsonl"), "--ppl-budget", "-2%"],
                        ["--ppl-budget", "not a non-negative number"]),
    "budget-ambiguous": (lambda t, m: [*_model(t, m), "--report", "--data", str(t / "rows.jsonl"), "--ppl-budget", "5"],
                         ["--ppl-budget", "+500%", "write 5% for 5 percent"]),
    "budget-nan": (lambda t, m: [*_model(t, m), "--report", "--data", str(t / "rows.jsonl"), "--ppl-budget", "nan"],
                   ["--ppl-budget", "not a non-negative number"]),
    "report-exists": (lambda t, m: _with(t, "out/m.report.json", "{}", [*_model(t, m), "--report", "--data", str(t / "rows.jsonl")]),
                      ["m.report.json already exists", "--overwrite"]),
    "report-not-ours-with-overwrite": (lambda t, m: _with(t, "out/m.report.png", "a user's picture",
                                                          [*_model(t, m), "--report", "--data", str(t / "rows.jsonl"), "--overwrite"]),
                                       ["m.report.png was not written by", "ftune replaces only what it wrote"]),
    "typed-output-not-ours": (lambda t, m: _with(t, "out/m.q8_0.gguf", "not a gguf", [*_model(t, m), "--type", "f16,q8_0", "--overwrite"]),
                              ["m.q8_0.gguf", "not a GGUF file ftune exported"]),
}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_gets_a_clear_message_and_changes_nothing(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = CASES[name]
    refused(build(tmp_path, tiny_model_dir), needles, tmp_path, monkeypatch, capsys)


# --------------------------------------------------------------------------- names, budget, pick


def test_several_types_get_one_file_each_named_from_out(tmp_path):
    types = parse_types("q4_k_m, Q8_0 ,q6-k")
    assert [t.name for t in types] == ["q4_k_m", "q8_0", "q6_k"]
    paths = output_paths(tmp_path / "model.gguf", types)
    assert {k: p.name for k, p in paths.items()} == {"q4_k_m": "model.q4_k_m.gguf", "q8_0": "model.q8_0.gguf", "q6_k": "model.q6_k.gguf"}
    assert output_paths(tmp_path / "model.gguf", parse_types("q8_0")) == {"q8_0": tmp_path / "model.gguf"}
    assert quant_report.report_paths(tmp_path / "model.gguf") == (tmp_path / "model.report.json", tmp_path / "model.report.png")


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("0.05", 0.05), ("0", 0.0), ("12.5%", 0.125), (" 1 ", 1.0), ("150%", 1.5)])
def test_budget_reads_percent_or_fraction(text, value):
    assert quant_report.parse_budget(text) == pytest.approx(value)


def test_no_report_options_means_no_request_and_the_default_budget_is_five_percent():
    assert quant_report.request_from_options(False, None, None) is None
    assert quant_report.request_from_options(True, None, None) == quant_report.Request(None, 0.05)


def _row(name: str, size: int, ppl: float | None, base: float = 10.0, budget: float = 0.05) -> dict:
    return {"type": name, "bytes": size, "perplexity": ppl, "within_budget": ppl is not None and ppl <= base * (1 + budget)}


def test_pick_is_the_smallest_within_budget():
    rows = [_row("q8_0", 800, 10.1), _row("q6_k", 600, 10.3), _row("q4_k_m", 450, 10.6), _row("q2_k", 300, 13.0)]
    assert quant_report.pick(rows) == "q6_k"  # q4_k_m's 10.6 is over the 10.5 limit
    rows[2] = _row("q4_k_m", 450, 10.5)  # exactly at the limit counts
    assert rows[2]["within_budget"]
    assert quant_report.pick(rows) == "q4_k_m"
    assert quant_report.pick([_row("q2_k", 300, 13.0), _row("bad", 200, None)]) is None


def _report(tmp_path: Path, pick: str | None = "q6_k") -> dict:
    source = {"type": "f16", "file": "s", "bytes": 16 << 20, "bits_per_weight": 16.1, "eval_loss": 2.3, "perplexity": 10.0,
              "eval_tokens": 50, "mean_kl": 0.0, "max_kl": 0.0, "top1_agreement": 1.0, "tokens_per_s": 20.0, "prompt_tokens_per_s": 90.0}
    rows = []
    for name, mib, ppl in (("q8_0", 8.5, 10.05), ("q6_k", 6.6, 10.2), ("q4_k_m", 4.9, 11.0)):
        rows.append(source | {"type": name, "file": str(tmp_path / f"m.{name}.gguf"), "bytes": int(mib * 2**20), "perplexity": ppl,
                              "perplexity_change": ppl / 10 - 1, "mean_kl": 0.01, "top1_agreement": 0.95, "within_budget": ppl <= 10.5})
    return {"kind": quant_report.REPORT_KIND, "model": "demo", "data": {"source": "rows.jsonl", "samples": 4, "answer_tokens": 50},
            "parameters": 8 << 20, "source": source, "types": rows, "budget": {"ppl_budget": 0.05, "max_perplexity": 10.5},
            "pick": pick, "speed": {"threads": 1, "prompt_tokens": 30, "new_tokens": 64, "sampling": "greedy"}}


def test_table_marks_the_pick_and_names_the_budget(tmp_path):
    text = quant_report.render(_report(tmp_path))
    assert "f16 source" in text and "<- pick" in text and "over budget" in text
    assert "pick: q6_k, the smallest file within +5.0% of the f16 source's perplexity" in text
    assert "1 thread," in text
    none = quant_report.render(_report(tmp_path, pick=None) | {"types": [r | {"within_budget": False} for r in _report(tmp_path)["types"]]})
    assert "no type is within +5.0%" in none and "the closest is q8_0" in none


def test_report_files_are_written_whole_and_replaced_only_when_ours(tmp_path):
    json_path, png_path = quant_report.check_paths(tmp_path / "m.gguf", overwrite=False)
    quant_report.write(_report(tmp_path), json_path, png_path)
    saved = json.loads(json_path.read_text())
    assert saved["kind"] == quant_report.REPORT_KIND and saved["chart"] == "m.report.png" and saved["pick"] == "q6_k"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.report.json", "m.report.png"], "no partial files left"
    with pytest.raises(FtuneError, match="already exists"):
        quant_report.check_paths(tmp_path / "m.gguf", overwrite=False)
    assert quant_report.check_paths(tmp_path / "m.gguf", overwrite=True) == (json_path, png_path)  # ours: replaceable
    json_path.write_text('{"a user\'s": "notes"}')
    with pytest.raises(FtuneError, match="not written by"):
        quant_report.check_paths(tmp_path / "m.gguf", overwrite=True)


def test_a_failed_chart_leaves_no_file(tmp_path, monkeypatch):
    import matplotlib.figure

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError):
        quant_report.write(_report(tmp_path), tmp_path / "m.report.json", tmp_path / "m.report.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the demo model, three types


DEMO_TYPES = ("q8_0", "q6_k", "q4_k_m")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> dict:
    """demo -> q8_0, q6_k, q4_k_m in one command, with the report on four short rows."""
    root = tmp_path_factory.mktemp("demo-report")
    write_jsonl(root / "rows.jsonl", ROWS)
    out = root / "out" / "demo.gguf"
    result = run_cli("export-gguf", "demo", "--out", str(out), "--type", ",".join(DEMO_TYPES), "--report", "--data", str(root / "rows.jsonl"))
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "output": result.output, "report": json.loads((root / "out" / "demo.report.json").read_text())}


@pytest.mark.slow
def test_demo_report_writes_a_proven_file_per_type_and_the_report(demo_report):
    directory = demo_report["out"].parent
    for name in DEMO_TYPES:
        parity = json.loads((directory / f"demo.{name}.gguf.parity.json").read_text())
        assert parity["passed"] and parity["type"] == name
        assert (directory / f"demo.{name}.gguf").is_file()
    assert not (directory / "demo.gguf").exists(), "with several types, --out only names them"
    assert (directory / "demo.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(directory.glob(".*")), "no work files left behind (the lossless source included)"
    report = demo_report["report"]
    assert report["kind"] == quant_report.REPORT_KIND and report["chart"] == "demo.report.png"
    assert [r["type"] for r in report["types"]] == list(DEMO_TYPES)
    assert "<- pick" in demo_report["output"] and "which quantization to ship" in demo_report["output"]


@pytest.mark.slow
def test_demo_report_sizes_and_bits_follow_the_types(demo_report):
    report = demo_report["report"]
    rows = {r["type"]: r for r in report["types"]}
    sizes = [report["source"]["bytes"], *(rows[t]["bytes"] for t in DEMO_TYPES)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert 134e6 < report["parameters"] < 136e6  # SmolLM2-135M, its tied embedding stored once
    for row in rows.values():
        assert row["bytes"] == Path(row["file"]).stat().st_size
    for row in [report["source"], *rows.values()]:
        assert row["bits_per_weight"] == pytest.approx(row["bytes"] * 8 / report["parameters"])
    assert 4 < rows["q4_k_m"]["bits_per_weight"] < rows["q6_k"]["bits_per_weight"] < rows["q8_0"]["bits_per_weight"] < 10


@pytest.mark.slow
def test_demo_report_quality_measures_are_sane(demo_report):
    report = demo_report["report"]
    rows = {r["type"]: r for r in report["types"]}
    source_ppl = report["source"]["perplexity"]
    assert report["data"]["samples"] == len(ROWS) and report["data"]["answer_tokens"] > 20
    for row in [report["source"], *rows.values()]:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert row["eval_tokens"] == report["data"]["answer_tokens"]
        assert row["tokens_per_s"] > 0 and row["prompt_tokens_per_s"] > 0
    assert abs(rows["q8_0"]["perplexity"] / source_ppl - 1) < 0.03, "q8_0 stays close to the lossless source"
    for row in rows.values():
        assert row["mean_kl"] >= 0 and row["max_kl"] >= row["mean_kl"]
        assert 0 <= row["top1_agreement"] <= 1
        assert row["positions"] == report["data"]["answer_tokens"]
        assert row["perplexity_change"] == pytest.approx(row["perplexity"] / source_ppl - 1)
    # Fewer bits, further from the source: q4_k_m diverges most (KL is the stable measure on few tokens).
    assert rows["q8_0"]["mean_kl"] < rows["q4_k_m"]["mean_kl"] and rows["q6_k"]["mean_kl"] < rows["q4_k_m"]["mean_kl"]
    assert rows["q8_0"]["top1_agreement"] > 0.8


@pytest.mark.slow
def test_demo_report_pick_respects_the_budget(demo_report):
    report = demo_report["report"]
    limit = report["source"]["perplexity"] * 1.05
    assert report["budget"] == {"ppl_budget": 0.05, "max_perplexity": pytest.approx(limit)}
    for row in report["types"]:
        assert row["within_budget"] == (row["perplexity"] <= limit)
    within = [r for r in report["types"] if r["within_budget"]]
    assert report["pick"] == (min(within, key=lambda r: r["bytes"])["type"] if within else None)


@pytest.mark.slow
def test_demo_report_perplexity_equals_ftune_eval_on_the_same_file(demo_report):
    root = demo_report["root"]
    rows = {r["type"]: r for r in demo_report["report"]["types"]}
    gguf = root / "out" / "demo.q4_k_m.gguf"
    result = run_cli("eval", "demo", str(gguf), "--data", str(root / "rows.jsonl"), "--out", str(root / "eval.json"))
    assert result.exit_code == 0, result.output
    scored = {m["model"]: m for m in json.loads((root / "eval.json").read_text())["models"]}[str(gguf)]
    assert scored["eval_tokens"] == rows["q4_k_m"]["eval_tokens"]
    assert scored["eval_perplexity"] == pytest.approx(rows["q4_k_m"]["perplexity"], rel=1e-6)
    assert scored["eval_loss"] == pytest.approx(rows["q4_k_m"]["eval_loss"], rel=1e-6)


# --------------------------------------------------------------------------- a fine-tuning run, on its own held-out split


@pytest.mark.slow
def test_run_report_uses_the_recipes_held_out_split_and_equals_ftune_eval(tmp_path, tiny_model_dir):
    from helpers import code_word_recipe

    from ftune.stages import sft

    run_dir = sft.run(code_word_recipe(tmp_path, tiny_model_dir))
    out = tmp_path / "exports" / "tiny.gguf"
    result = run_cli("export-gguf", str(run_dir), "--out", str(out), "--type", "q8_0", "--report", "--ppl-budget", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "exports" / "tiny.report.json").read_text())
    assert report["data"]["source"].endswith("(held-out split)")
    assert report["source"]["type"] == "f32" and [r["type"] for r in report["types"]] == ["q8_0"]
    row = report["types"][0]
    assert report["pick"] == ("q8_0" if row["perplexity"] <= report["source"]["perplexity"] else None)  # a zero budget
    result = run_cli("eval", str(run_dir), str(out), "--out", str(tmp_path / "eval.json"))
    assert result.exit_code == 0, result.output
    scored = {m["model"]: m for m in json.loads((tmp_path / "eval.json").read_text())["models"]}[str(out)]
    assert scored["eval_perplexity"] == pytest.approx(row["perplexity"], rel=1e-6)

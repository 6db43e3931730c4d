"""scripts/make_big_dataset.py and the data part of the benchmark report (scripts/bench_data_report.py, bench_report.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_data_report  # noqa: E402
import bench_report  # noqa: E402
import make_big_dataset  # noqa: E402


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small stand-in for ../shared/data/: alpaca rows (some with inputs, one with lines) and self-instruct tasks."""
    folder = tmp_path / "shared"
    folder.mkdir()
    rows = [{"instruction": f"Describe item {i}.", "input": f"Item {i} is red." if i % 3 == 0 else "",
             "output": f"Item {i} is a thing. It weighs {i} kg. People like it."} for i in range(30)]
    rows.append({"instruction": "List three fruits.", "input": "", "output": "1. Apple\n2. Pear\n3. Plum"})
    (folder / make_big_dataset.ALPACA).write_text(json.dumps(rows))
    tasks = [{"id": f"t{i}", "name": f"t{i}", "instruction": f"Solve task {i}.", "is_classification": False,
              "instances": [{"input": "", "output": f"The answer is {i}."}]} for i in range(5)]
    (folder / make_big_dataset.SELF_INSTRUCT).write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return folder


def generate(tmp_path: Path, source: Path, rows: int, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "make_big_dataset.py"), "--rows", str(rows), "--out", str(tmp_path / name),
                           "--source", str(source), *extra], capture_output=True, text=True)


def test_generator_is_deterministic_and_a_shorter_run_is_a_prefix(tmp_path, source):
    assert generate(tmp_path, source, 3000, "a.jsonl").returncode == 0
    assert generate(tmp_path, source, 3000, "b.jsonl").returncode == 0
    assert generate(tmp_path, source, 500, "c.jsonl").returncode == 0
    assert generate(tmp_path, source, 500, "d.jsonl", "--seed", "1").returncode == 0
    a, b = (tmp_path / "a.jsonl").read_bytes(), (tmp_path / "b.jsonl").read_bytes()
    assert a == b
    assert a.startswith((tmp_path / "c.jsonl").read_bytes())
    assert not a.startswith((tmp_path / "d.jsonl").read_bytes())
    rows = [json.loads(line) for line in a.decode().splitlines()]
    assert len(rows) == 3000
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in rows)
    # Variation: far more distinct rows than the 36 source rows, some exact repeats, multi-part rows, empty inputs.
    distinct = {json.dumps(r, sort_keys=True) for r in rows}
    assert 2000 < len(distinct) < 3000
    assert any(r["instruction"] == "Answer each of the following in turn." for r in rows)
    assert 0.2 < sum(not r["input"] for r in rows) / len(rows) < 0.9
    assert not list(tmp_path.glob("*.partial"))


def test_generator_without_the_shared_data_says_so_and_writes_nothing(tmp_path):
    done = generate(tmp_path, tmp_path / "missing", 10, "out.jsonl")
    assert done.returncode != 0
    assert "alpaca_2k.json" in done.stderr and "not found" in done.stderr and "--source" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_generator_does_not_replace_a_file_unless_asked(tmp_path, source):
    (tmp_path / "out.jsonl").write_text("mine\n")
    done = generate(tmp_path, source, 10, "out.jsonl")
    assert done.returncode != 0 and "--force" in done.stderr
    assert (tmp_path / "out.jsonl").read_text() == "mine\n"
    assert generate(tmp_path, source, 10, "out.jsonl", "--force").returncode == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 10


def _side(wall: float, rss: float, tokens: int) -> dict:
    return {"wall_s": wall, "cpu_s": wall * 1.5, "samples": tokens // 120, "peak_rss_mib": rss, "peak_pss_mib": rss * 0.8,
            "main_peak_rss_mib": rss, "processes": 3, "tokens": tokens, "packed_rows": tokens // 500, "truncated": 2, "dropped": 1}


def data_report() -> dict:
    prep = {}
    for rows, (f_wall, t_wall) in {100_000: (20.0, 50.0), 1_000_000: (210.0, 480.0)}.items():
        ftune, trl = _side(f_wall, 900, rows * 120), {**_side(t_wall, 2400, rows * 120), "phases_s": {"load": 1.0, "prepare": 40.0}}
        prep[str(rows)] = {"rows": rows, "runs": {"ftune": [ftune], "TRL": [trl]}, "medians": {"ftune": ftune, "TRL": trl}}
    training = {"small": 10_000, "large": 1_000_000, "steps": 3, "batch_size": 2, "ratio": 1.05,
                "medians": {k: {**_side(60.0, rss, 0), "inspect_s": 5.0} for k, rss in (("10000", 2000), ("1000000", 2100))}}
    report = {"command": "python scripts/bench_data.py", "settings": {"rows": [100_000, 1_000_000], "repeats": 1, "max_length": 512,
                                                                      "num_proc": 2, "ftune_num_proc_field": True, "threads": 1},
              "prep": prep, "training": training}
    report["summary"] = bench_data_report.summary(report)
    return report


def test_data_targets_are_judged_from_the_medians():
    report = data_report()
    summary = report["summary"]
    assert summary["100000"]["speedup"] == pytest.approx(2.5) and summary["100000"]["memory_ratio"] == pytest.approx(0.375)
    assert summary["scaling"]["time_ratio"] == pytest.approx(10.5) and summary["training_memory_ratio"] == 1.05
    rows = {t["target"]: t for t in bench_data_report.targets(report, bench_report.TARGETS)}
    assert rows["data preparation speed vs TRL SFTTrainer, 100,000 rows (2 processes each)"]["status"] == "met"
    assert rows["data preparation speed vs TRL SFTTrainer, 1,000,000 rows (2 processes each)"]["measured"] == "2.29x"
    assert rows["data preparation time, 1,000,000 rows / 100,000 rows"]["goal"] == "<= 11"
    assert rows["training peak RSS, 1,000,000 cached rows / 10,000"]["status"] == "met"
    report["prep"]["1000000"]["medians"]["ftune"]["wall_s"] = 300.0  # 15x the time for 10x the rows
    report["summary"] = bench_data_report.summary(report)
    rows = {t["target"]: t for t in bench_data_report.targets(report, bench_report.TARGETS)}
    assert rows["data preparation time, 1,000,000 rows / 100,000 rows"]["status"] == "missed"


def test_report_renders_data_and_grpo_parts_and_names_a_part_from_another_run(tmp_path):
    import bench

    base = {"command": "python scripts/bench.py --skip sft dpo rm grpo data merge export gpu", "started": "2026-11-30T00:00:00+00:00",
            "wall_s": 60.0, "machine": {"cpu": "cpu", "cores": 2, "cpu_flags": "avx2", "ram_gib": 24, "gpu": None},
            "load_before": [0.1, 0.1, 0.1], "load_after": [0.2, 0.2, 0.2], "threads": {"threads": 2, "why": "--threads"},
            "versions": {"trl": "1.16.0"}, "matmul_peak": {"tries": 8, "n": 2048, "threads": 2, "gflops": 100.0},
            "settings": {"repeats": 2}}
    (tmp_path / "data.json").write_text(json.dumps({**data_report(), "started": "2026-12-01T00:00:00+00:00"}))
    grpo = {"settings": {"steps": 3, "repeats": 1, "prompts": 4, "generations": 8, "length": 64},
            "summary": {"ftune": {"completions_per_s": 2.0, "peak_rss_mib": 1800}, "trl": {"completions_per_s": 1.0, "peak_rss_mib": 2700},
                        "speedup": 2.0, "memory_ratio": 0.67}}
    (tmp_path / "grpo.json").write_text(json.dumps(grpo))
    parser = bench.argparse.ArgumentParser()
    bench.add_part(base, f"data={tmp_path / 'data.json'}", parser)
    bench.add_part(base, f"grpo={tmp_path / 'grpo.json'}", parser)
    base["targets"] = bench_report.judge_targets(base)
    text = bench_report.render_markdown(base)
    assert "## GRPO: completions per second" in text and "| TRL defaults | 1.000 | 2.00x | 2,700 |" in text
    assert "## Data preparation: ftune against TRL" in text and "| 1,000,000 | TRL | 480.0 |" in text
    assert "From a separate run (`python scripts/bench_data.py`; 2026-12-01T00:00:00+00:00" in text
    assert "Ratio 1,000,000 / 10,000 rows: **1.05**" in text
    assert "| GRPO completions/s vs TRL GRPOTrainer defaults | >= 1.5x | 2.00x | **met** |" in text
    with pytest.raises(SystemExit):
        bench.add_part(base, "nonsense=x.json", parser)

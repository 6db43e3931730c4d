"""Recipes: strict validation, errors with line numbers and suggestions, overrides, schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftune.errors import RecipeError
from ftune.recipe import load_recipe, parse_recipe, schema_fields

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))

GOOD = """\
stage: sft
base_model:
  name: demo
data:
  train:
    - path: train.jsonl
output:
  dir: runs/x
"""


def errors_of(text: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", list(overrides))
    return str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.stage in ("sft", "dpo", "rm", "grpo")


def test_minimal_recipe_gets_documented_defaults():
    recipe = parse_recipe(GOOD, "r.yaml")
    assert recipe.adapter.method == "lora" and recipe.adapter.target_modules == "all-linear"
    assert recipe.data.packing is True and recipe.data.train_on == "assistant"
    with pytest.raises(Exception):
        recipe.training.learning_rate = 1.0  # frozen: stage code never changes the recipe


# (recipe text, substrings every one of which the message must contain)
MALFORMED = [
    pytest.param(GOOD.replace("  name: demo", "  nmae: demo"), ["line 3", "base_model.nmae", "did you mean 'name'"], id="typo-key"),
    pytest.param(GOOD + "trainig:\n  epochs: 2\n", ["line 9", "unknown key 'trainig'", "did you mean 'training'"], id="typo-section"),
    pytest.param(GOOD + "training:\n  lerning_rate: 1e-4\n", ["line 10", "training.lerning_rate", "did you mean 'learning_rate'"], id="typo-nested"),
    pytest.param(GOOD + "adapter:\n  lora_rnak: 8\n", ["line 10", "adapter.lora_rnak"], id="typo-axolotl-style"),
    pytest.param(GOOD.replace("stage: sft", "stage: stf"), ["line 1", "stage", "did you mean 'sft'"], id="bad-enum-stage"),
    pytest.param(GOOD + "training:\n  lr_scheduler: cosin\n", ["line 10", "training.lr_scheduler", "did you mean 'cosine'"], id="bad-enum-scheduler"),
    pytest.param(GOOD.replace("    - path: train.jsonl", "    - path: train.jsonl\n      format: alpacca"),
                 ["line 7", "data.train.0.format", "did you mean 'alpaca'"], id="bad-enum-format"),
    pytest.param(GOOD + "training:\n  batch_size: many\n", ["line 10", "training.batch_size", "valid integer"], id="wrong-type-int"),
    pytest.param(GOOD + "training:\n  learning_rate: -1\n", ["line 10", "training.learning_rate", "greater than 0"], id="out-of-range"),
    pytest.param(GOOD + "adapter:\n  r: 0\n", ["line 10", "adapter.r", "greater than or equal to 1"], id="zero-rank"),
    pytest.param(GOOD + "data_extra: 1\n", ["line 9", "unknown key 'data_extra'"], id="unknown-top-level"),
    pytest.param(GOOD.replace("output:\n  dir: runs/x\n", ""), ["output", "required key is missing"], id="missing-output"),
    pytest.param(GOOD.replace("base_model:\n  name: demo\n", "base_model: {}\n"), ["line 2", "base_model.name", "required"], id="missing-name"),
    pytest.param(GOOD.replace("  train:\n    - path: train.jsonl\n", "  train: []\n"), ["line 5", "data.train", "at least 1"], id="empty-train"),
    pytest.param(GOOD + "quantization:\n  load_in_4bit: true\nadapter:\n  method: none\n",
                 ["line 10", "quantization.load_in_4bit", "QLoRA needs an adapter"], id="qlora-without-adapter"),
    pytest.param(GOOD.replace("stage: sft", "stage: dpo"), ["preference", "needs a preference section"], id="dpo-without-preference"),
    pytest.param(GOOD + "preference:\n  beta: 0.1\n", ["line 9", "only applies to stage: dpo"], id="sft-with-preference"),
    pytest.param(GOOD.replace("stage: sft", "stage: dpo").replace("train.jsonl", "train.jsonl\n      format: alpaca") + "preference: {}\n",
                 ["data.train", "needs preference data, not alpaca"], id="dpo-with-sft-format"),
    pytest.param(GOOD + "quantization:\n  load_in_4bit: true\nadapter:\n  init: pissa\n", ["adapter.init", "4-bit"], id="pissa-on-4bit"),
    pytest.param(GOOD + "training: [1, 2\n", ["line 10", "invalid YAML"], id="invalid-yaml-flow"),
    pytest.param("stage: sft\n  base_model: demo\n", ["line 2", "invalid YAML"], id="invalid-yaml-indent"),
    pytest.param("- just\n- a list\n", ["a recipe is a mapping"], id="not-a-mapping"),
    pytest.param(GOOD + "training:\n  report_to: [tensorbord]\n", ["training.report_to.0", "did you mean 'tensorboard'"], id="bad-enum-in-list"),
]


@pytest.mark.parametrize(("text", "needles"), MALFORMED)
def test_malformed_recipe_names_key_and_line(text, needles):
    message = errors_of(text)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


def test_all_problems_reported_at_once():
    text = GOOD.replace("  name: demo", "  nmae: demo") + "training:\n  lerning_rate: 1\n  batch_size: x\n"
    message = errors_of(text)
    assert "3 problems" in message
    assert "line 3" in message and "line 10" in message and "line 11" in message


def test_overrides_are_validated_with_their_place():
    recipe = parse_recipe(GOOD, "r.yaml", ["training.learning_rate=1e-5", "data.train.0.samples=10", "adapter.target_modules=[q_proj, v_proj]"])
    assert recipe.training.learning_rate == 1e-5
    assert recipe.data.train[0].samples == 10
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    message = errors_of(GOOD, ["training.lerning_rate=1"])
    assert "--set training.lerning_rate=1" in message and "did you mean 'learning_rate'" in message
    assert "--set training.epochs=abc" in errors_of(GOOD, ["training.epochs=abc"])
    assert "expected key.path=value" in errors_of(GOOD, ["training.epochs"])


def test_schema_documents_every_field():
    rows = schema_fields()
    keys = {key for key, *_ in rows}
    assert {"stage", "adapter.r", "data.train[].format", "training.learning_rate", "quantization.double_quant"} <= keys
    assert all(doc for _key, _type, _default, doc in rows), "every field carries its own doc"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_validate_reports_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("  name: demo", "  nmae: demo"))
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "line 3, column 3" in result.stderr and "did you mean 'name'" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such recipe file" in missing.stderr


def test_cli_schema_json_is_a_json_schema():
    result = run_cli("schema", "--json")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "stage" in schema["properties"] and schema["additionalProperties"] is False


def test_help_and_validate_do_not_import_torch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ftune.cli import app\n"
        f"for args in (['--help'], ['validate', {str(recipe)!r}], ['sft', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

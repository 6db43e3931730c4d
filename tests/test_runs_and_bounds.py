"""Runs read back by every command that reads one (issue 23, classes 7 and 3), lm-eval include folders
(class 10), recipe values that would allocate gigabytes (class 11), and removing a key with --set
(class 12), all through the real entry point.

A run of the wrong kind (a reward model continued as a policy, a policy used as a reward model, a
merged model or a curated-data folder where a run goes) and a damaged run (run.json truncated, not
JSON, of the wrong types, from a newer ftune, another user's; its adapter gone, its config corrupt,
its weights missing or not safetensors) are refused with the file named, the disk unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PAIRS, assert_refused, invoke, refused, snapshot, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [{"prompt": f"What is {i} plus {i}?", "answer": 2 * i} for i in range(6)]
REWARD_CODE = "def digits(prompts, completions, **kw):\n    return [float(any(c.isdigit() for c in x)) for x in completions]\n"


# --------------------------------------------------------------------------- two real runs, once per module


@pytest.fixture(scope="module")
def runs(tiny_sft_run, rm_run) -> dict[str, Path]:
    """A tiny finished SFT run and a tiny finished reward-model run (tests/conftest.py: trained once per session)."""
    return {"sft": tiny_sft_run, "rm": rm_run}


def copy_run(run: Path, tmp: Path, name: str = "the-run") -> Path:
    target = tmp / name
    shutil.copytree(run, target)
    return target


# --------------------------------------------------------------------------- the commands that read a run


def _stage_recipe(tmp: Path, model: Path, stage: str, section: str) -> list[str]:
    write_jsonl(tmp / "pairs.jsonl", PAIRS)
    write_jsonl(tmp / "prompts.jsonl", PROMPTS)
    (tmp / "rewards.py").write_text(REWARD_CODE)
    data = "prompts.jsonl" if stage == "grpo" else "pairs.jsonl"
    extra = "rewards: [{type: function, function: rewards.py:digits}]\n" if stage == "grpo" and "rewards" not in section else ""
    (tmp / "recipe.yaml").write_text(f"stage: {stage}\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: {data}}}]\n"
                                     f"  eval_fraction: 0.25\n  max_length: 64\n{section}{extra}"
                                     "training: {max_steps: 1, batch_size: 2}\noutput: {dir: out-run}\n")
    return [stage, str(tmp / "recipe.yaml")]


CONSUMERS = {  # command -> argv that reads `run`, built in `tmp`
    "dpo-init_from": lambda tmp, model, run: _stage_recipe(tmp, model, "dpo", f"preference: {{method: dpo, init_from: '{run}'}}\n"),
    "rm-init_from": lambda tmp, model, run: _stage_recipe(tmp, model, "rm", f"rm: {{init_from: '{run}'}}\n"),
    "grpo-init_from": lambda tmp, model, run: _stage_recipe(
        tmp, model, "grpo", f"grpo: {{init_from: '{run}', num_generations: 2, max_completion_length: 4}}\n"),
    "inspect-grpo-init_from": lambda tmp, model, run: ["inspect", _stage_recipe(
        tmp, model, "grpo", f"grpo: {{init_from: '{run}', num_generations: 2, max_completion_length: 4}}\n")[1]],
    "grpo-reward_model": lambda tmp, model, run: _stage_recipe(
        tmp, model, "grpo", f"grpo: {{num_generations: 2, max_completion_length: 4}}\nrewards: [{{type: reward_model, run: '{run}'}}]\n"),
    "merge": lambda tmp, model, run: ["merge", str(run), "--out", str(tmp / "merged")],
    "chat": lambda tmp, model, run: ["chat", str(run), "--prompt", "Hi."],
    "eval": lambda tmp, model, run: ["eval", str(run), "--prompt", "Hi."],
    "eval-rm": lambda tmp, model, run: ["eval", str(run), "--data", str(_pairs(tmp))],
    "label": lambda tmp, model, run: ["label", str(run), "--prompts", str(_prompts(tmp)), "--out", str(tmp / "labels"), "--generate-only"],
    "export-gguf": lambda tmp, model, run: ["export-gguf", str(run), "--out", str(tmp / "model.gguf")],
    "score": lambda tmp, model, run: ["score", str(run), "--data", str(_pairs(tmp)), "--out", str(tmp / "scored.jsonl")],
}
POLICY_READERS = ["dpo-init_from", "rm-init_from", "grpo-init_from", "inspect-grpo-init_from", "merge", "chat", "eval", "label",
                  "export-gguf"]
RM_READERS = ["grpo-reward_model", "score", "merge", "eval-rm"]
INIT_FROM = ["dpo-init_from", "rm-init_from", "grpo-init_from"]


def _prompts(tmp: Path) -> Path:
    (tmp / "prompts.txt").write_text("Hi.\nHello.\n")
    return tmp / "prompts.txt"


def _pairs(tmp: Path) -> Path:
    write_jsonl(tmp / "score-pairs.jsonl", PAIRS[:2])
    return tmp / "score-pairs.jsonl"


# --------------------------------------------------------------------------- class 7: a run of the wrong kind


WRONG_KIND = [
    *[(consumer, "rm", ["a reward-model run (ftune rm)", "needs a policy run from ftune sft, dpo or grpo"])
      for consumer in ("dpo-init_from", "rm-init_from", "grpo-init_from", "inspect-grpo-init_from", "chat", "label")],
    ("export-gguf", "rm", ["reward-model run", "llama.cpp does not run a reward model's score head"]),
    ("grpo-reward_model", "sft", ["rewards[0]", "a supervised fine-tuning run (ftune sft)", "needs a reward-model run from ftune rm"]),
    ("score", "sft", ["a supervised fine-tuning run (ftune sft)", "needs a reward-model run from ftune rm"]),
]


@pytest.mark.parametrize("consumer,kind,needles", WRONG_KIND, ids=[f"{k}-run-as-{c}" for c, k, _ in WRONG_KIND])
def test_a_run_of_the_wrong_kind_is_refused_naming_what_was_expected(consumer, kind, needles, runs, tiny_model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    run = copy_run(runs[kind], tmp_path)
    argv = CONSUMERS[consumer](tmp_path, tiny_model_dir, run)
    refused(argv, [str(run), *needles], tmp_path, monkeypatch, capsys)


def merged_model(tmp: Path, model: Path) -> Path:
    target = tmp / "merged-model"
    shutil.copytree(model, target)
    (target / "merge.json").write_text(json.dumps({"stage": "merge", "ftune_version": "0.1.0"}))
    return target


def curated_folder(tmp: Path, model: Path) -> Path:
    """A real `ftune data` output."""
    work = tmp / "curate"
    work.mkdir()
    write_jsonl(work / "data.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(4)])
    (work / "recipe.yaml").write_text(f"stage: sft\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: data.jsonl}}]\n"
                                      "output: {dir: run}\n")
    out = tmp / "curated"
    assert subprocess.run([sys.executable, "-m", "ftune", "data", str(work / "recipe.yaml"), "--out", str(out), "--exact"],
                          capture_output=True, text=True).returncode == 0
    return out


NOT_RUNS = {"merged-model": (merged_model, ["is not an ftune run directory", "a merged model (ftune merge)"]),
            "curated-data": (curated_folder, ["is not an ftune run directory (no run.json): it is a curated-data folder"])}


@pytest.mark.parametrize("consumer", INIT_FROM)
@pytest.mark.parametrize("what", list(NOT_RUNS))
def test_a_folder_that_is_no_run_is_refused_where_a_run_goes(what, consumer, tiny_model_dir, tmp_path, monkeypatch, capsys):
    build, needles = NOT_RUNS[what]
    folder = build(tmp_path, tiny_model_dir)
    argv = CONSUMERS[consumer](tmp_path, tiny_model_dir, folder)
    refused(argv, [str(folder), *needles], tmp_path, monkeypatch, capsys)


def test_a_run_of_another_base_model_is_refused_as_init_from(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["sft"], tmp_path)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "base_model": {**meta["base_model"], "name": "demo"}}))
    for consumer in INIT_FROM:
        argv = CONSUMERS[consumer](tmp_path, tiny_model_dir, run)
        refused(argv, [consumer.replace("-init_from", ".init_from").replace("dpo.", "preference."), "was trained on 'demo'"],
                tmp_path, monkeypatch, capsys)


def test_a_policy_run_still_continues_and_a_reward_model_still_merges(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The checks refuse only the wrong kind: an SFT run is a valid grpo.init_from (inspect reads it), an rm run merges."""
    code, output = invoke(CONSUMERS["inspect-grpo-init_from"](tmp_path, tiny_model_dir, runs["sft"]), monkeypatch, capsys)
    assert code == 0, output
    code, output = invoke(["merge", str(runs["rm"]), "--out", str(tmp_path / "merged-rm")], monkeypatch, capsys)
    assert code == 0, output
    assert (tmp_path / "merged-rm" / "config.json").is_file()


# --------------------------------------------------------------------------- class 3: a damaged run


def _edit_meta(change):
    def damage(run: Path) -> None:
        meta = json.loads((run / "run.json").read_text())
        change(meta)
        (run / "run.json").write_text(json.dumps(meta))
    return damage


def _truncate(file: str):
    def damage(run: Path) -> None:
        data = (run / file).read_bytes()
        (run / file).write_bytes(data[: len(data) // 2])
    return damage


DAMAGE = {
    "run-json-truncated": (_truncate("run.json"), ["run.json", "invalid JSON", "damaged"]),
    "run-json-binary": (lambda run: (run / "run.json").write_bytes(b"\x00\xff\xfe binary \x80"), ["run.json"]),
    "run-json-a-list": (lambda run: (run / "run.json").write_text("[1, 2]"), ["run.json", "is an object", "not list"]),
    "run-json-nested": (lambda run: (run / "run.json").write_text("[" * 5000 + "]" * 5000), ["run.json", "nested too deeply"]),
    "stage-wrong-type": (_edit_meta(lambda m: m.update(stage=5)), ["run.json", "stage is 5, not a string"]),
    "stage-unknown": (_edit_meta(lambda m: m.update(stage="pretrain")), ["run.json", "stage 'pretrain' is not one of ftune's"]),
    "status-wrong-type": (_edit_meta(lambda m: m.update(status=["completed"])), ["run.json", "status is ['completed']"]),
    "step-wrong-type": (_edit_meta(lambda m: m.update(global_step="12")), ["run.json", "global_step is '12'"]),
    "base-model-a-string": (_edit_meta(lambda m: m.update(base_model="demo")), ["run.json", "base_model.name is missing"]),
    "no-ftune-version": (_edit_meta(lambda m: m.pop("ftune_version")), ["run.json", "ftune_version is missing"]),
    "newer-ftune": (_edit_meta(lambda m: m.update(ftune_version="99.0.0")), ["run.json", "written by ftune 99.0.0, newer than"]),
    "adapter-gone": (lambda run: shutil.rmtree(run / "adapter"), ["adapter folder", "is missing"]),
    "adapter-config-corrupt": (_truncate("adapter/adapter_config.json"), ["adapter_config.json", "JSON"]),
    "adapter-config-a-list": (lambda run: (run / "adapter" / "adapter_config.json").write_text("[]"),
                              ["adapter_config.json", "expected a JSON object, not list"]),
    "weights-missing": (lambda run: (run / "adapter" / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors", "pickle"]),
    "weights-pickle": (lambda run: ((run / "adapter" / "adapter_model.safetensors").rename(run / "adapter" / "adapter_model.bin")),
                       ["adapter_model.bin", "pickle"]),
    "weights-not-safetensors": (lambda run: (run / "adapter" / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 not a tensor file"),
                                ["adapter_model.safetensors", "not a readable safetensors file"]),
    # The header is whole, the tensors are not: safetensors' own error names no file.
    "weights-cut-short": (_truncate("adapter/adapter_model.safetensors"), ["adapter_model.safetensors", "not a readable safetensors file"]),
}
# Each policy reader gets every damage; the reward-model readers too, on a damaged rm run.
DAMAGED = [(consumer, "sft", damage) for consumer in POLICY_READERS for damage in DAMAGE] + \
          [(consumer, "rm", damage) for consumer in RM_READERS for damage in DAMAGE]


@pytest.mark.parametrize("consumer,kind,damage", DAMAGED, ids=[f"{c}-{k}-{d}" for c, k, d in DAMAGED])
def test_a_damaged_run_is_refused_with_the_file_named(consumer, kind, damage, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = copy_run(runs[kind], tmp_path)
    spoil, needles = DAMAGE[damage]
    spoil(run)
    argv = CONSUMERS[consumer](tmp_path, tiny_model_dir, run)
    refused(argv, [str(run), *needles], tmp_path, monkeypatch, capsys)


def _cut(file: str, keep=lambda n: n // 2):
    def damage(model: Path) -> None:
        data = (model / file).read_bytes()
        (model / file).write_bytes(data[: keep(len(data))])
    return damage


MODEL_DAMAGE = {  # a merged model (or any model folder) damaged on disk: named before transformers reads it
    "config-cut-short": (_cut("config.json", lambda n: 40), ["config.json", "not valid JSON"]),
    "weights-cut-in-the-header": (_cut("model.safetensors", lambda n: 5000), ["model.safetensors", "not a readable safetensors file"]),
    "weights-cut-in-the-tensors": (_cut("model.safetensors"), ["model.safetensors", "cut short"]),
}
MODEL_READERS = {
    "chat": lambda t, m: ["chat", m, "--prompt", "hi", "--max-new-tokens", "2"],
    "eval": lambda t, m: ["eval", m, "--data", t / "data.jsonl"],
    "label": lambda t, m: ["label", m, "--prompts", t / "prompts.txt", "--out", t / "session", "--n", "2", "--generate-only"],
    "export-gguf": lambda t, m: ["export-gguf", m, "--out", t / "m.gguf", "--type", "f16"],
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
@pytest.mark.parametrize("reader", list(MODEL_READERS))
def test_a_damaged_model_folder_is_refused_with_the_file_named(reader, damage, tiny_model_dir, tmp_path, monkeypatch, capsys):
    model = merged_model(tmp_path, tiny_model_dir)
    spoil, needles = MODEL_DAMAGE[damage]
    spoil(model)
    write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Say 1.", "output": "1"}])
    (tmp_path / "prompts.txt").write_text("hi\n")
    refused(MODEL_READERS[reader](tmp_path, model), [str(model), *needles], tmp_path, monkeypatch, capsys)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="making a file another user's needs root")
@pytest.mark.parametrize("consumer", ["grpo-init_from", "merge", "chat", "export-gguf"])
def test_a_run_of_another_user_is_refused(consumer, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["sft"], tmp_path)
    os.chown(run / "run.json", 4321, 4321)
    argv = CONSUMERS[consumer](tmp_path, tiny_model_dir, run)
    refused(argv, [str(run / "run.json"), "owned by another user (uid 4321)", "cp -r"], tmp_path, monkeypatch, capsys)


# --------------------------------------------------------------------------- class 10: lm-eval include folders

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs ftune[lm-eval]")
GOOD_TASK = ("task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: docs.jsonl}\ntest_split: test\n"
             "output_type: multiple_choice\nprocess_docs: !function utils.process_docs\ndoc_to_text: \"{{question}}\"\n"
             "doc_to_choice: \"{{choices}}\"\ndoc_to_target: 0\n")


def _include(tmp: Path, files: dict[str, str]) -> Path:
    folder = tmp / "tasks"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


INCLUDES = {
    "bad-indentation": ({"good.yaml": GOOD_TASK, "sub/broken.yaml": "task: broken\n  dataset_path: json\n"},
                        ["sub/broken.yaml line 2", "invalid YAML"]),
    "unclosed-quote": ({"good.yaml": GOOD_TASK, "broken.yaml": "task: \"broken\ndataset_path: json\n"}, ["broken.yaml line", "invalid YAML"]),
    "a-list": ({"good.yaml": GOOD_TASK, "list.yaml": "- task: x\n"}, ["list.yaml line 1", "is a mapping", "not list"]),
    "not-utf8": ({"good.yaml": GOOD_TASK}, ["latin.yaml", "not UTF-8"]),
    "missing-include": ({"good.yaml": GOOD_TASK, "child.yaml": "include: _template.yaml\ntask: child\n"},
                        ["child.yaml", "include: _template.yaml does not exist"]),
    "empty-folder": ({}, ["holds no task YAML files"]),
}


@needs_lm_eval
@pytest.mark.parametrize("case", list(INCLUDES))
def test_a_broken_task_yaml_in_an_include_folder_is_named(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    files, needles = INCLUDES[case]
    folder = _include(tmp_path, files)
    if case == "not-utf8":
        (folder / "latin.yaml").write_bytes("task: caf\xe9\n".encode("latin-1"))
    refused(["eval", str(tiny_model_dir), "--lm-eval-include", str(folder), "--lm-eval-tasks", "my_task"],
            [*needles], tmp_path, monkeypatch, capsys)


@needs_lm_eval
@pytest.mark.parametrize("case", ["missing", "a-file"])
def test_an_include_that_is_no_folder_is_named(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    target = tmp_path / "tasks"
    if case == "a-file":
        target.write_text(GOOD_TASK)
    needles = ["no such directory"] if case == "missing" else ["is a file, not a folder"]
    refused(["eval", str(tiny_model_dir), "--lm-eval-include", str(target), "--lm-eval-tasks", "my_task"],
            [f"--lm-eval-include {target}", *needles], tmp_path, monkeypatch, capsys)


@needs_lm_eval
def test_function_tags_are_read_and_never_run_by_the_check(tmp_path):
    from ftune.commands.lm_eval_tasks import check_include

    folder = _include(tmp_path, {"good.yaml": GOOD_TASK, "utils.py": "open(__file__ + '.ran', 'w')\ndef process_docs(d):\n    return d\n"})
    check_include(folder)  # no error: lm-eval's !function tag is valid
    assert not (folder / "utils.py.ran").exists(), "checking the YAML ran the task's Python"


# --------------------------------------------------------------------------- class 11: bounds that allocate gigabytes


def mixture_recipe(tmp: Path, model: Path, extra: str = "", training: str = "batch_size: 2") -> Path:
    write_jsonl(tmp / "a.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(6)])
    write_jsonl(tmp / "b.jsonl", [{"instruction": f"Name {i}.", "output": f"n{i}"} for i in range(4)])
    path = tmp / "recipe.yaml"
    path.write_text(f"stage: sft\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: a.jsonl, weight: 3}}, {{path: b.jsonl, weight: 1}}]\n"
                    f"  epoch_samples: {1 << 30}\n  replacement: true\n  max_length: 128\n{extra}training: {{{training}}}\noutput: {{dir: run}}\n")
    return path


@pytest.mark.parametrize("command", ["validate", "sft", "inspect"])
def test_an_epoch_too_large_to_hold_is_a_recipe_error_at_its_line(command, tiny_model_dir, tmp_path, monkeypatch, capsys):
    recipe = mixture_recipe(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    code, output = invoke([command, str(recipe)], monkeypatch, capsys)
    assert_refused(code, output, ["line 5", "data.epoch_samples", "1,073,741,824", "training.max_steps", "training.epochs"])
    assert code == 2 and snapshot(tmp_path) == before


def peak_rss_mib(argv: list[str], cwd: Path) -> tuple[int, str, float]:
    """(exit code, output, peak resident memory in MiB) of `ftune ARGV` in a child process of its own."""
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "print(p.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(p.stdout + p.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "ftune", *argv], capture_output=True, text=True,
                         cwd=cwd, timeout=600)
    code, rss, text = out.stdout.split("\n", 2)
    return int(code), text, int(rss) / 1024


@pytest.mark.parametrize("packing", [False, True])
def test_an_epoch_at_the_schema_maximum_is_cut_to_what_max_steps_use(packing, tiny_model_dir, tmp_path):
    recipe = mixture_recipe(tmp_path, tiny_model_dir, extra=f"  packing: {str(packing).lower()}\n",
                            training="batch_size: 2, max_steps: 3")
    code, output, peak = peak_rss_mib(["inspect", str(recipe), "--json"], tmp_path)
    assert code == 0, output
    assert peak < 1536, f"inspect peaked at {peak:.0f} MiB for a 10-row mixture"
    assert "3" in output


def test_a_clamped_epoch_keeps_the_mixtures_shares(tiny_model_dir, tmp_path):
    """The cut epoch is drawn by the same weights (3:1): training sees the mixture it asked for."""
    import numpy as np

    from ftune.data import mixture
    from ftune.recipe import load_recipe

    recipe = load_recipe(mixture_recipe(tmp_path, tiny_model_dir, training="batch_size: 2, max_steps: 10"))
    counts = mixture.plan(recipe.data, [6, 4], used=40)
    assert counts == [30, 10]
    chosen = mixture.draw(np.array([0] * 6 + [1] * 4), counts, replacement=True, seed=1, epoch=0)
    assert len(chosen) == 40 and mixture.shares(np.array([0] * 6 + [1] * 4), chosen, 2) == [0.75, 0.25]
    assert mixture.plan(recipe.data, [6, 4], used=None) == mixture.quotas([3, 1], 1 << 30), "uncut without a step limit"


def test_a_rank_above_the_models_hidden_size_is_refused_before_peft_allocates(tiny_model_dir, tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(4)])
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    (tmp_path / "recipe.yaml").write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: data.jsonl}}]\n"
                                          "  max_length: 128\nadapter: {r: 65536}\ntraining: {max_steps: 1, batch_size: 2}\noutput: {dir: run}\n")
    refused(["sft", str(tmp_path / "recipe.yaml")], ["adapter.r", "65536", f"hidden size ({hidden})"], tmp_path, monkeypatch, capsys)


# --------------------------------------------------------------------------- class 12: --set removes a key; problems counted


def lora_recipe(tmp: Path) -> Path:
    write_jsonl(tmp / "data.jsonl", [{"instruction": "Say 1.", "output": "1"}])
    path = tmp / "recipe.yaml"
    path.write_text("stage: sft\nbase_model: {name: demo}\ndata:\n  train: [{path: data.jsonl}]\n"
                    "adapter:\n  method: lora\n  r: 8\n  alpha: 16\noutput: {dir: run}\n")
    return path


@pytest.mark.parametrize("command", ["validate", "sft", "inspect", "data"])
def test_switching_method_names_the_keys_and_how_to_drop_them(command, tmp_path, monkeypatch, capsys):
    recipe = lora_recipe(tmp_path)
    output = refused([command, str(recipe), "--set", "adapter.method=ia3"], [], tmp_path, monkeypatch, capsys)
    assert "2 problems" in output, output
    assert "line 7, column 3: adapter.r: does not apply to method ia3" in output and "--set adapter.r=null" in output
    assert "line 8, column 3: adapter.alpha: does not apply to method ia3" in output and "--set adapter.alpha=null" in output


def test_null_on_the_command_line_drops_a_key_that_cannot_be_null(tmp_path, monkeypatch, capsys):
    from ftune.recipe import load_recipe

    recipe = lora_recipe(tmp_path)
    drop = ["--set", "adapter.method=ia3", "--set", "adapter.r=null", "--set", "adapter.alpha=null"]
    code, output = invoke(["validate", str(recipe), *drop], monkeypatch, capsys)
    assert code == 0, output
    assert load_recipe(recipe, [d for d in drop if d != "--set"]).adapter.method == "ia3"
    assert load_recipe(recipe, ["adapter.r=null"]).adapter.r == 16, "a dropped key takes its default"
    assert load_recipe(recipe, ["training.max_grad_norm=null"]).training.max_grad_norm is None, "null stays null where it is a value"
    assert load_recipe(recipe, ["data.train.0.samples=null"]).data.train[0].samples is None


@pytest.mark.parametrize("sets,count", [
    (["adapter.method=ia3"], 2),
    (["adapter.method=ia3", "training.batch_size=0"], 3),
    (["adapter.method=vera", "adapter.r=null"], 1),
    (["training.batch_size=0"], 1),
], ids=["two-cross-field", "cross-field-and-one-more", "one-cross-field", "one"])
def test_the_header_counts_problems_not_lines(sets, count, tmp_path, monkeypatch, capsys):
    recipe = lora_recipe(tmp_path)
    argv = ["validate", str(recipe)] + [x for s in sets for x in ("--set", s)]
    output = refused(argv, [], tmp_path, monkeypatch, capsys)
    header = next(line for line in output.splitlines() if line.startswith("error: "))
    assert header.endswith(f"{count} problem{'s' if count != 1 else ''}"), output
    problems = [line for line in output.splitlines() if line.startswith("  ") and not line.startswith("  hint")]
    assert len(problems) == count, output


def test_set_help_and_readme_say_how_to_remove_a_key(monkeypatch, capsys):
    code, output = invoke(["sft", "--help"], monkeypatch, capsys)
    assert code == 0 and "KEY=null" in " ".join(output.split())
    readme = (ROOT / "README.md").read_text()
    assert "--set adapter.method=ia3 --set adapter.r=null --set adapter.alpha=null" in readme


def test_new_tokens_beyond_the_models_positions_are_cut_to_its_context(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--max-new-tokens 10**12 is cut to the positions left after the prompt: no model continues past its context."""
    from transformers import AutoTokenizer

    model = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    code, output = invoke(["chat", str(model), "--prompt", "Hi.", "--max-new-tokens", str(10**12), "--temperature", "0", "--json"],
                          monkeypatch, capsys)
    assert code == 0, output
    answer = json.loads(next(line for line in output.splitlines() if line.startswith("{")))["answer"]
    tokens = len(AutoTokenizer.from_pretrained(model)(answer, add_special_tokens=False)["input_ids"])
    assert 64 < tokens <= 128, (tokens, answer)  # the random tiny model never stops by itself: the context cut it

"""`ftune merge` with the inputs users get wrong, through the real entry point, and the parity
pieces merge and GGUF export share.

Every refusal: a non-zero exit, one message naming the problem and the file or option, no
traceback, and every file that was there before byte-identical afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import invoke, snapshot
from peft_runs import PROMPTS, make_run

from ftune.errors import FtuneError


@pytest.fixture(scope="module")
def run_template(tmp_path_factory, tiny_model_dir) -> Path:
    """One run directory (LoRA on the tiny model), copied by each test that changes it."""
    return make_run(tmp_path_factory.mktemp("template"), tiny_model_dir)


@pytest.fixture
def run(tmp_path, run_template) -> Path:
    return Path(shutil.copytree(run_template, tmp_path / "run", symlinks=True))


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv: list[str], root: Path, monkeypatch, capsys, needles: list[str]) -> str:
    """Run `ftune merge ...`; assert a clear refusal that left `root` exactly as it was."""
    before, files = snapshot(root), contents(root)
    code, output = invoke(["merge", *argv], monkeypatch, capsys)
    assert code not in (0, None), output
    assert "error: " in output and "Traceback" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert snapshot(root) == before and contents(root) == files, "a refused merge must leave the disk as it was"
    return output


# --- the output directory: only ftune's own is ever replaced ---------------------------------


def test_out_dot_is_refused_with_and_without_overwrite(tmp_path, run, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for extra in ([], ["--overwrite"]):
        refused([str(run), "--out", ".", "--no-verify", *extra], tmp_path, monkeypatch, capsys, [str(work), "--out"])


def test_a_user_directory_is_never_replaced(tmp_path, run, monkeypatch, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    output = refused([str(run), "--out", str(mine), "--no-verify", "--overwrite"], tmp_path, monkeypatch, capsys,
                     ["holds files ftune did not write", "thesis.tex", "--out"])
    assert "pass --overwrite" not in output  # never advice that would delete the user's files


def test_a_symlink_to_a_user_directory_is_judged_by_its_target(tmp_path, run, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(mine)
    refused([str(run), "--out", str(tmp_path / "link"), "--no-verify", "--overwrite"], tmp_path, monkeypatch, capsys,
            ["holds files ftune did not write"])


@pytest.mark.parametrize("where", ["the run", "the adapter", "the run's folder", "the base model"])
def test_the_inputs_of_the_merge_are_never_the_output(tmp_path, run, tiny_model_dir, where, monkeypatch, capsys):
    target = {"the run": run, "the adapter": run / "adapter", "the run's folder": tmp_path,
              "the base model": Path(tiny_model_dir)}[where]
    root = Path(tiny_model_dir) if where == "the base model" else tmp_path
    refused([str(run), "--out", str(target), "--no-verify", "--overwrite"], root, monkeypatch, capsys, [str(target.resolve()), "--out"])


def test_a_previous_merge_is_replaced_only_with_overwrite(tmp_path, run, monkeypatch, capsys):
    out = tmp_path / "merged"
    code, output = invoke(["merge", str(run), "--out", str(out), "--no-verify"], monkeypatch, capsys)
    assert code in (0, None), output
    first = contents(out)
    assert ".ftune-output.json" in first, "a merged model carries ftune's marker"
    refused([str(run), "--out", str(out), "--no-verify"], tmp_path, monkeypatch, capsys, ["already exists", "--overwrite"])
    code, output = invoke(["merge", str(run), "--out", str(out), "--dtype", "bf16", "--no-verify", "--overwrite"], monkeypatch, capsys)
    assert code in (0, None), output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "nothing set aside is left"


# --- remote code: the command line's choice, never run.json's --------------------------------


def remote_code_base(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A base whose config needs its own Python (unknown model_type, auto_map), and a file that
    code would create on import."""
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "remote-base"))
    sentinel = tmp_path / "code-ran"
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="ftune_test_remote", auto_map={"AutoConfig": "remote.Config", "AutoModelForCausalLM": "remote.Model"})
    (base / "config.json").write_text(json.dumps(config))
    (base / "remote.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    return base, sentinel


def test_run_json_never_turns_on_remote_code(tmp_path, run, tiny_model_dir, monkeypatch, capsys):
    base, sentinel = remote_code_base(tmp_path, tiny_model_dir)
    meta = json.loads((run / "run.json").read_text())
    meta["base_model"].update(path=str(base), name=str(base), trust_remote_code=True)
    (run / "run.json").write_text(json.dumps(meta))
    refused([str(run), "--out", str(tmp_path / "merged"), "--no-verify"], tmp_path, monkeypatch, capsys,
            ["needs the Python code shipped with it", "--trust-remote-code"])
    assert not sentinel.exists()


def test_trust_remote_code_comes_from_the_command_line(run, monkeypatch):
    from ftune.merge.source import read_source

    meta = json.loads((run / "run.json").read_text())
    meta["base_model"]["trust_remote_code"] = True
    (run / "run.json").write_text(json.dumps(meta))
    assert read_source(run, None).trust_remote_code is False
    assert read_source(run, None, trust_remote_code=True).trust_remote_code is True

    import ftune.merge.command as stage

    seen = {}

    def record(source, base, *, trust_remote_code):
        seen["trust"] = trust_remote_code
        raise FtuneError("stop here")

    monkeypatch.setattr(stage, "read_source", record)
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(run.parent / "m"), "--trust-remote-code"])
    assert result.exit_code == 1 and seen == {"trust": True}


# --- damaged inputs: the file is named -------------------------------------------------------


def damage_adapter_config(run: Path, content: str | bytes) -> Path:
    path = run / "adapter" / "adapter_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def edited_adapter_config(run: Path, **changes) -> str:
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config)


DAMAGED_ADAPTER_CONFIGS = {
    "invalid-json": ('{"peft_type": "LORA", "r": ', ["adapter_config.json", "unreadable JSON"]),
    "not-utf8": (b'{"peft_type": "LORA\xff"}', ["adapter_config.json", "invalid UTF-8"]),
    "a-list": ("[1, 2]", ["adapter_config.json", "expected a JSON object"]),
    "rank-zero": (lambda run: edited_adapter_config(run, r=0), ["adapter_config.json", "r must be a positive whole number"]),
    "rank-text": (lambda run: edited_adapter_config(run, r="4"), ["adapter_config.json", "r must be a positive whole number"]),
    "alpha-missing": (lambda run: edited_adapter_config(run, lora_alpha=None), ["adapter_config.json", "lora_alpha must be a positive number"]),
    "alpha-infinite": (lambda run: edited_adapter_config(run, lora_alpha=float("inf")), ["adapter_config.json", "lora_alpha"]),
    "rank-pattern": (lambda run: edited_adapter_config(run, rank_pattern=["q_proj"]), ["adapter_config.json", "rank_pattern"]),
    "not-lora": (lambda run: edited_adapter_config(run, peft_type="LOHA"), ["adapter_config.json", "this one is LOHA"]),
    "mislabelled": (lambda run: edited_adapter_config(run, peft_type="IA3"), ["adapter_model.safetensors", "says peft_type IA3", "LORA tensor"]),
}


@pytest.mark.parametrize("name", DAMAGED_ADAPTER_CONFIGS)
def test_damaged_adapter_config_is_named(name, tmp_path, run, monkeypatch, capsys):
    content, needles = DAMAGED_ADAPTER_CONFIGS[name]
    damage_adapter_config(run, content(run) if callable(content) else content)
    refused([str(run), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys, needles)


DAMAGED_RUN_FILES = {
    "invalid-json": (b'{"stage": "sft", ', ["run.json", "unreadable"]),
    "not-utf8": (b'{"stage": "sft\xff"}', ["run.json", "unreadable"]),
    "a-list": (b"[]", ["run.json", "base model"]),
    "no-base": (b'{"stage": "sft", "adapter": {"method": "lora"}}', ["run.json", "base_model.name"]),
    "bad-dtype": (None, ["run.json", "dtype is 'int3'"]),
    "bad-quantization": (None, ["run.json", "quantization.quant_type"]),
}


@pytest.mark.parametrize("name", DAMAGED_RUN_FILES)
def test_damaged_run_json_is_named(name, tmp_path, run, monkeypatch, capsys):
    content, needles = DAMAGED_RUN_FILES[name]
    if content is None:
        meta = json.loads((run / "run.json").read_text())
        if name == "bad-dtype":
            meta["dtype"] = "int3"
        else:
            meta["quantization"] = {"load_in_4bit": True, "quant_type": "nf5"}
        content = json.dumps(meta).encode()
    (run / "run.json").write_bytes(content)
    refused([str(run), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys, needles)


def test_a_missing_base_is_named_with_the_way_out(tmp_path, run, monkeypatch, capsys):
    adapter = run / "adapter"
    damage_adapter_config(run, edited_adapter_config(run, base_model_name_or_path=str(tmp_path / "gone")))
    refused([str(adapter), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys,
            [f"base model of {adapter}", "gone does not exist", "--base"])
    damage_adapter_config(run, edited_adapter_config(run, base_model_name_or_path=None))
    refused([str(adapter), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys,
            ["does not name its base model", "--base"])


def test_damaged_weights_are_named(tmp_path, run, tiny_model_dir, monkeypatch, capsys):
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    refused([str(run), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys,
            ["adapter_model.safetensors", "not a readable safetensors file"])

    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    (base / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    refused([str(run), "--out", str(tmp_path / "merged"), "--base", str(base)], tmp_path, monkeypatch, capsys,
            ["model.safetensors", "not a readable safetensors file"])

    (base / "model.safetensors").unlink()
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    refused([str(run), "--out", str(tmp_path / "merged"), "--base", str(base)], tmp_path, monkeypatch, capsys,
            ["model-00001-of-00002.safetensors does not exist"])


def test_a_training_checkpoint_says_what_to_merge_instead(tmp_path, run, monkeypatch, capsys):
    checkpoint = run / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    refused([str(checkpoint), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys,
            ["is a training checkpoint", "--resume"])


def test_damaged_eval_prompts_are_named_by_line(tmp_path, run, monkeypatch, capsys):
    with open(run / "eval_prompts.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"prompt": "no text field"}\n')
    refused([str(run), "--out", str(tmp_path / "merged")], tmp_path, monkeypatch, capsys,
            [f"eval_prompts.jsonl:{len(PROMPTS) + 1}", "'text'"])


# --- what merge and GGUF parity share ---------------------------------------------------------


def test_merge_and_gguf_share_one_tolerance_and_one_prompt_set():
    from ftune.gguf import quant_types, verify
    from ftune.merge import parity as merge_parity
    from ftune.modeling import compare

    assert quant_types.Tolerance is compare.Tolerance is merge_parity.Tolerance
    assert all(isinstance(t, compare.Tolerance) for t in merge_parity.TOLERANCES.values())
    assert verify.GREEDY_TOKENS == merge_parity.GREEDY_TOKENS == compare.GREEDY_TOKENS


def test_held_out_prompts_come_from_the_run_and_fall_back_to_built_in(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from ftune.modeling.compare import BUILTIN_QUESTIONS, held_out_prompts, prompt_texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    builtin = prompt_texts(tokenizer, None)
    assert len(builtin) == len(BUILTIN_QUESTIONS) and all(q in t for q, t in zip(BUILTIN_QUESTIONS, builtin))
    file = tmp_path / "eval_prompts.jsonl"
    # U+2028 is valid inside a JSON string: the file is split on newlines only.
    file.write_text(json.dumps({"text": "line\u2028separator " * 200}, ensure_ascii=False) + "\n\n" + json.dumps({"text": " "}) + "\n")
    (ids,) = held_out_prompts(tokenizer, file, max_tokens=32)
    assert len(ids) == 32 and tokenizer.decode(ids).endswith("separator ")  # the end kept: that is where an answer starts
    file.write_text(json.dumps({"text": ""}) + "\n")
    assert prompt_texts(tokenizer, file) == builtin


def test_gguf_parity_uses_the_held_out_prompts_of_the_run_a_merge_came_from(tmp_path, run):
    from ftune.gguf.verify import merged_run_prompts, reference_outputs
    from ftune.merge import merge_to_dir

    out = tmp_path / "merged"
    merge_to_dir(run, out, verify=False)
    assert merged_run_prompts(out) == (run / "eval_prompts.jsonl").resolve()
    reference = reference_outputs(out)
    assert len(reference.greedy) == len(PROMPTS) and len(reference.prompts) == len(PROMPTS) + 1
    assert merged_run_prompts(run) is None  # not a merged model


def test_safetensors_index_reader_reads_headers_only(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    from ftune.guards.weights import tensor_index

    index = tensor_index(Path(tiny_model_dir))
    with safe_open(Path(tiny_model_dir) / "model.safetensors", framework="pt") as handle:
        assert set(index) == set(handle.keys())
        for name in handle.keys():
            assert index[name].shape == tuple(handle.get_slice(name).get_shape())
            assert index[name].dtype == handle.get_slice(name).get_dtype()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FtuneError, match="has no safetensors weights"):
        tensor_index(empty)

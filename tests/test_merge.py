"""`ftune merge`: the merged model behaves like the adapter, for every adapter kind ftune trains.

Adapters are made with peft directly on the tiny model, with random non-zero lora_B (and DoRA
magnitudes, and modules_to_save copies) so that a merge that drops or mis-scales anything
changes the logits. Run directories are written the way `ftune sft` writes them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftune.errors import FtuneError
from ftune.merge import is_run_or_adapter, merge_to_dir
from ftune.merge.plan import plan_merge
from ftune.merge.source import read_source
from ftune.merge.writer import merged_tensor
from peft_runs import PROMPTS, make_run

ROOT = Path(__file__).resolve().parents[1]


def adapter_logits(run: Path, base: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run / "adapter").eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def plain_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def cli(*args: str):
    """In-process, so no second torch import; a user error ends in SystemExit, never an exception."""
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune", *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)


IDS = torch.tensor([[1, 520, 3012, 314, 253, 2214, 30, 198, 42, 1004]])


@pytest.mark.parametrize(
    "kind, options",
    [
        ("lora", {}),
        ("dora", {"method": "dora"}),
        # rsLoRA scaling, a LoRA on the tied embedding, and a trained copy of the tied head: the
        # merged model must write lm_head apart from embed_tokens to behave like the adapter.
        ("rslora-tied", {"rslora": True, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    ],
)
def test_merged_model_loads_in_plain_transformers_and_matches_the_adapter(tmp_path, tiny_model_dir, kind, options):
    run = make_run(tmp_path, tiny_model_dir, **options)
    out = tmp_path / "merged"
    report = merge_to_dir(run, out)

    assert report["passed"] and report["precision"] == "float32"
    assert report["prompt_count"] == len(PROMPTS) and report["greedy_matches"] == len(PROMPTS)
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "merge.json"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is (kind != "rslora-tied")

    merged = plain_logits(out, IDS)
    expected = adapter_logits(run, tiny_model_dir, IDS)
    base = plain_logits(tiny_model_dir, IDS)
    assert (expected - base).abs().max() > 0.1  # the adapter really changes the model
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_per_weight_math_equals_peft_merge_and_unload(tmp_path, tiny_model_dir, method):
    """rsLoRA with per-module rank and alpha; DoRA on Linear layers and on the embedding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    targets = "all-linear" if method == "lora" else ["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]
    run = make_run(
        tmp_path,
        tiny_model_dir,
        method=method,
        rslora=method == "lora",
        target_modules=targets,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    src = read_source(run, None)
    plan = plan_merge(src, rounded_base=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, run / "adapter").merge_and_unload().state_dict()

    assert len(plan.lora) == (14 if method == "lora" else 9)
    # merge_and_unload changes the shared tensor of a tied pair; ftune writes the head apart.
    assert plan.untied == ([] if method == "lora" else ["lm_head.weight"])
    for out_key, base_key in plan.outputs:
        if out_key not in plan.untied:
            torch.testing.assert_close(merged_tensor(plan, out_key, base_key).float(), reference[out_key], atol=1e-6, rtol=1e-5)


def test_qlora_merges_onto_the_base_it_was_trained_on(tmp_path, tiny_model_dir):
    """Default: every 4-bit layer rounded as in training, adapted or not; --onto original: full precision."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    # DoRA on q and v only: its norms need the rounded weight, and the MLP is rounded untouched.
    run = make_run(tmp_path, tiny_model_dir, method="dora", load_in_4bit=True, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    report = merge_to_dir(run, out)
    assert report["passed"] and "4-bit base" in report["reference"]
    assert report["max_abs_logit_diff"] < 1e-4

    key = "model.layers.0.mlp.down_proj.weight"
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as handle:
        original = handle.get_tensor(key)
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        merged = handle.get_tensor(key)
    packed, state = bnbf.quantize_4bit(original, blocksize=64, compress_statistics=True, quant_type="nf4")
    torch.testing.assert_close(merged, bnbf.dequantize_4bit(packed, state), atol=0, rtol=0)

    full = tmp_path / "merged-original"
    report = merge_to_dir(run, full, onto="original")
    assert report["passed"] and "full-precision base" in report["reference"]
    shift = report["shift_from_trained_4bit_model"]
    assert shift["max_abs_logit_diff"] > 10 * report["max_abs_logit_diff"]
    with safe_open(full / "model.safetensors", framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor(key), original, atol=0, rtol=0)
    assert json.loads((full / "merge.json").read_text())["onto"] == "original"


def test_sharded_base_merges_into_sharded_output(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="4MB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    run = make_run(tmp_path, sharded)

    out = tmp_path / "merged"
    report = merge_to_dir(run, out, max_shard_bytes=4 * 2**20)
    assert report["passed"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / name).is_file() for name in shards)
    assert not (out / "model.safetensors").exists()
    torch.testing.assert_close(plain_logits(out, IDS), adapter_logits(run, sharded, IDS), atol=1e-4, rtol=1e-4)


def test_bare_adapter_directory_finds_its_base(tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir)
    adapter = run / "adapter"
    assert is_run_or_adapter(run) and is_run_or_adapter(adapter) and not is_run_or_adapter(tmp_path)
    src = read_source(adapter, None)
    assert src.run_dir is None and Path(src.base_path) == tiny_model_dir.resolve()
    report = merge_to_dir(adapter, tmp_path / "merged", dtype="bf16")
    assert report["passed"] and report["precision"] == "bfloat16"
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_errors_are_clear_and_leave_nothing_behind(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run = make_run(tmp_path, tiny_model_dir)
    out = tmp_path / "merged"

    # An adapter trained on another model (a wider tiny Llama), through the real command line.
    other = tmp_path / "wider"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 96, 192
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    result = run_cli("merge", str(run), "--out", str(out), "--base", str(other))
    assert result.returncode == 1, result.stderr
    pattern = r"lora A has shape \(4, \d+\), which does not fit base weight model\.layers\.0\.\S+ of shape \(\d+, \d+\)"
    assert re.search(pattern, result.stderr) and "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged*"))

    # A target module the base does not have.
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    (shifted / "adapter_config.json").write_text((run / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}, shifted / "adapter_model.safetensors")
    result = cli("merge", str(shifted), "--out", str(out))
    assert result.exit_code == 1 and "base model has no weight model.layers.7." in result.output

    # A base that is gone (the run recorded a path that no longer exists).
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter").symlink_to(run / "adapter")
    meta = json.loads((run / "run.json").read_text())
    meta["base_model"].update(name="/nowhere/tiny", path="/nowhere/tiny")
    (moved / "run.json").write_text(json.dumps(meta))
    result = cli("merge", str(moved), "--out", str(out))
    assert result.exit_code == 1 and f"base model of {moved}" in result.output
    assert "/nowhere/tiny does not exist" in result.output and "--base" in result.output

    # Neither a run nor an adapter; an existing output; a bad --dtype.
    result = cli("merge", str(tmp_path), "--out", str(out))
    assert result.exit_code == 1 and "neither an ftune run directory" in result.output
    out.mkdir()
    result = cli("merge", str(run), "--out", str(out), "--no-verify")
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    result = cli("merge", str(run), "--out", str(tmp_path / "other"), "--dtype", "bf61")
    assert result.exit_code == 1 and "did you mean bf16" in result.output


def test_parity_failure_keeps_the_report_and_exits_3(tmp_path, tiny_model_dir, monkeypatch):
    from ftune.merge import parity as merge

    run = make_run(tmp_path, tiny_model_dir)
    impossible = merge.Tolerance(max_logit_diff=-1.0, top1_min=1.0, greedy_identical=True)
    monkeypatch.setitem(merge.TOLERANCES, "float32", impossible)
    out = tmp_path / "merged"
    result = cli("merge", str(run), "--out", str(out))
    assert result.exit_code == 3
    assert "does not behave like the adapter" in result.output and "FAIL" in result.output
    assert json.loads((out / "parity.json").read_text())["passed"] is False


def test_interrupted_merge_leaves_no_model_behind(tmp_path, tiny_model_dir, monkeypatch):
    from ftune.merge import writer as merge

    run = make_run(tmp_path, tiny_model_dir)
    real = merge.merged_tensor
    calls = []

    def interrupt_at_the_fifth_tensor(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(merge, "merged_tensor", interrupt_at_the_fifth_tensor)
    with pytest.raises(KeyboardInterrupt):
        merge_to_dir(run, tmp_path / "merged", verify=False)
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_finetune_run_has_nothing_to_merge(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"ftune_version": "0.1.0", "stage": "sft", "status": "completed",
                                              "base_model": {"name": "demo"}, "adapter": {"method": "none"}}))
    with pytest.raises(FtuneError, match="nothing to merge"):
        merge_to_dir(run, tmp_path / "out")


@pytest.mark.slow
def test_demo_model_lora_merge_passes_parity(tmp_path, demo_model_dir):
    run = make_run(tmp_path, demo_model_dir, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    report = merge_to_dir(run, tmp_path / "merged")
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-3

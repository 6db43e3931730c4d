"""`ftune export-gguf` through the CLI: outputs, atomic publishing, and every user error as one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftune.cli import app

pytest.importorskip("llama_cpp")


def export(*args: str):
    return CliRunner().invoke(app, ["export-gguf", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, demo_model_dir) -> Path:
    """A tiny GPT-2: an architecture ftune does not export."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gpt2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_export_writes_gguf_parity_report_and_modelfile(tiny_model_dir, tmp_path):
    out = tmp_path / "exports" / "tiny-f16.gguf"
    result = export(str(tiny_model_dir), "--out", str(out), "--type", "f16")
    assert result.exit_code == 0, result.output
    assert "PASS: f16 parity" in result.output
    report = json.loads(out.with_name("tiny-f16.gguf.parity.json").read_text())
    assert report["passed"] and report["type"] == "f16"
    assert report["tokenization"]["mismatches"] == [] and all(g["identical"] for g in report["greedy"])
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf" in modelfile
    assert not list(out.parent.glob(".*")), "no work files left behind"

    import gguf

    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    kinds = tensor_types(out)
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"  # vectors stay float32


def test_existing_output_is_an_error_unless_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    assert export(str(tiny_model_dir), "--out", str(out), "--type", "f16").exit_code == 0
    before = out.read_bytes()
    result = export(str(tiny_model_dir), "--out", str(out), "--type", "f16")
    assert result.exit_code == 1
    assert "already exists" in result.output and "--overwrite" in result.output  # an earlier ftune export
    assert "Traceback" not in result.output
    assert out.read_bytes() == before

    result = export(str(tiny_model_dir), "--out", str(out), "--type", "f16", "--overwrite", "--no-verify")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert not out.with_name("model.gguf.parity.json").exists()


def test_unsupported_architecture_names_the_supported_ones(gpt2_dir, tmp_path):
    result = export(str(gpt2_dir), "--out", str(tmp_path / "gpt2.gguf"), "--type", "f16", "--no-verify")
    assert result.exit_code == 1
    assert "GPT2LMHeadModel" in result.output and "not a supported architecture" in result.output
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM"):
        assert name in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "gpt2.gguf").exists()


def test_bad_type_name_suggests_the_closest(tiny_model_dir, tmp_path):
    result = export(str(tiny_model_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q4km")
    assert result.exit_code == 1
    assert "unknown GGUF type 'q4km'" in result.output and "did you mean 'q4_k_m'?" in result.output


def test_k_quant_without_llama_cpp_python_says_how_to_install(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    result = export(str(tiny_model_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q4_k_m", "--no-verify")
    assert result.exit_code == 1
    assert "--type q4_k_m needs llama-cpp-python" in result.output
    assert "pip install 'ftune[llamacpp]'" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_python_types_need_no_llama_cpp_python_without_verification(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    result = export(str(tiny_model_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q4_0", "--no-verify")
    assert result.exit_code == 0, result.output
    kinds = tensor_types(tmp_path / "x.gguf")
    assert kinds["blk.0.ffn_down.weight"] == "Q4_0" and kinds["blk.1.attn_v.weight"] == "Q4_0"
    assert kinds["token_embd.weight"] == "Q8_0"  # tied: it is also the output projection, kept at 8 bits
    result = export(str(tiny_model_dir), "--out", str(tmp_path / "y.gguf"), "--type", "f16")
    assert result.exit_code == 1 and "--no-verify" in result.output


def test_failed_parity_keeps_the_file_aside_and_fails(tiny_model_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from ftune.gguf import quant_types

    impossible = replace(quant_types.TYPES["f16"], tolerance=quant_types.Tolerance(top1_min=1.01, kl_max=0.0, greedy_identical=True))
    monkeypatch.setitem(quant_types.TYPES, "f16", impossible)
    out = tmp_path / "tiny.gguf"
    result = export(str(tiny_model_dir), "--out", str(out), "--type", "f16")
    assert result.exit_code == 1
    assert "does not behave like the source model" in result.output
    assert not out.exists()
    assert (tmp_path / "tiny.rejected.gguf").is_file()
    assert json.loads((tmp_path / "tiny.gguf.parity.json").read_text())["passed"] is False


def test_run_directory_is_merged_on_the_fly(tiny_model_dir, tmp_path):
    """A LoRA run exports as base + adapter: parity is checked against the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run / "adapter")
    run_info = {
        "ftune_version": "0.1.0",
        "stage": "sft",
        "status": "completed",
        "base_model": {"name": str(tiny_model_dir), "path": str(tiny_model_dir), "revision": None, "trust_remote_code": False},
        "adapter": {"method": "lora"},
        "quantization": {"load_in_4bit": False},
        "dtype": "float32",
    }
    (run / "run.json").write_text(json.dumps(run_info))

    out = tmp_path / "out" / "run.gguf"
    result = export(str(run), "--out", str(out), "--type", "f32")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("run.gguf.parity.json").read_text())
    assert report["passed"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "the temporary merge is gone"

    # The adapter changed the model: the GGUF differs from one of the plain base.
    base_out = tmp_path / "out" / "base.gguf"
    assert export(str(tiny_model_dir), "--out", str(base_out), "--type", "f32", "--no-verify").exit_code == 0
    assert out.read_bytes() != base_out.read_bytes()

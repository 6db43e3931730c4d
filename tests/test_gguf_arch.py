"""GGUF round trips for every supported architecture: a tiny random model, f32 and f16, in llama.cpp.

Each case converts a randomly initialised model of a few MB and checks, through llama.cpp
(llama-cpp-python), that tokenization is identical on the sample texts and chat turns, that
next-token distributions agree, and that greedy continuations are token-for-token identical.

Tokenizers are real ones:
- byte-level BPE: the demo model's (SmolLM2), and the same vocabulary with Llama 3's and
  Qwen2's pre-tokenizer regexes put in, so each llama.cpp pre-tokenizer name is exercised;
- SentencePiece: trained with the `sentencepiece` library on CORPUS (tests/gguf_tokenizers.py) (no tokenizer
  file ships in an installed package): Llama-2 / Mistral / Phi-3 style (space prefix, byte
  fallback) and Gemma style (no prefix, <start_of_turn> tokens). transformers converts them
  exactly as it converts the models' own tokenizer.model files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_tokenizers import byte_level_tokenizer, sentencepiece_tokenizer

from ftune.gguf.convert import convert
from ftune.gguf.quant_types import TYPES
from ftune.gguf.verify import render_report, verify_gguf

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp")


# --- tiny models ------------------------------------------------------------------------------


def build_model(out: Path, tokenizer_dir: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """conftest.build_tiny_model with per-architecture config keys (rope scaling, Gemma's head_dim)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(arch, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, demo_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "smollm": Path(demo_model_dir),
        "llama3": byte_level_tokenizer(root / "llama3", "llama3"),
        "qwen2": byte_level_tokenizer(root / "qwen2", "qwen2"),
        "spm-llama": sentencepiece_tokenizer(root / "spm-llama", "llama"),
        "spm-mistral": sentencepiece_tokenizer(root / "spm-mistral", "mistral"),
        "spm-phi3": sentencepiece_tokenizer(root / "spm-phi3", "phi3"),
        "spm-gemma": sentencepiece_tokenizer(root / "spm-gemma", "gemma"),
        "spm-metaspace": sentencepiece_tokenizer(root / "spm-metaspace", "metaspace"),
    }


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 500000.0}
LONGROPE = {
    "rope_type": "longrope",
    "long_factor": [1.0 + i / 4 for i in range(8)],
    "short_factor": [1.0 + i / 16 for i in range(8)],
}

# Gemma 2 and 3 scale attention by query_pre_attn_scalar, which llama.cpp takes to be head_dim.
# A window of 8 tokens makes the sliding-window layers matter within the short parity prompts.
GEMMA_LAYOUT = {"head_dim": 16, "query_pre_attn_scalar": 16}

# (case id, transformers model_type, tokenizer, config overrides, expected llama.cpp facts)
CASES = [
    ("llama-smollm", "llama", "smollm", {}, {"model": "gpt2", "pre": "smollm", "style": "chatml"}),
    ("llama3", "llama", "llama3", {"rope_scaling": LLAMA3_ROPE}, {"model": "gpt2", "pre": "llama-bpe", "style": "llama-3", "add_bos": True}),
    ("llama2-spm", "llama", "spm-llama", {}, {"model": "llama", "pre": "default", "style": "llama-2", "add_bos": True}),
    ("mistral", "mistral", "spm-mistral", {"sliding_window": None}, {"model": "llama", "style": "mistral", "add_bos": True}),
    ("qwen2", "qwen2", "qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}, {"pre": "qwen2", "style": "chatml"}),
    ("qwen3", "qwen3", "qwen2", {"head_dim": 16}, {"pre": "qwen2", "style": "chatml"}),
    ("gemma", "gemma", "spm-gemma", {"head_dim": 16}, {"model": "llama", "style": "gemma", "add_bos": True}),
    ("gemma2", "gemma2", "spm-gemma", GEMMA_LAYOUT | {"sliding_window": 8}, {"model": "llama", "style": "gemma", "add_bos": True}),
    ("gemma3", "gemma3_text", "spm-gemma", GEMMA_LAYOUT | {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, {"model": "llama", "style": "gemma", "add_bos": True}),
    ("phi3", "phi3", "spm-phi3", {"rope_scaling": LONGROPE, "original_max_position_embeddings": 1024, "max_position_embeddings": 4096}, {"model": "llama", "style": "phi-3", "add_bos": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tiny_model_round_trips_through_llama_cpp(case, tokenizers, tmp_path):
    name, model_type, tokenizer, overrides, expected = case
    model_dir = build_model(tmp_path / "model", tokenizers[tokenizer], model_type, **overrides)
    for type_name in ("f32", "f16"):
        gguf_file = tmp_path / f"{name}-{type_name}.gguf"
        conversion = convert(model_dir, gguf_file, TYPES[type_name], name=f"tiny {name}")
        report = verify_gguf(gguf_file, model_dir, TYPES[type_name])
        problems = report["tokenization"]["mismatches"][:2] + report["tokenization"]["detok_mismatches"][:2]
        assert report["passed"], render_report(report) + f"\n{problems}\n{report['greedy']}"
        assert report["tokenization"]["texts"] >= 20
    vocab = conversion.vocab
    assert vocab.model == expected.get("model", "gpt2")
    assert vocab.pre == expected.get("pre", "default")
    assert vocab.template.style is not None and vocab.template.style.name == expected["style"]
    assert vocab.template.exact, vocab.notes
    assert vocab.add_bos == expected.get("add_bos", False)
    assert "eot" in vocab.special_ids


def test_metaspace_prefix_difference_is_reported(tokenizers, tmp_path):
    """transformers 5's LlamaTokenizer skips the space prefix where SentencePiece and llama.cpp add it.

    Nothing in a GGUF can express that, so the conversion warns and the parity check fails,
    on exactly the texts it concerns: those starting with whitespace, and (prepend_scheme
    "first") text right after a special token.
    """
    model_dir = build_model(tmp_path / "model", tokenizers["spm-metaspace"], "llama")
    gguf_file = tmp_path / "metaspace.gguf"
    conversion = convert(model_dir, gguf_file, TYPES["f32"], name="tiny metaspace")
    assert any("Metaspace" in note for note in conversion.notes)
    report = verify_gguf(gguf_file, model_dir, TYPES["f32"])
    assert not report["passed"] and report["checks"]["tokenization identical"] is False
    differing = [m["text"] for m in report["tokenization"]["mismatches"]]
    assert "    indented code line" in differing
    assert all(text[:1].isspace() or "[INST]" in text for text in differing), differing
    assert report["logits"]["top1_agreement"] >= 0.98  # the weights are right; only tokenization differs

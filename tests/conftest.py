"""Shared fixtures: the real demo model (converted once, cached), tiny random models, and the runs
several test files read (the demo SFT run, a tiny SFT run, a tiny reward model), each built once per session.

Tiny models are Llama-architecture, randomly initialised from a config, and use the demo
model's real tokenizer, so tests exercise real tokenization in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FTUNE_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from ftune.modeling.models import demo_model_dir as resolve

    return resolve()


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    """The demo model's real tokenizer."""
    from ftune.modeling.models import load_tokenizer

    return load_tokenizer(str(demo_model_dir))


@pytest.fixture(scope="module")
def formatter(tokenizer):
    """Its chat formatter with the tokenizer's own template."""
    from ftune.data.rendering import make_formatter

    return make_formatter(tokenizer)


def build_tiny_model(out: Path, tokenizer_dir: Path, *, arch: str = "llama", seed: int = 0, **config) -> Path:
    """A randomly initialised model of a few MB with the demo tokenizer, saved as safetensors; `config`: more
    of the family's own settings (its experts, say)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Larger than the default 0.02 so logits have some scale and a few LoRA steps visibly learn.
        initializer_range=0.2,
        **config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_model_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", demo_model_dir)


@pytest.fixture(scope="session")
def demo_sft_run(tmp_path_factory) -> Path:
    """The shipped demo SFT recipe, trained once per test session (a few minutes on CPU)."""
    from ftune.stages import sft

    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("demo") / "demo-sft"
    return sft.run(root / "recipes" / "demo" / "sft.yaml", [f"output.dir={out}"])


# The runs below are trained once per session and shared by every test file that reads them; a test
# that changes a run (damages a file, marks it failed) works on a copy.


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished one-step SFT run on the tiny model (prompt/completion rows)."""
    from ftune.stages import sft
    from helpers import write_jsonl

    folder = tmp_path_factory.mktemp("tiny-sft")
    write_jsonl(folder / "data.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}."} for i in range(8)])
    (folder / "recipe.yaml").write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: data.jsonl}}]\n"
                                        "  max_length: 32\ntraining: {max_steps: 1, batch_size: 2}\noutput: {dir: run}\n")
    return sft.run(folder / "recipe.yaml")


@pytest.fixture(scope="session")
def rm_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One small reward model on the tiny model (helpers.rm_recipe: 6 steps on RM_PAIRS), trained through the stage."""
    from ftune.stages import rm
    from helpers import rm_recipe

    return rm.run(rm_recipe(tmp_path_factory.mktemp("rm"), tiny_model_dir))

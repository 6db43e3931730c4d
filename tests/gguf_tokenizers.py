"""Real tokenizers for the GGUF tests (tests/test_gguf_arch.py, tests/test_gguf_units.py): a small corpus,
the chat templates of the model families ftune exports, and byte-level BPE and SentencePiece tokenizers
trained on that corpus (no tokenizer file ships in an installed package)."""

from __future__ import annotations

import json
from pathlib import Path

from ftune.gguf.vocab import LLAMA3_REGEX, QWEN2_REGEX

CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world! How are you today?
I've been told he'll say we're here, didn't he? They're sure it's fine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 2024 3.14159 1,000,000 and -17.
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }
{"key": [1, 2, 3], "nested": {"a": null}}
Café, naïve, Zürich, São Paulo, Kraków, Ångström.
Русский текст и ελληνικά γράμματα. 日本語のテキスト。中文文本。
What is the capital of France? Paris is the capital of France.
Write a haiku about the sea. The waves of the sea roll on and on.
List three prime numbers: two, three and five are prime numbers.
You are a concise assistant. You answer in one line. What is 12 * 12? 144.
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


# --- tokenizers -------------------------------------------------------------------------------


def byte_level_tokenizer(out: Path, style: str) -> Path:
    """A byte-level BPE trained on CORPUS with Llama 3's ("llama3") or Qwen2's ("qwen2") pre-tokenizer.

    Small (800 tokens) so the round trips stay fast; the demo model's 49k-token tokenizer is
    covered by the "llama-smollm" case and the demo tests.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    regex = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[style]
    backend = Tokenizer(models.BPE(ignore_merges=style == "llama3"))  # Llama 3's tokenizer.json sets ignore_merges
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    if style == "qwen2":
        backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    specials = (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        if style == "llama3"
        else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([CORPUS] * 4, trainer)
    if style == "llama3":
        backend.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", clean_up_tokenization_spaces=True
        )
        tokenizer.chat_template = LLAMA3_TEMPLATE
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
        )
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def sentencepiece_tokenizer(out: Path, style: str) -> Path:
    """A SentencePiece BPE model trained on CORPUS, loaded by transformers: "llama", "phi3" or "gemma"."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer, LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text(CORPUS * 4, encoding="utf-8")
    common = dict(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    if style == "gemma":
        spm.SentencePieceTrainer.train(
            **common, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        )
    else:
        spm.SentencePieceTrainer.train(**common, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    source = out / "spm"
    source.mkdir()
    (out / "tokenizer.model").rename(source / "tokenizer.model")

    if style == "gemma":
        tokenizer = GemmaTokenizer.from_pretrained(source, add_bos_token=True)
        tokenizer.chat_template = GEMMA_TEMPLATE
    elif style == "metaspace":
        # transformers 5's own LlamaTokenizer: a Metaspace pre-tokenizer whatever tokenizer.json says.
        tokenizer = LlamaTokenizer.from_pretrained(source, add_bos_token=True)
        tokenizer.chat_template = LLAMA2_TEMPLATE
    else:
        tokenizer = sentencepiece_faithful(LlamaTokenizer.from_pretrained(source, legacy=True, add_bos_token=True))
        tokenizer.chat_template = LLAMA2_TEMPLATE if style == "llama" else MISTRAL_TEMPLATE
        if style == "phi3":
            # Phi-3's chat tokens strip the whitespace after them (rstrip), like its real tokenizer.
            turn_tokens = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
            tokenizer.add_special_tokens(
                {"additional_special_tokens": [AddedToken(t, rstrip=t != "<|endoftext|>", special=True, normalized=False) for t in turn_tokens]}
            )
            tokenizer.eos_token = "<|endoftext|>"
            tokenizer.chat_template = PHI3_TEMPLATE
    target = out / "hf"
    tokenizer.save_pretrained(target)
    return target


def sentencepiece_faithful(tokenizer):
    """The tokenizer.json form Llama 2 and Mistral ship: Prepend("▁") + Replace(" ", "▁"), loaded as is.

    It adds the space prefix to every text segment, as SentencePiece does. (transformers 5's
    LlamaTokenizer class replaces it with a Metaspace pre-tokenizer that skips the prefix when
    a segment already starts with a space: see test_metaspace_prefix_difference_is_reported.)
    """
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}],
    }
    spec["pre_tokenizer"] = None
    faithful = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    faithful.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", faithful.bos_token_id)]
    )
    return faithful

"""The tokenizer as llama.cpp reads it, taken from the tokenizer transformers loads.

The reference is what `AutoTokenizer` builds (its tokenizers JSON), because that is the
tokenizer the model was fine-tuned with. Two llama.cpp tokenizer models cover the supported
architectures:

- "gpt2": byte-level BPE (Llama 3, SmolLM, Qwen, Phi-4): tokens, merges, and a pre-tokenizer
  name. llama.cpp does not read the splitting regex from the file; it keeps a fixed table of
  regexes per name. The name is chosen here by comparing the tokenizer's own pre-tokenizer
  steps with that table (see PRE_TOKENIZERS), then narrowed by the two behaviours the name
  also switches: ignore_merges and the spacing clean-up of decoded text.
- "llama": SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3): tokens
  with "▁" for spaces, byte tokens <0xNN>, and scores. llama.cpp's SentencePiece merges the
  adjacent pair whose joined token scores highest; transformers applies merges by rank. A
  score of minus the rank of the first merge producing a token makes the two agree.

Special tokens (BOS, EOS, end of turn, padding), whether BOS/EOS are added, and the chat
template travel in the same metadata. `verify.py` then proves tokenization identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune.errors import FtuneError
from ftune.gguf.templates import TemplateMatch, match_template
from ftune.guards import textio

if TYPE_CHECKING:
    from gguf import GGUFWriter

# llama.cpp token types (gguf.TokenType), spelled out so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer steps, in transformers' terms. "bytelevel" is ByteLevel(use_regex=True), which
# splits with GPT-2's regex; "digits" is Digits(individual_digits=True). Regexes are the Split
# patterns as the models' tokenizer.json files spell them.
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    name: str
    """tokenizer.ggml.pre: the name llama.cpp switches its splitting on."""
    steps: tuple[str, ...]
    """The transformers pre-tokenizer steps llama.cpp's regexes for this name reproduce."""
    ignore_merges: bool
    """llama.cpp takes a pre-token found whole in the vocabulary as one token (tokenizer.json's ignore_merges)."""
    clean_spaces: bool
    """llama.cpp's decoder removes the space before punctuation (transformers' clean_up_tokenization_spaces)."""


# llama.cpp's own settings for each name (src/llama-vocab.cpp), for the names whose regexes the
# supported model families use.
PRE_TOKENIZERS = [
    PreTokenizer("gpt-2", ("bytelevel",), False, True),
    PreTokenizer("smollm", ("digits", "bytelevel"), False, False),
    PreTokenizer("starcoder", ("digits", "bytelevel"), False, True),
    PreTokenizer("llama-bpe", (LLAMA3_REGEX,), True, True),
    PreTokenizer("dbrx", (LLAMA3_REGEX,), False, True),
    PreTokenizer("qwen2", (QWEN2_REGEX,), False, False),
    PreTokenizer("stablelm2", (QWEN2_REGEX,), False, True),
    PreTokenizer("qwen35", (QWEN35_REGEX,), False, False),
    PreTokenizer("tekken", (TEKKEN_REGEX,), True, False),
    PreTokenizer("gpt-4o", (GPT4O_REGEX,), False, False),
]


@dataclass
class Vocab:
    model: str
    """tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)."""
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]
    """bos, eos, eot, unk, pad -> token id (only those the tokenizer has)."""
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | list[dict] | None
    template: TemplateMatch
    rstrip_after_specials: bool
    """transformers strips whitespace after special tokens (Phi-3's tokenizers do)."""
    stop_texts: list[str]
    """Texts of every token that ends generation: EOS, end of turn, generation_config's eos ids."""
    notes: list[str] = field(default_factory=list)


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """Everything llama.cpp needs to tokenize exactly like the model's transformers tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise FtuneError(f"cannot load the tokenizer: {exc}", place=str(model_dir)) from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise FtuneError("the tokenizer has no tokenizers (tokenizer.json) form to convert", place=str(model_dir))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise FtuneError(
            f"{model.get('type')} tokenizers are not supported for GGUF export (only BPE: byte-level or SentencePiece-style)",
            place=str(model_dir),
        )

    vocab_ids: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    size = max([*vocab_ids.values(), *added, -1]) + 1
    if size > n_vocab:
        raise FtuneError(f"the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows", place=str(model_dir))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    notes: list[str] = []

    if _is_sentencepiece_style(spec):
        kind, pre = "llama", "default"
        add_space_prefix = _adds_space_prefix(spec, notes)
    else:
        try:
            pre, pre_notes = pre_tokenizer_name(spec, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
        except FtuneError as exc:
            raise FtuneError(exc.message, place=str(model_dir), hint=exc.hint) from None
        kind, add_space_prefix = "gpt2", False
        notes += pre_notes
        _check_normalizer(spec, notes, model_dir)

    tokens, types = _tokens_and_types(vocab_ids, added, n_vocab, kind, tokenizer.unk_token_id)
    _check_unique(tokens, model_dir)
    scores = _merge_scores(tokens, merges) if kind == "llama" else None

    add_bos, add_eos = _added_specials(tokenizer, model_dir)
    template = match_template(tokenizer, runtime_adds_bos=add_bos)
    notes += template.notes
    special_ids = _special_ids(tokenizer, template, tokens)
    return Vocab(
        model=kind,
        pre=pre,
        tokens=tokens,
        types=types,
        scores=scores,
        merges=merges if kind == "gpt2" else [],
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=tokenizer.chat_template,
        template=template,
        rstrip_after_specials=any(t.get("rstrip") and t.get("special") for t in added.values()),
        stop_texts=_stop_texts(model_dir, special_ids, tokens),
        notes=notes,
    )


def write_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "eot": writer.add_eot_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in vocab.special_ids.items():
        setters[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        template = vocab.chat_template
        if isinstance(template, dict):  # named templates: gguf wants a list of {name, template}
            template = [{"name": name, "template": text} for name, text in template.items()]
        writer.add_chat_template(template)


def llamacpp_model_name(name: str, vocab: Vocab) -> str:
    """general.name, adjusted so llama.cpp strips whitespace after special tokens iff transformers does.

    GGUF has no per-token strip flag: llama.cpp turns it on for every special token when the
    model name contains "phi-3" or "phi3" (the Phi-3 tokenizers' convention) and nowhere else.
    """
    lowered = name.lower()
    says_phi3 = "phi-3" in lowered or "phi3" in lowered
    if vocab.rstrip_after_specials and not says_phi3:
        return f"{name} (Phi-3 tokenizer)"
    if not vocab.rstrip_after_specials and says_phi3:
        return name.replace("phi-3", "phi 3").replace("Phi-3", "Phi 3").replace("phi3", "phi 3").replace("Phi3", "Phi 3").replace("PHI3", "PHI 3")
    return name


# --- tokenizer kinds -------------------------------------------------------------------------


def _components(node: dict | None) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder flattened out of its Sequence wrappers."""
    if not node:
        return []
    inner = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders")
    if node.get("type") == "Sequence" and inner is not None:
        return [c for child in inner for c in _components(child)]
    return [node]


def _is_sentencepiece_style(spec: dict) -> bool:
    """BPE with byte fallback that writes spaces as "▁": converted from a SentencePiece model."""
    if not spec["model"].get("byte_fallback"):
        return False
    parts = _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer"))
    return any(p.get("type") == "Metaspace" or (p.get("type") == "Replace" and p.get("content") == "▁") for p in parts)


def _adds_space_prefix(spec: dict, notes: list[str]) -> bool:
    for part in _components(spec.get("normalizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "▁":
            return True
    for part in _components(spec.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            scheme = part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never")
            if scheme == "never":
                return False
            # transformers 5 builds Llama/Mistral tokenizers this way whatever tokenizer.json says.
            notes.append(
                "the tokenizer (transformers' Metaspace) adds the '▁' space prefix only where a text segment does not "
                "already start with a space"
                + (" and only at the very start of the text, not after special tokens" if scheme == "first" else "")
                + "; SentencePiece and llama.cpp always add it, so such segments tokenize differently in llama.cpp"
            )
            return True
    return False


def pre_tokenizer_name(spec: dict, clean_up_spaces: bool) -> tuple[str, list[str]]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizers JSON, and notes on what differs.

    The tokenizer's pre-tokenizer steps must equal the steps of a llama.cpp name exactly; among
    names with the same steps, the one that also agrees on ignore_merges and on the clean-up
    of spaces in decoded text wins.
    """
    steps = []
    for part in _components(spec.get("pre_tokenizer")):
        kind = part.get("type")
        if kind == "ByteLevel":
            if part.get("add_prefix_space"):
                raise FtuneError("byte-level tokenizers that add a prefix space are not supported by llama.cpp")
            if part.get("use_regex", True):
                steps.append("bytelevel")
        elif kind == "Digits":
            steps.append("digits" if part.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and part.get("behavior") == "Isolated" and not part.get("invert"):
            pattern = part.get("pattern", {})
            steps.append(pattern.get("Regex") or pattern.get("String", ""))
        else:
            raise FtuneError(f"pre-tokenizer step {textio.canonical(part)[:120]} has no llama.cpp equivalent")
    if not any(p.get("type") == "ByteLevel" for p in _components(spec.get("decoder"))):
        raise FtuneError("BPE tokenizer without byte-level decoding and without byte fallback: not supported")

    candidates = [p for p in PRE_TOKENIZERS if p.steps == tuple(steps)]
    if not candidates:
        raise FtuneError(
            "the tokenizer's pre-tokenizer matches none llama.cpp implements for the supported models",
            hint="recognised: " + ", ".join(sorted({p.name for p in PRE_TOKENIZERS})),
        )
    ignore_merges = bool(spec["model"].get("ignore_merges", False))
    best = max(candidates, key=lambda p: (p.ignore_merges == ignore_merges, p.clean_spaces == clean_up_spaces))
    notes = []
    if best.ignore_merges != ignore_merges:
        notes.append(f"llama.cpp's '{best.name}' pre-tokenizer differs from this tokenizer in ignore_merges")
    if best.clean_spaces != clean_up_spaces:
        notes.append(
            f"llama.cpp's '{best.name}' decoder {'removes' if best.clean_spaces else 'keeps'} the space before punctuation, "
            f"transformers {'removes' if clean_up_spaces else 'keeps'} it"
        )
    return best.name, notes


def _check_normalizer(spec: dict, notes: list[str], place: Path) -> None:
    for part in _components(spec.get("normalizer")):
        if part.get("type") == "NFC":
            notes.append("the tokenizer NFC-normalizes text and llama.cpp does not: text not already in NFC may tokenize differently")
        else:
            raise FtuneError(f"normalizer {part.get('type')} has no llama.cpp equivalent for byte-level BPE", place=str(place))


# --- tokens ----------------------------------------------------------------------------------


def _tokens_and_types(
    vocab_ids: dict[str, int], added: dict[int, dict], n_vocab: int, kind: str, unk_id: int | None
) -> tuple[list[str], list[int]]:
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows of the embedding no token uses
    types = [UNUSED] * n_vocab
    for text, token_id in vocab_ids.items():
        tokens[token_id] = text
        is_byte = kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        types[token_id] = BYTE if is_byte else NORMAL
    for token_id, info in added.items():
        text = info["content"]
        if info.get("special"):
            types[token_id] = CONTROL
        else:
            types[token_id] = USER_DEFINED
            if kind == "llama":
                # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁".
                text = text.replace("▁", " ")
        tokens[token_id] = text
    if kind == "llama" and unk_id is not None:
        types[unk_id] = UNKNOWN
    return tokens, types


def _check_unique(tokens: list[str], place: Path) -> None:
    seen: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        if text in seen:
            raise FtuneError(
                f"tokens {seen[text]} and {token_id} are both {text!r}; llama.cpp needs every token text once",
                place=str(place),
            )
        seen[text] = token_id


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores under which llama.cpp's SentencePiece merging picks the merges transformers would."""
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        first_rank.setdefault(left + right, rank)
    return [-float(first_rank[t]) if t in first_rank else 0.0 for t in tokens]


def _added_specials(tokenizer: Any, place: Path) -> tuple[bool, bool]:
    """Whether transformers adds BOS / EOS around a text, read from what it actually does."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = full.index(bare[0]) if bare and bare[0] in full else -1
    prefix, suffix = full[:start], full[start + len(bare):]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if start < 0 or prefix not in ([], [bos]) or suffix not in ([], [eos]):
        raise FtuneError(
            f"the tokenizer adds {prefix} before and {suffix} after a text; llama.cpp can only add BOS and EOS",
            place=str(place),
        )
    return prefix == [bos] and bos is not None, suffix == [eos] and eos is not None


def _special_ids(tokenizer: Any, template: TemplateMatch, tokens: list[str]) -> dict[str, int]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    if template.style is not None and template.style.turn_end in tokens:
        ids["eot"] = tokens.index(template.style.turn_end)
    return {kind: token_id for kind, token_id in ids.items() if token_id is not None}


def _stop_texts(model_dir: Path, special_ids: dict[str, int], tokens: list[str]) -> list[str]:
    """Texts of the tokens that end a reply: EOS, end of turn, and generation_config's eos ids."""
    ids = [special_ids[k] for k in ("eot", "eos") if k in special_ids]
    config_file = Path(model_dir) / "generation_config.json"
    if config_file.is_file():
        config = textio.load_file(config_file, "generation config")
        eos = config.get("eos_token_id") if isinstance(config, dict) else None
        ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    texts: list[str] = []
    for token_id in ids:
        if 0 <= token_id < len(tokens) and tokens[token_id] not in texts:
            texts.append(tokens[token_id])
    return texts

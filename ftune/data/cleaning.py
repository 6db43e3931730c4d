"""Which rows to remove from a dataset, and why: duplicates, lengths, empty answers, refusals, language.

The work is split so a data pipeline can do the costly part in worker processes and decide in
the parent, in source order:

- in a worker, per converted sample: `row_reason` (the per-row filters) and `signature` (a
  hash of the normalised text, and a MinHash when near-dedup is on), both pure;
- in the parent, in order: `length_reason` on the rendered sample's token count, then
  `Deduper.check`, which keeps the first of every group of duplicates.

A reason is a short text whose part before the first colon names the rule ("refusal: ...",
"near duplicate: ..."); reports count rows by that rule.

Text is compared after normalisation: Unicode NFKC (so full-width letters, ligatures and
non-breaking spaces read as their plain forms), case folded, whitespace collapsed to one
space, stripped. A near duplicate shares at least `near` of its word 5-grams with an earlier
kept row (Jaccard similarity, estimated from MinHash signatures: datasketch's MinHashLSH finds
the candidates, and the estimate over all `num_perm` hash values confirms them).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ftune.data.formats import Chat, Preference, Prompt, Raw
from ftune.guards import textio

# Answers containing any of these are refusals or AI disclaimers, not answers to learn from.
# They are searched in the normalised answer (lower case, whitespace collapsed); ['’] takes
# either apostrophe. The list follows the phrases filtered from ShareGPT/WizardLM "unfiltered" sets.
REFUSAL_PATTERNS = (
    r"\bas an ai (?:language )?model\b",
    r"\bas an ai(?: assistant)?, i (?:do not|don['’]t|cannot|can['’]t|am not|have no)\b",
    r"\bas a (?:large )?language model\b",
    r"\bi(?: am|['’]m) (?:just |only )?an ai\b",
    r"\bi(?: am|['’]m) sorry,? but i (?:cannot|can['’]t|can not|am unable|['’]m unable|won['’]t|will not|am not able)\b",
    r"\bi (?:cannot|can['’]t|can not) (?:help|assist)(?: you)? with (?:that|this)\b",
    r"\bi(?: am|['’]m) (?:unable|not able) to (?:help|assist|provide|comply|fulfil)",
    r"\bi (?:cannot|can['’]t|won['’]t|will not) (?:comply with|fulfil|fulfill) (?:that|this|your)(?: request)?\b",
    r"\bi apologi[sz]e,? but i (?:cannot|can['’]t|am unable|['’]m unable)\b",
    r"\bmy (?:programming|guidelines) (?:does not|doesn['’]t|do not|don['’]t) (?:allow|permit)\b",
)
LANGUAGE_CONFIDENCE = 0.8  # below this the detector is guessing (short texts): the row is kept
SHINGLE_WORDS = 5  # word 5-grams: long enough that shared ones mean shared passages, not shared phrases
MINHASH_SEED = 1
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)  # inline reasoning, as chat.py splits it off


@dataclass(frozen=True)
class Rules:
    """What a pipeline removes, from a recipe's data section (`data.dedup`, `data.filters`). Picklable."""

    exact: bool = False
    near: float | None = None  # Jaccard threshold of word 5-grams
    num_perm: int = 128
    min_tokens: int | None = None
    max_tokens: int | None = None
    empty_answers: bool = False
    refusals: bool = False
    refusal_patterns: tuple[str, ...] = ()  # the user's, besides REFUSAL_PATTERNS when refusals is on
    languages: tuple[str, ...] = ()

    @classmethod
    def from_section(cls, data) -> Rules:
        dedup, filters = data.dedup, data.filters
        return cls(exact=dedup.exact, near=dedup.near, num_perm=dedup.num_perm,
                   min_tokens=filters.min_tokens, max_tokens=filters.max_tokens,
                   empty_answers=filters.empty_answers, refusals=filters.refusals,
                   refusal_patterns=tuple(filters.refusal_patterns), languages=tuple(filters.languages))

    @property
    def dedup(self) -> bool:
        return self.exact or self.near is not None

    @property
    def per_row(self) -> bool:
        """Whether `row_reason` can remove anything."""
        return self.empty_answers or self.refusals or bool(self.refusal_patterns) or bool(self.languages)

    @property
    def lengths(self) -> bool:
        return self.min_tokens is not None or self.max_tokens is not None

    @property
    def active(self) -> bool:
        return self.dedup or self.per_row or self.lengths


@dataclass(frozen=True)
class Signature:
    """What the parent needs to find a row's duplicates: 16 bytes of hash, and the MinHash values (uint32) for near-dedup."""

    digest: bytes
    minhash: np.ndarray | None = None


@dataclass(frozen=True)
class Duplicate:
    of: int  # index of the earlier kept row
    reason: str


@dataclass(frozen=True)
class Removal:
    place: str  # e.g. "data/train.jsonl line 12"
    reason: str
    duplicate_of: str | None = None  # the place of the row kept instead

    @property
    def rule(self) -> str:
        return rule_of(self.reason)

    def as_dict(self) -> dict:
        return {"place": self.place, "reason": self.reason, "duplicate_of": self.duplicate_of}


def rule_of(reason: str) -> str:
    return reason.split(":", 1)[0]


# --------------------------------------------------------------------------- text


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def sample_text(sample) -> str:
    """The normalised text of a converted sample: every turn with its role, tool calls and reasoning; tool specs too."""
    return normalise(_plain_text(sample))


def _plain_text(sample) -> str:
    if isinstance(sample, Chat):
        parts = [_message_text(m) for m in sample.messages]
        if sample.tools:
            parts.append("tools: " + textio.canonical(list(sample.tools)))
        return "\n".join(parts)
    if isinstance(sample, Raw):
        return "\n".join(text for text, _ in sample.segments)
    if isinstance(sample, Preference):
        parts = [_message_text(m) for m in sample.prompt]
        parts += ["chosen: " + _message_text(m) for m in sample.chosen]
        parts += ["rejected: " + _message_text(m) for m in sample.rejected]
        if sample.label is not None:
            parts.append(f"label: {sample.label}")
        return "\n".join(parts)
    if isinstance(sample, Prompt):
        return "\n".join(_message_text(m) for m in sample.messages)
    return textio.canonical(sample)


def _message_text(message: dict) -> str:
    text = f"{message['role']}: {message.get('content', '')}"
    if message.get("reasoning_content"):
        text += f" reasoning: {message['reasoning_content']}"
    for call in message.get("tool_calls", ()):
        function = call["function"]
        text += f" call: {function['name']}({textio.canonical(function.get('arguments', {}))})"
    return text


def answers(sample) -> list[str]:
    """The texts a sample teaches the model to produce (reasoning left out): what the answer filters read.

    Chat: assistant turns with text (a turn that only calls tools is an action, not an empty answer).
    Raw: the trained segments (a completion, a text). Preference: the chosen answers, and KTO's
    answer only when desirable (a refusal as the rejected side is what preference data is for).
    Prompt (GRPO): none.
    """
    if isinstance(sample, Chat):
        return [m["content"] for m in sample.messages if m["role"] == "assistant" and not m.get("tool_calls")]
    if isinstance(sample, Raw):
        return [text for text, trained in sample.segments if trained]
    if isinstance(sample, Preference):
        return [] if sample.label is False else [m["content"] for m in sample.chosen if m["role"] == "assistant"]
    return []


def _is_empty(answer: str) -> bool:
    # Whitespace, controls and invisible format characters (zero-width spaces, BOMs) say nothing.
    visible = _THINK.sub("", unicodedata.normalize("NFKC", answer))
    return not any(unicodedata.category(c)[0] not in "CZ" for c in visible)


# --------------------------------------------------------------------------- per row (workers)


def row_reason(sample, rules: Rules) -> str | None:
    """Why the per-row filters remove this converted sample, or None to keep it."""
    if not rules.per_row:
        return None
    texts = answers(sample)
    if rules.empty_answers and any(_is_empty(t) for t in texts):
        return "empty answer: an answer has no text besides whitespace, invisible characters or reasoning"
    patterns = _refusal_regexes(rules.refusals, rules.refusal_patterns)
    if patterns:
        for text in texts:
            normal = normalise(_THINK.sub("", text))
            for pattern in patterns:
                found = pattern.search(normal)
                if found:
                    return f"refusal: the answer says '{found.group(0)}'"
    if rules.languages:
        language, confidence = detect_language(_plain_text_of_turns(sample))
        if language not in rules.languages and confidence >= LANGUAGE_CONFIDENCE:
            return f"language: {language} ({confidence:.0%} sure), not {', '.join(rules.languages)}"
    return None


def _plain_text_of_turns(sample) -> str:
    """The words of a sample without role labels or tool specs, for language detection."""
    if isinstance(sample, (Chat, Prompt)):
        messages = sample.messages
    elif isinstance(sample, Preference):
        messages = (*sample.prompt, *sample.chosen)
    else:
        return " ".join(_plain_text(sample).split())
    return " ".join(" ".join(str(m.get("content", "")) for m in messages).split())


@functools.lru_cache(maxsize=8)
def _refusal_regexes(builtin: bool, user: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    # The recipe compiled each user pattern when it was validated; here they are compiled once per process.
    return tuple(re.compile(p, re.IGNORECASE) for p in ((*REFUSAL_PATTERNS, *user) if builtin else user))


@functools.lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import (  # its model is numpy arrays, loaded without pickle
        MODEL_FILE,
        LanguageIdentifier,
    )

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, confidence 0-1) of a text, by py3langid (about 50 µs per row)."""
    language, confidence = _language_identifier().classify(text)
    return str(language), float(confidence)


def signature(sample, rules: Rules) -> Signature:
    """A sample's exact-dedup hash and, when near-dedup is on, its MinHash values."""
    text = sample_text(sample)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    if rules.near is None:
        return Signature(digest)
    from datasketch import MinHash

    minhash = MinHash(num_perm=rules.num_perm, seed=MINHASH_SEED, scheme="affine32",
                      permutations=_permutations(rules.num_perm))
    minhash.update_batch(shingles(text))
    return Signature(digest, np.asarray(minhash.hashvalues, dtype=np.uint32))


def shingles(text: str) -> list[bytes]:
    """The word 5-grams of a normalised text (a shorter text is one shingle of all its words)."""
    words = text.split()
    if len(words) <= SHINGLE_WORDS:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i: i + SHINGLE_WORDS]).encode("utf-8") for i in range(len(words) - SHINGLE_WORDS + 1)]


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme="affine32").permutations


# --------------------------------------------------------------------------- in order (parent)


def length_reason(n_tokens: int, rules: Rules) -> str | None:
    """Why the length filters remove a sample of `n_tokens` tokens (as rendered for training), or None."""
    if rules.min_tokens is not None and n_tokens < rules.min_tokens:
        return f"too short: {n_tokens} tokens, below min_tokens {rules.min_tokens}"
    if rules.max_tokens is not None and n_tokens > rules.max_tokens:
        return f"too long: {n_tokens} tokens, above max_tokens {rules.max_tokens}"
    return None


@dataclass
class Deduper:
    """Keeps the first of each group of duplicates: rows are checked in order, and kept ones registered.

    Memory per kept row: 16 bytes of digest in a dict, and with near-dedup its num_perm uint32
    values (512 bytes at 128) plus datasketch's LSH buckets.
    """

    rules: Rules
    _exact: dict[bytes, int] = field(default_factory=dict)
    _lsh: object = None
    _values: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rules.near is not None:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=self.rules.near, num_perm=self.rules.num_perm)

    def check(self, index: int, sig: Signature) -> Duplicate | None:
        """The earlier kept row this one duplicates; else None, and the row is registered as kept."""
        if not self.rules.dedup:
            return None
        earlier = self._exact.get(sig.digest)
        if earlier is not None:
            return Duplicate(earlier, "exact duplicate: the same text as an earlier row (ignoring case and whitespace)")
        minhash = None
        if self._lsh is not None:
            if sig.minhash is None:
                raise ValueError("near-dedup needs signatures computed with near set")
            from datasketch import LeanMinHash

            minhash = LeanMinHash(seed=MINHASH_SEED, hashvalues=sig.minhash, scheme="affine32")
            found = self._nearest(sig.minhash, self._lsh.query(minhash))
            if found is not None:
                of, similarity = found
                return Duplicate(of, f"near duplicate: about {similarity:.0%} of its word 5-grams shared with an earlier row")
        self._exact[sig.digest] = index
        if minhash is not None:
            self._lsh.insert(index, minhash, check_duplication=False)
            self._values[index] = sig.minhash
        return None

    def _nearest(self, values: np.ndarray, candidates) -> tuple[int, float] | None:
        # LSH returns likely matches; the estimate over every hash value confirms them, and the
        # earliest confirmed row is the one kept (the first of its group).
        for of in sorted(candidates):
            similarity = float(np.mean(self._values[of] == values))
            if similarity >= self.rules.near:
                return of, similarity
        return None


# --------------------------------------------------------------------------- reporting


def summarise(removals: list[Removal], *, first: int = 10) -> dict:
    """Counts of removed rows per rule (most first), and the first few removals."""
    counts = Counter(r.rule for r in removals)
    return {"removed": len(removals), "by_rule": dict(counts.most_common()),
            "first": [r.as_dict() for r in removals[:first]]}

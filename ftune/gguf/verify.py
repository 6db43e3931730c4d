"""Prove a written GGUF right: llama.cpp running it against transformers running the source.

Three checks, each with the tolerance of the output type (formats.Tolerance):
1. tokenization: every sample text (plain, unicode, code, digits, whitespace runs, and chat
   turns with special tokens) gives the same ids from llama.cpp and from transformers, and
   the same text back from both detokenizers. Required identical for every type.
2. next-token distributions: on the same ids, the share of positions whose top token agrees,
   and the mean KL divergence between the two softmaxes.
3. greedy continuations from chat prompts, token for token.

The prompts, the tolerance and the greedy loop on the transformers side are the ones merge
parity uses (ftune/modeling/compare.py): a merged model's own run supplies its held-out prompts.
The report is a plain dict (saved as JSON next to the file) and a rich table.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune.errors import FtuneError
from ftune.gguf.quant_types import LLAMACPP_INSTALL, OutputType
from ftune.guards import textio
from ftune.modeling.compare import GREEDY_TOKENS, greedy_continuation, held_out_prompts, render_plain

if TYPE_CHECKING:
    import numpy as np

# Texts that break converted tokenizers: spaces and newlines in runs (merge and pre-tokenizer
# rules), digits (split one by one, or in threes), accents, CJK and emoji (bytes, byte fallback).
SAMPLE_TEXTS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, trailing two  ",
    "tabs\tand\t\tnewlines\n\n\nthree blank lines\n",
    "    indented code line",
    "Numbers: 0 7 42 123 2024 3.14159 1,000,000 -17 1e-5",
    "Phone 555-0199, ZIP 90210, year 1999.",
    "Ünïcödé: café, naïve, Zürich, Ångström, São Paulo, Kraków",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 🚀🦙✅ 👩‍💻 🇫🇷 😶‍🌫️",
    "Русский текст и ελληνικά γράμματα.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "I've been told he'll say 'we're here' -- didn't he?",
    "URL: https://example.com/path?query=1&x=%20",
    "Ellipsis... and dashes --- and ===== and ``` fences ```",
    "",
    " ",
    "\n",
]
MAX_PROMPT_TOKENS = 112  # with the greedy tokens, a 128-token context


def require_llama_cpp(purpose: str) -> Any:
    """The llama_cpp module, or an error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise FtuneError(f"{purpose} needs llama-cpp-python, which is not installed", hint=f"install it: {LLAMACPP_INSTALL}") from None
    return llama_cpp


def chat_texts(tokenizer: Any) -> list[str]:
    """Chat-formatted samples from the model's own template, special tokens written out as text."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        return []
    conversations = [
        [{"role": "user", "content": "Hi there!"}],
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is 12 * 12?"},
            {"role": "assistant", "content": "144."},
            {"role": "user", "content": "And 13 * 13?\n  Show it."},
        ],
    ]
    texts = []
    for messages in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError:  # a template may reject a system turn; the other sample still runs
            continue
    return texts


def worker_threads() -> int:
    """Threads for llama.cpp and torch here: half the cores.

    Both spin-wait in OpenMP between steps; on a machine shared with other work, using every
    core turns a 0.3 s forward pass into 20 s. Half the cores costs little on an idle machine.
    """
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Reference:
    """What transformers computes on the source: shared by checks of several files of one model."""

    model_dir: Path
    tokenizer: Any
    prompts: list[list[int]]
    """The chat prompts, then one plain text (logits only)."""
    logits: list[np.ndarray]
    """Next-token logits at every position of each prompt."""
    greedy: list[tuple[list[int], list[float]]]
    """Greedy continuation of each chat prompt (to end of text), and the top-two logit margin at each step."""


def reference_outputs(model_dir: Path) -> Reference:
    """Run the source model in transformers (float32) on the parity prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    chat = _chat_prompt_ids(tokenizer, merged_run_prompts(Path(model_dir)))
    plain = tokenizer(SAMPLE_TEXTS[11] + SAMPLE_TEXTS[5], add_special_tokens=True)["input_ids"][:MAX_PROMPT_TOKENS]
    with torch_threads(worker_threads()):
        runs = [greedy_continuation(model, ids, GREEDY_TOKENS, stop_id=tokenizer.eos_token_id) for ids in chat]
        runs.append(greedy_continuation(model, plain, 0))
    logits = [run.logits.numpy() for run in runs]
    greedy = [(run.tokens, run.margins) for run in runs[: len(chat)]]
    return Reference(Path(model_dir), tokenizer, [*chat, plain], logits, greedy)


def merged_run_prompts(model_dir: Path) -> Path | None:
    """The held-out prompts of the run a merged model came from (its merge.json names the run), if still there."""
    from ftune.artifacts.runs import EVAL_PROMPTS_FILE
    from ftune.merge.support import MERGE_FILE

    try:
        source = textio.load_file(model_dir / MERGE_FILE, "merge file")["source"]
        prompts = Path(source) / EVAL_PROMPTS_FILE
        return prompts if prompts.is_file() else None
    except (FtuneError, OSError, ValueError, KeyError, TypeError):  # not a merged model, or not one ftune described
        return None


def verify_gguf(
    gguf_path: Path, model_dir: Path, out_type: OutputType, *, texts: list[str] | None = None, reference: Reference | None = None
) -> dict:
    """Compare `gguf_path` (llama.cpp) with `model_dir` (transformers); the JSON-ready report."""
    reference = reference or reference_outputs(model_dir)
    tokenizer = reference.tokenizer
    llm = load_llama(gguf_path)
    try:
        # Plain texts get the BOS/EOS the tokenizer adds; chat texts already hold them as the template wrote them.
        samples = [(text, True) for text in (texts if texts is not None else SAMPLE_TEXTS)]
        samples += [(text, False) for text in chat_texts(tokenizer)]
        tokenization = compare_tokenization(tokenizer, llm, samples)
        logits = compare_logits(reference, llm)
        greedy = compare_greedy(reference, llm)
    finally:
        llm.close()

    tol = out_type.tolerance
    checks = {
        "tokenization identical": tokenization["mismatches"] == [],
        "detokenization identical": tokenization["detok_mismatches"] == [],
        f"top-1 agreement >= {tol.top1_min:.0%}": logits["top1_agreement"] >= tol.top1_min,
        f"mean KL <= {tol.kl_max:g}": logits["mean_kl"] <= tol.kl_max,
    }
    if tol.greedy_identical:
        checks["greedy continuations identical"] = all(g["identical"] for g in greedy)
    return {
        "gguf": str(gguf_path),
        "source": str(model_dir),
        "type": out_type.name,
        "tolerance": {"top1_min": tol.top1_min, "kl_max": tol.kl_max, "greedy_identical": tol.greedy_identical},
        "tokenization": tokenization,
        "logits": logits,
        "greedy": greedy,
        "checks": checks,
        "passed": all(checks.values()),
    }


def load_llama(gguf_path: Path, n_ctx: int = MAX_PROMPT_TOKENS + GREEDY_TOKENS) -> Any:
    """llama.cpp on the file, keeping logits for every position (n_ctx x vocabulary floats)."""
    llama_cpp = require_llama_cpp("checking the GGUF file")
    with captured_llama_log() as log:
        try:
            return llama_cpp.Llama(
                model_path=str(gguf_path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                logits_all=True,
                n_threads=worker_threads(),
                n_threads_batch=worker_threads(),
                verbose=False,
            )
        except ValueError:  # llama-cpp-python's "Failed to load model from file"
            reasons = [line.strip() for line in log if "error" in line.lower() or "fail" in line.lower()]
            raise FtuneError(
                "llama.cpp cannot load the written file", place=str(gguf_path), hint="\n".join(reasons[-3:]) or None
            ) from None


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines instead of printing them; give llama-cpp-python its logger back after."""
    import llama_cpp
    from llama_cpp import _logger  # the callback llama-cpp-python installs at import

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))  # `keep` stays referenced while llama.cpp may call it
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def compare_tokenization(tokenizer: Any, llm: Any, texts: list[tuple[str, bool]]) -> dict:
    """Ids and decoded text for each (text, add special tokens) from both tokenizers."""
    mismatches, detok_mismatches = [], []
    for text, add_special in texts:
        expected = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        # llama-cpp-python's add_bos means llama.cpp's add_special: the BOS/EOS the GGUF says to add.
        got = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
        if got != expected:
            mismatches.append({"text": text, "transformers": expected, "llama.cpp": got})
            continue
        hf_text = tokenizer.decode(expected, skip_special_tokens=False)
        cpp_text = detokenize(llm, expected)
        if cpp_text != hf_text:
            detok_mismatches.append({"text": text, "transformers": hf_text, "llama.cpp": cpp_text})
    return {"texts": len(texts), "identical": len(texts) - len(mismatches), "mismatches": mismatches, "detok_mismatches": detok_mismatches}


def detokenize(llm: Any, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (the one llama-cpp-python wraps decodes piece by piece)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    array = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 16 * len(ids)
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, array, len(ids), buffer, size, False, True)
        if n >= 0:
            return buffer.raw[:n].decode("utf-8", errors="replace")
        size = -n + 1


def _chat_prompt_ids(tokenizer: Any, prompts_file: Path | None) -> list[list[int]]:
    """The held-out prompts as llama.cpp sees them in use: with the BOS it adds before a prompt."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer(".", add_special_tokens=True)["input_ids"][:1] == [bos]
    prompts = []
    for ids in held_out_prompts(tokenizer, prompts_file, max_tokens=MAX_PROMPT_TOKENS - 1):
        prompts.append([bos, *ids] if adds_bos and ids[:1] != [bos] else ids)
    return prompts


def compare_logits(reference: Reference, llm: Any) -> dict:
    import numpy as np

    agree = positions = 0
    kls: list[np.ndarray] = []
    max_abs = 0.0
    for ids, expected in zip(reference.prompts, reference.logits):
        got = _llama_logits(llm, ids)
        if got.shape != expected.shape:
            raise FtuneError(f"llama.cpp gives {got.shape[-1]} logits per position, transformers {expected.shape[-1]}")
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        positions += len(ids)
        kls.append(_kl(expected, got))
        max_abs = max(max_abs, float(np.abs(got - expected).max()))
    kl = np.concatenate(kls)
    return {
        "positions": positions,
        "top1_agreement": agree / positions,
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "max_abs_logit_diff": max_abs,
    }


def _llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from logits (float32 is ample: tolerances start at 1e-4)."""
    import numpy as np

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def compare_greedy(reference: Reference, llm: Any) -> list[dict]:
    results = []
    for ids, (expected, margins) in zip(reference.prompts, reference.greedy):
        got = _greedy_llama(llm, ids, len(expected))
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), len(expected))
        results.append(
            {
                "prompt_tokens": len(ids),
                "identical": expected == got,
                "matching_prefix": same,
                # How close transformers' top two were where the two diverged: a near tie means
                # rounding, not a broken conversion, decided it.
                "margin_at_divergence": margins[same] if same < len(margins) else None,
                "transformers": reference.tokenizer.decode(expected),
                "llama.cpp": reference.tokenizer.decode(got),
            }
        )
    return results


def _greedy_llama(llm: Any, ids: list[int], n_tokens: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def render_report(report: dict) -> str:
    """The parity report as a table (rich, plain text), one row per check, and the verdict."""
    from rich.table import Table

    tok, lg = report["tokenization"], report["logits"]
    table = Table(title=f"{Path(report['gguf']).name} ({report['type']}) in llama.cpp vs the source in transformers")
    table.add_column("check")
    table.add_column("measured", justify="right")
    table.add_column("result")
    measured = {
        "tokenization identical": f"{tok['identical']}/{tok['texts']} texts",
        "detokenization identical": f"{tok['identical'] - len(tok['detok_mismatches'])}/{tok['identical']} texts",
        "greedy continuations identical": f"{sum(g['identical'] for g in report['greedy'])}/{len(report['greedy'])} prompts",
    }
    for name, ok in report["checks"].items():
        if name.startswith("top-1"):
            value = f"{lg['top1_agreement']:.1%} of {lg['positions']}"
        elif name.startswith("mean KL"):
            value = f"{lg['mean_kl']:.2e}"
        else:
            value = measured[name]
        table.add_row(name, value, "ok" if ok else "FAILED")
    if "greedy continuations identical" not in report["checks"]:
        table.add_row("greedy continuations (not required)", measured["greedy continuations identical"], "-")
    table.add_row("max |logit difference|", f"{lg['max_abs_logit_diff']:.3g}", "-")
    return render_plain(table, f"{'PASS' if report['passed'] else 'FAIL'}: {report['type']} parity with the source model")


def first_problem(report: dict) -> str:
    """One line naming the first failed check, with an example, for the error message."""
    tok = report["tokenization"]
    if tok["mismatches"]:
        m = tok["mismatches"][0]
        return f"tokenization differs, e.g. {m['text'][:40]!r}: transformers {m['transformers'][:12]} vs llama.cpp {m['llama.cpp'][:12]}"
    if tok["detok_mismatches"]:
        m = tok["detok_mismatches"][0]
        return f"detokenization differs: transformers {m['transformers'][:40]!r} vs llama.cpp {m['llama.cpp'][:40]!r}"
    failed = [name for name, ok in report["checks"].items() if not ok]
    return "failed: " + ", ".join(failed)

"""What merge parity and GGUF parity share: the tolerance, the prompts, the greedy continuation.

Both prove a written model against a reference the same way: on held-out prompts (a run's
own eval_prompts.jsonl, else built-in questions in the model's chat template) they compare
the next-token logits at every prompt position and a greedy continuation, token for token.
`ftune merge` compares the merged model with the adapter (merge/parity.py); `ftune
export-gguf` compares llama.cpp running the file with transformers running the source
(gguf/verify.py).

No heavy imports at module level: gguf/quant_types.py, which builds `--help`, imports Tolerance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune.data.chat_template import render  # bounded in time: a template that runs away is an error naming it
from ftune.errors import FtuneError
from ftune.guards import textio

if TYPE_CHECKING:
    import torch

MAX_PROMPTS = 8
GREEDY_TOKENS = 16
BUILTIN_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


@dataclass(frozen=True)
class Tolerance:
    """How close a written model must stay to its reference on the parity prompts."""

    top1_min: float
    """Least share of positions whose most likely next token is the same on both sides."""
    greedy_identical: bool
    """Whether greedy continuations must be token-for-token identical."""
    kl_max: float | None = None
    """Largest mean KL divergence (nats) between the two next-token distributions; None: not checked."""
    max_logit_diff: float | None = None
    """Largest |logit difference|, as a fraction of the reference's largest |logit| (at least 1); None: not checked."""


def prompt_texts(tokenizer: Any, prompts_file: Path | None) -> list[str]:
    """The run's held-out prompts (text already in the chat template), else the built-in questions in it."""
    texts = read_prompts(prompts_file) if prompts_file is not None else []
    if not texts:
        from jinja2 import TemplateError

        for question in BUILTIN_QUESTIONS:
            try:
                messages = [{"role": "user", "content": question}]
                texts.append(render(tokenizer, messages, template=None, name="the tokenizer's chat template", add_generation_prompt=True))
            except (TemplateError, ValueError):  # no chat template (a base model), or one that refuses this turn
                texts.append(question)
    return texts[:MAX_PROMPTS]


def held_out_prompts(tokenizer: Any, prompts_file: Path | None, *, max_tokens: int) -> list[list[int]]:
    """`prompt_texts` as token ids, each cut to its last `max_tokens` (where the answer starts).

    The texts carry their special tokens already (the chat template wrote them), so the
    tokenizer adds none.
    """
    prompts = []
    for text in prompt_texts(tokenizer, prompts_file):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
        if ids:
            prompts.append(ids)
    return prompts


def read_prompts(path: Path) -> list[str]:
    """The non-empty texts of an eval_prompts.jsonl, one JSON object {"text": ...} a line."""
    texts = []
    for number, line in textio.text_lines(path, "prompts file"):
        if not line.strip():
            continue
        data = textio.loads(line, f"{path} line {number}")
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise FtuneError("expected a JSON object with a 'text' string", place=f"{path}:{number}")
        if text.strip():  # an empty prompt has no position to compare
            texts.append(text)
    return texts


@dataclass
class Continuation:
    """What a transformers model makes of one prompt."""

    logits: torch.Tensor
    """float32 next-token logits at every prompt position, on the CPU."""
    tokens: list[int]
    """The greedy continuation."""
    margins: list[float]
    """The gap between the top two logits at each greedy step: a near tie is rounding's to decide."""


def greedy_continuation(model: Any, ids: list[int], n_tokens: int = GREEDY_TOKENS, *, stop_id: int | None = None) -> Continuation:
    """The prompt's logits and up to `n_tokens` greedy tokens (fewer when `stop_id` comes first).

    A plain loop over the KV cache rather than `generate`: the prompt's forward pass gives both
    the logits and the first token, and no generation_config of the model's can turn on sampling.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    tokens: list[int] = []
    margins: list[float] = []
    with torch.inference_mode():
        output = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        logits = output.logits[0].float().cpu()
        step = logits[-1]
        while len(tokens) < n_tokens:
            top2 = torch.topk(step, 2).values
            tokens.append(int(step.argmax()))
            margins.append(float(top2[0] - top2[1]))
            if tokens[-1] == stop_id or len(tokens) == n_tokens:
                break
            output = model(input_ids=torch.tensor([[tokens[-1]]], device=device), use_cache=True, **_kv_cache(output))
            step = output.logits[0, -1].float()
    return Continuation(logits, tokens, margins)


def _kv_cache(output: Any) -> dict:
    # transformers 5.24 renamed past_key_values to cache (the old name warns); earlier 5.x know only the old one.
    if getattr(output, "cache", None) is not None:
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


def render_plain(*items: Any) -> str:
    """Rich tables and lines as plain text (no colour, 100 columns), for a terminal or a log."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=100, color_system=None)
    for item in items:
        console.print(item)
    return buffer.getvalue().rstrip()

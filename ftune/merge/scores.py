"""Prove a reward model's merge: the adapter, loaded as it was trained, against the merged sequence-classification model.

Both score the same held-out sequences (the run's eval_prompts.jsonl holds whole chosen and
rejected texts, a pair every two lines; built-in pairs otherwise), one sequence at a time, as
transformers reads a reward. Compared: the largest |score difference| (against the tolerance
of the lower precision, relative to the largest |score|) and the share of pairs both order the
same way.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from pathlib import Path

from ftune.data.chat_template import render  # bounded in time: a template that runs away is an error naming it
from ftune.merge.parity import TOLERANCES, _adapter_model, _device, _lower_precision
from ftune.merge.source import Source
from ftune.modeling.compare import BUILTIN_QUESTIONS, read_prompts, render_plain

BUILTIN_ANSWERS = ("Here is a careful, helpful answer.", "No.")  # a pair per built-in question, when the run kept none


def verify_scores(src: Source, merged_dir: Path, dtype: str, *, rounded_base: bool, say: Callable[[str], None]) -> dict:
    """The parity report (JSON-ready) of a merged reward model in `merged_dir` against the adapter of `src`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftune.modeling.models import load_tokenizer

    tokenizer = load_tokenizer(str(merged_dir))
    texts = _texts(tokenizer, src.prompts_file)
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    quantized = src.quantization is not None and rounded_base
    reference_name = f"adapter on the {'4-bit ' if quantized else ''}base, as trained ({src.train_dtype})"
    say(f"verifying on {len(sequences)} sequences ({len(sequences) // 2} pairs): {reference_name} against the merged model ({dtype})")
    reference = _scores(_adapter_model(src, quantized=quantized), sequences)
    gc.collect()
    merged = _scores(AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=getattr(torch, dtype),
                                                                        trust_remote_code=src.trust_remote_code).to(_device()), sequences)
    precision = _lower_precision(src.train_dtype, dtype)
    tolerance = TOLERANCES[precision]
    scale = max(max(abs(r) for r in reference), 1.0)
    pairs = [(reference[i] - reference[i + 1], merged[i] - merged[i + 1]) for i in range(0, len(sequences) - 1, 2)]
    agreement = sum((a > 0) == (b > 0) for a, b in pairs) / max(len(pairs), 1)
    largest = max(abs(a - b) for a, b in zip(reference, merged))
    limits = {"max_abs_score_diff": tolerance.max_logit_diff * scale, "min_pair_agreement": tolerance.top1_min}
    return {
        "passed": math.isfinite(largest) and largest <= limits["max_abs_score_diff"] and agreement >= limits["min_pair_agreement"],
        "reference": reference_name, "merged_dtype": dtype, "precision": precision,
        "max_abs_score_diff": largest, "score_scale": scale, "pair_agreement": agreement, "pair_count": len(pairs),
        "limits": limits,
        "sequences": [{"tokens": len(ids), "reference_score": r, "merged_score": m} for ids, r, m in zip(sequences, reference, merged)],
    }


def _texts(tokenizer, prompts_file: Path | None) -> list[str]:
    """Whole sequences to score, a pair every two: the run's held-out ones, else built-in pairs in the chat template."""
    texts = read_prompts(prompts_file) if prompts_file is not None else []
    if len(texts) >= 2:
        return texts[: len(texts) // 2 * 2]
    texts = []
    for question in BUILTIN_QUESTIONS:
        for answer in BUILTIN_ANSWERS:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            try:
                texts.append(render(tokenizer, messages, template=None, name="the tokenizer's chat template"))
            except ValueError:  # no chat template (a base model)
                texts.append(f"{question}\n{answer}")
    return texts


def _scores(model, sequences: list[list[int]]) -> list[float]:
    """Each sequence's reward, given alone (no padding), as transformers computes it."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        return [float(model(input_ids=torch.tensor([ids], device=device)).logits[0, 0]) for ids in sequences]


def render_scores(report: dict) -> str:
    """The parity report as the terminal shows it."""
    from rich.table import Table

    table = Table()
    for column in ("sequence", "tokens", "adapter score", "merged score", "|difference|"):
        table.add_column(column, justify="right")
    for number, row in enumerate(report["sequences"], start=1):
        table.add_row(str(number), str(row["tokens"]), f"{row['reference_score']:+.5f}", f"{row['merged_score']:+.5f}",
                      f"{abs(row['reference_score'] - row['merged_score']):.2e}")
    limits = report["limits"]
    verdict = "PASS" if report["passed"] else "FAIL"
    return render_plain(
        f"parity: the merged reward model ({report['merged_dtype']}) against the {report['reference']}", table,
        f"largest |score difference| {report['max_abs_score_diff']:.2e} (limit {limits['max_abs_score_diff']:.2e}); pairs ordered "
        f"alike {report['pair_agreement']:.0%} of {report['pair_count']} (limit {limits['min_pair_agreement']:.0%})",
        f"{verdict}: merged model {'matches' if report['passed'] else 'does not match'} the adapter ({report['precision']} tolerance)")

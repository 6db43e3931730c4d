"""Prove a merge: the adapter, loaded the way it was trained, against the merged directory in plain transformers.

Both run the same held-out prompts (ftune/modeling/compare.py); their logits at every prompt position
and their greedy continuations are compared with the tolerance of the lower precision of the
two. One model is in memory at a time; the reference's logits are kept for the comparison.
`render_report` is the proof as the terminal shows it: a row per prompt, the total, the limit, the verdict.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from pathlib import Path

from ftune.merge.source import Source
from ftune.modeling.compare import GREEDY_TOKENS, Tolerance, greedy_continuation, held_out_prompts, render_plain

MAX_PROMPT_TOKENS = 128  # 8 prompts x 128 positions x a 150k vocabulary x 4 bytes = 0.6 GB of kept logits

# float32 differs only by summation order, (W + BA)x against Wx + B(Ax): SmolLM2-135M measures
# 9e-5 on logits of up to 38, about 2e-6 of the scale. In 16 bits every weight is rounded, so
# logits move by a few percent and near ties flip: casting SmolLM2-135M itself from float32 to
# bf16 moves logits by 1.6 (4% of 38) and changes 2.7% of top-1 tokens. The 16-bit limits sit
# above that noise; the float32 limit is what proves the arithmetic.
TOLERANCES = {
    "float32": Tolerance(max_logit_diff=1e-4, top1_min=1.0, greedy_identical=True),
    "float16": Tolerance(max_logit_diff=0.05, top1_min=0.95, greedy_identical=False),
    "bfloat16": Tolerance(max_logit_diff=0.10, top1_min=0.90, greedy_identical=False),
}


def verify_parity(src: Source, merged_dir: Path, dtype: str, *, rounded_base: bool, say: Callable[[str], None]) -> dict:
    """The parity report (JSON-ready): the merged model in `merged_dir` against the adapter of `src`."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.modeling.models import load_tokenizer

    tokenizer = load_tokenizer(str(merged_dir))
    prompts = held_out_prompts(tokenizer, src.prompts_file, max_tokens=MAX_PROMPT_TOKENS)
    qlora = src.quantization is not None
    if qlora and rounded_base:
        reference_name = f"adapter on the 4-bit base, as trained ({src.train_dtype})"
    elif qlora:
        reference_name = f"adapter on the full-precision base ({src.train_dtype})"
    elif src.run_dir is not None:
        reference_name = f"adapter on the base, as trained ({src.train_dtype})"
    else:  # a bare adapter does not say how it was trained
        reference_name = f"adapter on the base ({src.train_dtype})"
    say(f"verifying on {len(prompts)} prompts: {reference_name} against the merged model ({dtype})")
    reference = _run_prompts(_adapter_model(src, quantized=qlora and rounded_base), prompts, tokenizer)
    # The model went with _run_prompts' frame; collect in case (remote) code left a cycle, since
    # two 7B models at once would not fit where one does.
    gc.collect()
    trained = None
    if qlora and not rounded_base:
        say("  and against the adapter on the 4-bit base it was trained on, to measure what --onto original shifts")
        trained = _run_prompts(_adapter_model(src, quantized=True), prompts, tokenizer)
        gc.collect()
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype), trust_remote_code=src.trust_remote_code)
    merged = _run_prompts(merged_model.to(_device()), prompts, tokenizer)

    precision = _lower_precision(src.train_dtype, dtype)
    comparison = compare(reference, merged, tokenizer, TOLERANCES[precision])
    report = {
        "passed": comparison.pop("passed"),
        "reference": reference_name,
        "merged_dtype": dtype,
        "precision": precision,
        **comparison,
    }
    if trained is not None:
        shift = compare(trained, merged, tokenizer, TOLERANCES[precision])
        report["shift_from_trained_4bit_model"] = {k: v for k, v in shift.items() if k not in ("passed", "limits", "prompts")}
    return report


def _adapter_model(src: Source, *, quantized: bool):
    """The base with the adapter on top, unmerged; in 4 bits through bitsandbytes when `quantized`."""
    from peft import PeftModel

    from ftune.modeling.models import load_model, pick_dtype

    model = load_model(
        src.base_path,
        dtype=pick_dtype(src.train_dtype),
        quantization=src.quantization if quantized else None,
        trust_remote_code=src.trust_remote_code,
        score_head=src.scores,
    )
    for module in model.modules():
        # bitsandbytes' CPU inference kernel (AVX512-BF16) repacks 4-bit weights and multiplies in
        # bf16, which training never does; keep the dequantize-then-matmul path that training uses.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if not quantized:  # load_model already placed a 4-bit model
        model = model.to(_device())
    return PeftModel.from_pretrained(model, src.adapter_dir)


def _run_prompts(model, prompts: list[list[int]], tokenizer) -> list[dict]:
    """Per prompt: float32 logits at every prompt position, and the greedy continuation up to end of text."""
    runs = [greedy_continuation(model, ids, GREEDY_TOKENS, stop_id=tokenizer.eos_token_id) for ids in prompts]
    return [{"logits": run.logits, "greedy": run.tokens} for run in runs]


def compare(reference: list[dict], merged: list[dict], tokenizer, tolerance: Tolerance) -> dict:
    """Per prompt and in all: largest |logit difference|, top-1 agreement, greedy match; and the verdict."""
    rows = []
    for ref, got in zip(reference, merged):
        agree = (ref["logits"].argmax(-1) == got["logits"].argmax(-1)).float()
        rows.append(
            {
                "tokens": int(agree.numel()),
                "max_abs_logit_diff": (ref["logits"] - got["logits"]).abs().max().item(),
                "top1_agreement": agree.mean().item(),
                "greedy_match": ref["greedy"] == got["greedy"],
                "reference_continuation": tokenizer.decode(ref["greedy"]),
                "merged_continuation": tokenizer.decode(got["greedy"]),
            }
        )
    positions = sum(row["tokens"] for row in rows)
    scale = max(max(ref["logits"].abs().max().item() for ref in reference), 1.0)
    summary = {
        "max_abs_logit_diff": max(row["max_abs_logit_diff"] for row in rows),
        "logit_scale": scale,
        "top1_agreement": sum(row["top1_agreement"] * row["tokens"] for row in rows) / positions,
        "greedy_matches": sum(row["greedy_match"] for row in rows),
        "prompt_count": len(rows),
        "greedy_tokens": GREEDY_TOKENS,
    }
    # parity.json's names for the limits, as they have always been written.
    limits = {
        "max_abs_logit_diff": tolerance.max_logit_diff * scale,
        "min_top1_agreement": tolerance.top1_min,
        "greedy_must_match": tolerance.greedy_identical,
    }
    passed = (
        math.isfinite(summary["max_abs_logit_diff"])
        and summary["max_abs_logit_diff"] <= limits["max_abs_logit_diff"]
        and summary["top1_agreement"] >= limits["min_top1_agreement"]
        and (summary["greedy_matches"] == len(rows) or not tolerance.greedy_identical)
    )
    return {"passed": passed, **summary, "limits": limits, "prompts": rows}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _lower_precision(*dtypes: str) -> str:
    for name in ("bfloat16", "float16"):
        if name in dtypes:
            return name
    return "float32"


def render_report(report: dict) -> str:
    """The parity report (merge/parity.py) as a plain-text table."""
    from rich.table import Table

    limits = report["limits"]
    table = Table()
    for column in ("prompt", "tokens", "max |logit diff|", "top-1 agree", f"greedy {report['greedy_tokens']}"):
        table.add_column(column, justify="right" if column != "prompt" else "left")
    for number, row in enumerate(report["prompts"], start=1):
        table.add_row(
            str(number),
            str(row["tokens"]),
            f"{row['max_abs_logit_diff']:.2e}",
            f"{row['top1_agreement']:.1%}",
            "same" if row["greedy_match"] else "differs",
        )
    table.add_section()
    table.add_row(
        "all",
        str(sum(row["tokens"] for row in report["prompts"])),
        f"{report['max_abs_logit_diff']:.2e}",
        f"{report['top1_agreement']:.1%}",
        f"{report['greedy_matches']}/{report['prompt_count']} same",
    )
    table.add_row(
        "limit",
        "",
        f"{limits['max_abs_logit_diff']:.2e}",
        f">= {limits['min_top1_agreement']:.0%}",
        "all same" if limits["greedy_must_match"] else "-",
    )
    lines: list = [f"parity: the merged model ({report['merged_dtype']}) against the {report['reference']}", table]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: merged model {'matches' if report['passed'] else 'does not match'} the adapter ({report['precision']} tolerance)")
    shift = report.get("shift_from_trained_4bit_model")
    if shift:
        lines.append(
            f"--onto original shifts outputs from the 4-bit model the adapter was trained on: max |logit diff| "
            f"{shift['max_abs_logit_diff']:.2e}, top-1 agreement {shift['top1_agreement']:.1%}, "
            f"greedy {shift['greedy_matches']}/{shift['prompt_count']} same (information, not checked)"
        )
    return render_plain(*lines)

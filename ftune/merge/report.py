"""The merge parity report as the terminal shows it: one row per prompt, the total, the limit, the verdict."""

from __future__ import annotations

from ftune.modeling.compare import render_plain


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

"""From decisions to training data and a report.

- preferences.jsonl: {prompt, chosen, rejected}: every good answer against every bad one of
  the same prompt, and the best answer (where one was picked) against each other answer.
- kto.jsonl: {prompt, completion, label}: every good (and best) answer true, every bad false.
Both are read by `ftune dpo` as they are (formats 'preference' and 'kto'). Empty answers
cannot be training targets and are left out (the report counts them).
- report.md / report.json: the share of good answers per prompt and overall, and the most
  common failure notes.
"""

from __future__ import annotations

import json
from collections import Counter

from ftune.commands.label.session import BAD, GOOD, Item, Session
from ftune.guards import textio

PREFERENCES, KTO, REPORT_MD, REPORT_JSON = "preferences.jsonl", "kto.jsonl", "report.md", "report.json"


def good_and_bad(item: Item) -> tuple[list[int], list[int]]:
    good = [i for i, label in enumerate(item.labels) if label == GOOD]
    if item.best is not None and item.best not in good:
        good.append(item.best)
    return good, [i for i, label in enumerate(item.labels) if label == BAD and i != item.best]


def pairs(item: Item) -> list[tuple[int, int]]:
    if item.answers is None or item.skipped:
        return []
    good, bad = good_and_bad(item)
    found = [(g, b) for g in good for b in bad]
    if item.best is not None:
        found += [(item.best, j) for j in range(len(item.answers)) if j != item.best]
    usable = [(c, r) for c, r in dict.fromkeys(found) if item.answers[c].strip() and item.answers[r].strip()]
    return usable


def kto_rows(item: Item) -> list[tuple[int, bool]]:
    if item.answers is None or item.skipped:
        return []
    good, bad = good_and_bad(item)
    return [(i, label) for i, label in [*((g, True) for g in good), *((b, False) for b in bad)] if item.answers[i].strip()]


def render(session: Session) -> dict[str, str]:
    """The text of every output file."""
    preference_lines, kto_lines = [], []
    for item in session.items:
        for chosen, rejected in pairs(item):
            preference_lines.append(textio.dumps({"prompt": item.prompt, "chosen": item.answers[chosen],
                                                "rejected": item.answers[rejected]}, ensure_ascii=False))
        for index, label in kto_rows(item):
            kto_lines.append(textio.dumps({"prompt": item.prompt, "completion": item.answers[index], "label": label}, ensure_ascii=False))
    report = build_report(session, len(preference_lines), kto_lines)
    return {
        PREFERENCES: "".join(line + "\n" for line in preference_lines),
        KTO: "".join(line + "\n" for line in kto_lines),
        REPORT_JSON: textio.dumps(report, ensure_ascii=False, indent=2) + "\n",
        REPORT_MD: markdown(report),
    }


def build_report(session: Session, n_pairs: int, kto_lines: list[str]) -> dict:
    per_prompt, notes = [], Counter()
    totals = Counter()
    for item in session.items:
        good, bad = good_and_bad(item) if item.answers is not None else ([], [])
        status = "skipped" if item.skipped else "decided" if item.done else "open"
        totals[status] += 1
        if not item.skipped:
            totals["good"] += len(good)
            totals["bad"] += len(bad)
            totals["empty"] += sum(1 for i in [*good, *bad] if not item.answers[i].strip())
        for i in bad:
            if item.notes[i]:
                notes[" ".join(item.notes[i].split()).lower()] += 1
        answers = [{"text": text, "label": GOOD if i in good else BAD if i in bad else None, "best": i == item.best,
                    "note": item.notes[i]} for i, text in enumerate(item.answers or [])]
        per_prompt.append({"line": item.line, "prompt": item.prompt, "status": status, "decided_by": item.decided_by,
                           "good": len(good), "bad": len(bad), "share_good": _share(len(good), len(bad)),
                           "sampled": item.sampled, "answers": answers})
    desirable = sum(1 for line in kto_lines if json.loads(line)["label"])
    return {
        "format": "ftune-label-report",
        "model": session.model["spec"],
        "prompts_file": session.prompts_file,
        "sampling": session.sampling,
        "prompts": {"total": len(session.items), "decided": totals["decided"], "skipped": totals["skipped"], "open": totals["open"]},
        "answers": {"good": totals["good"], "bad": totals["bad"]},
        "share_good": _share(totals["good"], totals["bad"]),
        "preference_pairs": n_pairs,
        "kto_examples": {"desirable": desirable, "undesirable": len(kto_lines) - desirable},
        "empty_answers_left_out": totals["empty"],
        "failure_notes": [{"note": note, "count": count} for note, count in notes.most_common(10)],
        "per_prompt": per_prompt,
    }


def _share(good: int, bad: int) -> float | None:
    return round(good / (good + bad), 4) if good + bad else None


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def summary(report: dict) -> list[str]:
    p = report["prompts"]
    lines = [
        f"- prompts: {p['total']} ({p['decided']} decided, {p['skipped']} skipped, {p['open']} open) from {report['prompts_file']}",
        f"- answers: {report['answers']['good']} good, {report['answers']['bad']} bad; share good {percent(report['share_good'])}",
        f"- preference pairs: {report['preference_pairs']}; KTO examples: {report['kto_examples']['desirable']} desirable, "
        f"{report['kto_examples']['undesirable']} undesirable",
    ]
    if report["empty_answers_left_out"]:
        lines.append(f"- empty answers left out of the data: {report['empty_answers_left_out']}")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Labelling report: {report['model']}", "", *summary(report)]
    lines += ["", "## Most common failure notes", ""]
    lines += [f"- {n['count']} × {n['note']}" for n in report["failure_notes"]] or ["(none)"]
    lines += ["", "## Per prompt", "", "| line | prompt | status | good | bad | share good |", "|---:|---|---|---:|---:|---:|"]
    for row in report["per_prompt"]:
        prompt = _cell(row["prompt"])
        lines.append(f"| {row['line']} | {prompt} | {row['status']} | {row['good']} | {row['bad']} | {percent(row['share_good'])} |")
    return "\n".join(lines) + "\n"


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_report(report: dict, console, files) -> None:
    from rich.table import Table

    table = Table(title="labels", title_justify="left")
    for name, justify in (("line", "right"), ("prompt", "left"), ("status", "left"), ("good", "right"), ("bad", "right"), ("share good", "right")):
        table.add_column(name, justify=justify)
    rows = report["per_prompt"]
    for row in rows[:40]:
        table.add_row(str(row["line"]), _cell(row["prompt"], 50), row["status"], str(row["good"]), str(row["bad"]), percent(row["share_good"]))
    console.print(table)
    if len(rows) > 40:
        console.print(f"({len(rows) - 40} more prompts in report.md)")
    for line in summary(report):
        console.print(line, markup=False, highlight=False)
    if report["failure_notes"]:
        console.print("most common failure notes:", markup=False)
        for note in report["failure_notes"][:5]:
            console.print(f"  {note['count']} × {note['note']}", markup=False, highlight=False)
    for path in files:
        console.print(f"wrote {path}", markup=False, highlight=False)

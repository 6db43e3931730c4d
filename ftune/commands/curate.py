"""`ftune data RECIPE`: the recipe's data, cleaned by its curation rules, with every removed row accounted for.

Each train and eval source is read and converted as training reads it (column mapping, format,
the source's tools), in file order; then rows are removed, first matching rule wins:

1. bad rows: rows the recipe cannot use at all (a missing field, an empty required answer, a
   conversation the chat template rejects), whatever data.on_bad_row says, so the cleaned
   files train with on_bad_row: error;
2. the per-row filters (data.filters: empty answers, refusals, language);
3. the length filters (data.filters.min_tokens / max_tokens, on the sample as rendered);
4. duplicates (data.dedup), the first row of each group kept: train sources in recipe order,
   then eval sources, so an eval row repeating a training row is removed from eval.

The output directory holds `<source>.jsonl` for each source (its kept rows as read, in file
order), `removed.jsonl` (one line per removed row: place, reason, duplicate_of) and
`report.json`; it is written atomically and replaces only an earlier ftune output.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftune.data.conversation import source_tools
from ftune.guards import textio
from ftune.data.cleaning import (
    Deduper,
    Removal,
    Rules,
    length_reason,
    row_reason,
    rule_of,
    signature,
    summarise,
)
from ftune.artifacts.ownership import atomic_dir, check_target
from ftune.data.formats import BadRow, convert_row
from ftune.data.sources import FILE_SUFFIXES, read_source
from ftune.errors import FtuneError
from ftune.recipe import DataSource, Recipe, load_recipe

ALLOWED = {  # the formats each stage trains on (as its data loader allows them)
    "sft": {"alpaca", "messages", "sharegpt", "prompt_completion", "text"},
    "dpo": {"preference", "kto"},
    "rm": {"preference"},
    "grpo": {"prompts"},
}
REMOVED_FILE, REPORT_FILE = "removed.jsonl", "report.json"
ENCODE_CHUNK = 256  # samples tokenized in one batched call
SHOWN = 10  # removed rows listed in the summary and report.json


@dataclass
class SourceReport:
    split: str
    path: str
    file: str  # the cleaned file's name in the output directory
    format: str = "auto"
    rows: int = 0
    kept: int = 0
    by_rule: Counter = field(default_factory=Counter)


@dataclass
class Curation:
    recipe: Path
    out: Path
    dry_run: bool
    rules: Rules
    sources: list[SourceReport] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "recipe": str(self.recipe), "out": None if self.dry_run else str(self.out), "rules": asdict(self.rules),
            "rows": sum(s.rows for s in self.sources), "kept": sum(s.kept for s in self.sources),
            "sources": [{**{k: v for k, v in asdict(s).items() if k != "by_rule"}, "removed": s.rows - s.kept,
                         "by_rule": dict(s.by_rule.most_common())} for s in self.sources],
            **summarise(self.removals, first=SHOWN),
        }


def default_out(recipe_path: Path) -> Path:
    """`<recipe stem>-curated/` beside the recipe."""
    return Path(recipe_path).parent / f"{Path(recipe_path).stem}-curated"


def curate(recipe_path: Path, overrides: list[str] = (), *, out: Path | None = None, dry_run: bool = False,
           overwrite: bool = False) -> Curation:
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    rules = Rules.from_section(recipe.data)
    if not rules.active:
        raise FtuneError("no curation rule is on", place=str(recipe_path),
                         hint="set data.dedup / data.filters in the recipe, or pass --exact, --near 0.8, --min-tokens N, "
                              "--max-tokens N, --empty, --refusals or --language CODE")
    base_dir = recipe_path.parent.resolve()
    out = Path(out) if out is not None else default_out(recipe_path)
    inputs = [("the recipe", recipe_path)] + [("a data file", local) for local in _local_files(recipe.data, base_dir)]
    if not dry_run:
        check_target(out, kind="curated-data", overwrite=overwrite, inputs=inputs, option="--out")  # before any work: a refusal costs nothing
    formatter = _formatter(recipe, base_dir) if rules.lengths else None
    result = Curation(recipe_path, out, dry_run, rules)
    deduper = Deduper(rules)
    places: list[str] = []  # of the kept rows, in the order the deduper saw them
    writing = contextlib.nullcontext(None) if dry_run else atomic_dir(out, kind="curated-data", overwrite=overwrite, inputs=inputs, option="--out")
    with writing as tmp:
        names: set[str] = {Path(REMOVED_FILE).stem, Path(REPORT_FILE).stem}
        for split in ("train", "eval"):
            for source in getattr(recipe.data, split):
                report = SourceReport(split, source.path, _file_name(source, names))
                result.sources.append(report)
                kept = _curate_source(recipe, source, base_dir, rules, formatter, deduper, places, report, result.removals)
                if tmp is not None:
                    with open(tmp / report.file, "w", encoding="utf-8") as handle:
                        for row in kept:
                            handle.write(textio.dumps(row, ensure_ascii=False, default=str) + "\n")
        if tmp is not None:
            with open(tmp / REMOVED_FILE, "w", encoding="utf-8") as handle:
                for removal in result.removals:
                    handle.write(textio.dumps(removal.as_dict(), ensure_ascii=False) + "\n")
            with open(tmp / REPORT_FILE, "w", encoding="utf-8") as handle:
                textio.dump(result.report(), handle, indent=2, ensure_ascii=False)
                handle.write("\n")
    return result


def _curate_source(recipe: Recipe, source: DataSource, base_dir: Path, rules: Rules, formatter, deduper: Deduper, places: list[str],
                   report: SourceReport, removals: list[Removal]) -> list:
    """The source's kept rows as read, in file order; its removals are appended to `removals`."""
    rows, _ = read_source(source.path, base_dir=base_dir, split=source.split, subset=source.subset)
    if not rows:
        raise FtuneError("the data source has no rows", place=source.path)
    report.rows = len(rows)
    local = str(_local_path(source.path, base_dir))
    shown = [source.path + row.place[len(local):] if row.place.startswith(local + " ") else row.place for row in rows]
    reasons: list[str | None] = [None] * len(rows)
    samples: dict[int, object] = {}
    fmt = "prompts" if recipe.stage == "grpo" and source.format == "auto" else source.format
    allowed = ALLOWED[recipe.stage]
    tools = source_tools(source.tools, source.path)
    for i, row in enumerate(rows):
        try:
            sample, fmt = convert_row(row.data, fmt, columns=source.columns, tools=tools, allowed=allowed, place=shown[i])
        except BadRow as exc:
            reasons[i] = f"bad row: {exc}"
            continue
        reasons[i] = row_reason(sample, rules)
        if reasons[i] is None:
            samples[i] = sample
    report.format = fmt
    if formatter is not None:
        _length_reasons(formatter, samples, shown, rules, reasons)
    kept = []
    for i, row in enumerate(rows):
        duplicate_of = None
        if reasons[i] is None:
            duplicate = deduper.check(len(places), signature(samples[i], rules)) if rules.dedup else None
            if duplicate is None:
                places.append(shown[i])
                kept.append(row.data)
                continue
            reasons[i], duplicate_of = duplicate.reason, places[duplicate.of]
        removals.append(Removal(shown[i], reasons[i], duplicate_of))
        report.by_rule[rule_of(reasons[i])] += 1
    report.kept = len(kept)
    return kept


def _length_reasons(formatter, samples: dict, shown: list[str], rules: Rules, reasons: list) -> None:
    """Token counts of the samples as training renders them (the longest piece, for turns: split)."""
    order = list(samples)
    for start in range(0, len(order), ENCODE_CHUNK):
        chunk = order[start: start + ENCODE_CHUNK]
        results = formatter.encode_each([samples[i] for i in chunk], places=[shown[i] for i in chunk])
        for i, result in zip(chunk, results):
            if isinstance(result, BadRow):
                reasons[i] = f"bad row: {result}"
            else:
                reasons[i] = length_reason(max((len(ids) for ids, _ in result), default=0), rules)
            if reasons[i] is not None:
                del samples[i]


def _formatter(recipe: Recipe, base_dir: Path):
    """The recipe's tokenizer and chat template, as `ftune inspect` and training build them (no weights)."""
    from ftune.commands.inspect_parts import config_source
    from ftune.data.rendering import formatter_for
    from ftune.modeling import models

    models.quiet_libraries()
    base = recipe.base_model
    source = config_source(base.name, base.revision, base_dir)
    models.model_config(source, revision=base.revision, trust_remote_code=base.trust_remote_code)
    tokenizer = models.load_tokenizer(source, trust_remote_code=base.trust_remote_code)
    return formatter_for(tokenizer, recipe.data, base_dir=base_dir)


def _local_path(path: str, base_dir: Path) -> Path:
    local = Path(path).expanduser()
    return local if local.is_absolute() else base_dir / local


def _local_files(data, base_dir: Path) -> list[Path]:
    found = [_local_path(s.path, base_dir) for s in [*data.train, *data.eval]]
    return [p for p in found if p.suffix.lower() in FILE_SUFFIXES or p.exists()]


def _file_name(source, taken: set[str]) -> str:
    """`<source stem>.jsonl`, numbered when two sources (or ftune's own files) share the stem."""
    path = Path(source.path)
    stem = path.stem if path.suffix.lower() in FILE_SUFFIXES else source.path.replace("/", "--")
    if source.subset:
        stem += f"-{source.subset}"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name + ".jsonl"


# --------------------------------------------------------------------------- showing it


def print_curation(result: Curation, console) -> None:
    from rich.table import Table

    table = Table(title="curation")
    for column in ("source", "split", "format", "rows", "kept", "removed"):
        table.add_column(column, justify="right" if column in ("rows", "kept", "removed") else "left")
    for s in result.sources:
        removed = ", ".join(f"{n:,} {rule}" for rule, n in s.by_rule.most_common())
        table.add_row(s.path, s.split, s.format, f"{s.rows:,}", f"{s.kept:,}",
                      f"{s.rows - s.kept:,}" + (f" ({removed})" if removed else ""))
    console.print(table)
    for removal in result.removals[:SHOWN]:
        also = f" (duplicate of {removal.duplicate_of})" if removal.duplicate_of else ""
        console.print(f"  removed {removal.place}: {removal.reason}{also}", highlight=False, markup=False, soft_wrap=True)
    if len(result.removals) > SHOWN:
        where = "" if result.dry_run else f" (all in {REMOVED_FILE})"
        console.print(f"  ... and {len(result.removals) - SHOWN:,} more{where}", highlight=False, markup=False, soft_wrap=True)
    rows, kept = sum(s.rows for s in result.sources), sum(s.kept for s in result.sources)
    if result.dry_run:
        console.print(f"dry run: {kept:,} of {rows:,} rows would be kept; nothing was written", highlight=False, soft_wrap=True)
    else:
        console.print(f"wrote {result.out}: {kept:,} of {rows:,} rows kept; "
                      f"{', '.join(s.file for s in result.sources)}, {REMOVED_FILE}, {REPORT_FILE}", highlight=False, markup=False, soft_wrap=True)

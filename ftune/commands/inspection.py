"""`ftune inspect RECIPE`: what training will see and need, without training.

The data goes through the same functions `ftune sft` calls (`prepare_sft`, `sft_micro_batches`,
`count_steps`), and shares its tokenization cache, so every number here is the number
training will have. Only the tokenizer and the model's config are read, never the weights.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ftune.commands.inspect_parts import KIND_TAGS, MASKED, TAG, TRAINED, config_source, print_memory, render_sample
from ftune.data.packing import Encoded
from ftune.data.pipeline import DataReport, prepare_sft
from ftune.data.rendering import IGNORE, KINDS, Formatter, formatter_for
from ftune.modeling import memory, models
from ftune.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from ftune.commands.inspect_stages import StageInspection

HISTOGRAM_BINS, BAR_WIDTH = 8, 40


@dataclass(frozen=True)
class Inspection:
    recipe: Recipe
    formatter: Formatter
    train: Encoded
    eval: Encoded
    report: DataReport
    rows_per_batch: list[int]  # rows in each micro-batch of epoch 0
    token_slots: int  # positions those rows occupy (packed: rows x max_length; padded: rows x longest in batch)
    steps_per_epoch: int
    total_steps: int
    memory: memory.MemoryEstimate
    memory_cpu: memory.MemoryEstimate  # the same recipe trained on this machine's CPU (float32, no CUDA context)
    model: memory.ModelCount  # parameters of the model and of its adapter, as peft builds it
    shares: list[tuple[float | None, float]] = ()  # per train source: (planned share or None, share of epoch 0's samples)

    @property
    def samples(self) -> int:
        """Samples tokenized: every usable row of every source."""
        return sum(s["used"] for s in self.report.sources)

    @property
    def truncated_share(self) -> float:
        return (self.report.truncated + self.report.dropped_too_long) / max(self.samples, 1)

    @property
    def loss_token_share(self) -> float:
        return self.train.trained_tokens() / max(len(self.train.ids), 1)

    @property
    def packing_efficiency(self) -> float:
        return len(self.train.ids) / max(self.token_slots, 1)

    @property
    def tokens_per_step(self) -> int:
        tc = self.recipe.training
        return tc.batch_size * self.recipe.data.max_length * tc.gradient_accumulation_steps * self.recipe.distributed.num_processes

    def numbers(self) -> dict:
        """The report's figures, for --json and tests."""
        r = self.report
        return {
            "sources": r.sources, "skipped": r.skipped, "skipped_count": r.skipped_count,
            "samples": self.samples, "train_samples": len(self.train), "eval_samples": len(self.eval),
            "truncated": r.truncated, "dropped_too_long": r.dropped_too_long, "dropped_no_loss": r.dropped_no_loss,
            "truncated_share": self.truncated_share, "train_tokens": len(self.train.ids),
            "loss_tokens": self.train.trained_tokens(), "loss_token_share": self.loss_token_share,
            "packed_rows": sum(self.rows_per_batch), "token_slots": self.token_slots,
            "packing_efficiency": self.packing_efficiency, "tokens_per_step": self.tokens_per_step,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "audit": r.audit,
            "render_proof": r.render_proof,
            "memory_gib": {line.what: line.bytes / memory.GIB for line in self.memory.lines} | {"total": self.memory.total / memory.GIB},
            "trainable_parameters": self.model.trainable, "parameters": self.model.params,
            "shares": [{"planned": planned, "drawn": drawn} for planned, drawn in self.shares],
            "removed": r.removed, "removed_count": r.removed_count, "removed_by_rule": r.removed_by_rule,
        }


def inspect_recipe(recipe_path: Path, overrides: list[str] = ()) -> Inspection | StageInspection:
    from ftune.train.steps import count_steps, row_widths, sft_micro_batches

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    models.quiet_libraries()
    if recipe.stage != "sft":  # grpo, dpo, rm: each through its own stage's data and step functions
        from ftune.commands.inspect_stages import inspect_stage

        return inspect_stage(recipe, recipe_path)
    base_dir = recipe_path.parent.resolve()
    base = recipe.base_model
    source = config_source(base.name, base.revision, base_dir)
    # The same checks as training (models.model_config): a damaged config, code the recipe does not trust.
    config = models.model_config(source, revision=base.revision, trust_remote_code=base.trust_remote_code)
    tokenizer = models.load_tokenizer(source, trust_remote_code=base.trust_remote_code)
    formatter = formatter_for(tokenizer, recipe.data, base_dir=base_dir)
    train, evaluation, report = prepare_sft(recipe, tokenizer, formatter, base_dir=base_dir,
                                            cache_root=models.cache_dir() / "data")

    tc, max_length = recipe.training, recipe.data.max_length
    world = recipe.distributed.num_processes
    # Per process: each micro-batch of batch_size x world rows is shared out, batch_size rows each.
    batches = sft_micro_batches(recipe, train, world=world, epoch=0)
    row_lengths = [row_widths(train, batch) for batch in batches]
    if recipe.data.packing:
        slots = sum(len(b) for b in batches) * max_length
    else:
        slots = sum(len(rows) * max(rows) for rows in row_lengths)  # collate pads each batch to its longest row
    steps_per_epoch, total_steps = count_steps(recipe, train, world=world, source=str(recipe_path))
    shares = _shares(recipe, train)

    count = memory.count_model(config, recipe.adapter)

    from ftune.train.training import pass_budget, split_passes

    def per_pass(device: str) -> dict:
        """Tokens and loss positions of the largest forward/backward pass on `device`: a process's
        share of a micro-batch, split into passes as training splits it (see training.pass_budget)."""
        budget = pass_budget(recipe, device)
        shares = [batch[:tc.batch_size] for batch in batches]
        passes = [part for share in shares for part in split_passes(share, [max_length] * len(share), budget)]
        rows = max((len(p) for p in passes), default=tc.batch_size)
        # rows are filled (packing) or padded up to max_length at worst
        return {"tokens": rows * max_length, "labelled": _most_labelled(train, passes)}

    return Inspection(
        recipe=recipe, formatter=formatter, train=train, eval=evaluation, report=report,
        rows_per_batch=[len(b) for b in batches], token_slots=slots,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        memory=memory.estimate(recipe, count, **per_pass("cuda"), device="cuda"),
        memory_cpu=memory.estimate(recipe, count, **per_pass("cpu"), device="cpu"), model=count, shares=shares,
    )


def _shares(recipe: Recipe, train: Encoded) -> list[tuple[float | None, float]]:
    """Each train source's planned share (its weight's) and its share of epoch 0's samples as drawn."""
    from ftune.data import mixture
    from ftune.train.steps import epoch_samples

    sources = len(recipe.data.train)
    source_of = train.source if train.source is not None else np.zeros(len(train), np.int16)
    chosen = epoch_samples(recipe, train, 0)
    drawn = mixture.shares(source_of, np.arange(len(train)) if chosen is None else chosen, sources)
    weights = mixture.weights_of(recipe.data)
    planned = [w / sum(weights) for w in weights] if weights else [None] * sources
    return list(zip(planned, drawn))


def _most_labelled(data: Encoded, batches: list[list[list[int]]]) -> int:
    """The most loss positions any micro-batch (or pass) holds (a sample's first token is never a target)."""
    per_sample = data.trained_per_sample()
    return max((int(sum(per_sample[i] for row in batch for i in row)) for batch in batches), default=0)


# --------------------------------------------------------------------------- showing it


def print_inspection(ins: Inspection, console, *, samples: int = 2, gpu_gib: float = 24.0) -> None:
    if not isinstance(ins, Inspection):  # a grpo, dpo or rm recipe's StageInspection
        from ftune.commands.inspect_stages import print_stage

        return print_stage(ins, console, samples=samples, gpu_gib=gpu_gib)
    from rich.table import Table

    from ftune.train.progress import summary_table

    r, recipe = ins.report, ins.recipe
    sources = Table(title="data sources")
    columns = ["source", "format", "rows", "used", "skipped"] + (["removed"] if r.removed_count else [])
    columns += ["share of an epoch"] + (["planned share"] if any(p is not None for p, _ in ins.shares) else [])
    for column in columns:
        sources.add_column(column, justify="left" if column in ("source", "format") else "right")
    for i, s in enumerate(r.sources):
        cells = [s["path"], s["format"], f"{s['rows']:,}", f"{s['used']:,}", f"{s['skipped']:,}"]
        cells += [f"{s.get('removed', 0):,}"] if r.removed_count else []
        planned, drawn = ins.shares[i] if i < len(ins.shares) else (None, None)
        cells += [f"{drawn:.1%}" if drawn is not None else "eval"]
        cells += [f"{planned:.1%}" if planned is not None else ""] if "planned share" in columns else []
        sources.add_row(*cells)
    console.print(sources)
    for line in r.skipped:
        console.print(f"  skipped {line}", highlight=False, markup=False)
    if r.skipped_count > len(r.skipped):
        console.print(f"  ... and {r.skipped_count - len(r.skipped)} more skipped rows", highlight=False)
    for line in r.removed:
        console.print(f"  removed {line}", highlight=False, markup=False)
    if r.removed_count > len(r.removed):
        by_rule = ", ".join(f"{n:,} {rule}" for rule, n in r.removed_by_rule.items())
        console.print(f"  ... and {r.removed_count - len(r.removed)} more removed rows ({by_rule})", highlight=False)

    tc, max_length = recipe.training, recipe.data.max_length
    too_long = r.truncated + r.dropped_too_long
    rows = [
        ("samples (train / eval)", f"{ins.samples:,} ({len(ins.train):,} / {len(ins.eval):,})"),
        (f"longer than {max_length} tokens", (f"{too_long:,} of {ins.samples:,} ({ins.truncated_share:.1%}), "
                                              f"{'truncated' if recipe.data.too_long == 'truncate' else 'dropped'}")),
        ("train tokens (with loss)", f"{len(ins.train.ids):,} ({ins.train.trained_tokens():,} = {ins.loss_token_share:.1%})"),
        ("packed rows" if recipe.data.packing else "padded rows",
         f"{sum(ins.rows_per_batch):,} rows, {len(ins.train.ids):,} tokens in {ins.token_slots:,} slots = {ins.packing_efficiency:.1%} filled"),
        ("tokens per step", (f"{tc.batch_size} rows x {max_length} tokens x {tc.gradient_accumulation_steps} accumulation"
                             f" x {recipe.distributed.num_processes} process{'es' if recipe.distributed.num_processes > 1 else ''}"
                             f" = {ins.tokens_per_step:,} slots")),
        ("steps", f"{ins.steps_per_epoch:,} per epoch; {ins.total_steps:,} in all"
                  + (" (max_steps)" if tc.max_steps else f" ({tc.epochs:g} epochs)")),
    ]
    if r.dropped_no_loss:
        rows.append(("dropped (no answer tokens left)", f"{r.dropped_no_loss:,}"))
    count = ins.model
    rows.append(("trainable parameters", f"{count.trainable:,} ({recipe.adapter.method}; "
                                         f"{100 * count.trainable / max(count.params, 1):.3f}% of the base model's {count.params:,})"))
    if r.audit:
        a = r.audit
        rows.append(("end-of-turn audit", (f"'{a['end_of_turn']}' (id {a['end_of_turn_id']}) carries loss in "
                                            f"{a['answers_ending_trained']} of {a['answers_ending']} answers "
                                            f"({a['samples_checked']} samples checked)")))
    if r.render_proof:
        p = r.render_proof
        verdict = "trained as inference renders them" if not p["mismatched"] else f"{p['mismatched']} DIFFER from inference"
        rows.append(("render proof", f"{p['turns']:,} assistant turns in {p['conversations']:,} conversations: {verdict}"))
    console.print(summary_table("what training will see", rows))
    for m in (r.render_proof or {}).get("mismatches", []):
        console.print(f"  [red]render proof[/]: {m['place']}, assistant turn messages[{m['turn']}]: {m['detail']}",
                      highlight=False)
    console.print("[bold]token lengths[/] (train and eval samples, after data.too_long)", highlight=False)
    lengths = np.concatenate([ins.train.lengths(), ins.eval.lengths()])
    for line in histogram(lengths, max_length):
        console.print(line, highlight=False, markup=False)

    print_memory(ins.memory, console, gpu_gib=gpu_gib)
    console.print(f"  on a CPU (float32, no CUDA context): {memory.gib(ins.memory_cpu.total)}", highlight=False)
    if samples and r.examples:
        console.print(f"\n[bold]samples[/]: [{TRAINED}]trained (carries loss)[/], [{MASKED}]masked[/], "
                      f"[reverse]special tokens[/], ↵ newlines; [{TAG}]{' '.join(KIND_TAGS.values())}[/] mark where "
                      "those begin", highlight=False)
        for i, example in enumerate(r.examples[:samples]):
            trained = sum(label != IGNORE for label in example["labels"][1:])
            console.rule(f"train sample {i} ({example['place']}): {len(example['ids'])} tokens, {trained} trained")
            console.print(render_sample(example["ids"], example["labels"], ins.formatter.tokenizer,
                                        kinds=[KINDS[k] for k in example["kinds"]]))
    elif samples:
        console.print(f"\n[bold]samples[/]: [{TRAINED}]trained (carries loss)[/], [{MASKED}]masked[/], "
                      f"[reverse]special tokens[/], ↵ newlines", highlight=False)
        for i in range(min(samples, len(ins.train))):
            ids, labels = ins.train.sample(i)
            trained = int((labels[1:] != IGNORE).sum())
            console.rule(f"train sample {i}: {len(ids)} tokens, {trained} trained")
            console.print(render_sample(ids, labels, ins.formatter.tokenizer))


def histogram(lengths, max_length: int, bins: int = HISTOGRAM_BINS, width: int = BAR_WIDTH) -> list[str]:
    """Text bars of sample lengths in equal bins from 1 to max_length; the top bin counts samples at max_length."""
    lengths = np.asarray(lengths)
    if not len(lengths):
        return ["  (no samples)"]
    edges = np.linspace(0, max_length, bins + 1).round().astype(int)
    ranges = list(itertools.pairwise(edges))
    counts = [int(((lengths > lo) & (lengths <= hi)).sum()) for lo, hi in ranges]
    at_max = int((lengths >= max_length).sum())
    most = max(counts) or 1
    lines = []
    for (lo, hi), n in zip(ranges, counts, strict=True):
        bar = "█" * round(width * n / most)
        lines.append(f"  {lo + 1:>6}-{hi:<6} {bar:<{width}} {n:,}")
    if at_max:
        lines.append(f"  {at_max:,} at max_length {max_length} (cut to it, or exactly that long)")
    lines.append(f"  min {lengths.min():,}, median {int(np.median(lengths)):,}, max {lengths.max():,}")
    return lines

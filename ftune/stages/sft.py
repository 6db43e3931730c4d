"""`ftune sft RECIPE`: supervised fine-tuning, the whole story on one screen.

Data: every sample rendered with the chat template, labelled on its answer tokens only, and
audited (prepare_sft, cached); samples are packed into rows of max_length. A step: each
micro-batch of rows is split into passes of at most `training.tokens_per_pass` tokens; a
pass's loss is the summed cross-entropy of its answer tokens, and the step's loss is the mean
over all of them. Evaluation: the same loss (and perplexity) on the held-out samples.
train/loop.py's `fit` does the rest: model, optimizer, resume, the steps, checkpoints, outputs.
"""

from __future__ import annotations

from pathlib import Path

from ftune.data.packing import collate
from ftune.data.pipeline import prepare_sft
from ftune.data.rendering import IGNORE
from ftune.modeling import models
from ftune.recipe import Recipe
from ftune.train import loop, steps, training
from ftune.train.stage import Data, Loss, Pass, Setup, Step


def load_data(recipe: Recipe, tokenizer, formatter, base_dir: Path, smoke: bool) -> Data:
    train, held_out, report = prepare_sft(recipe, tokenizer, formatter, base_dir=base_dir, cache_root=models.cache_dir() / "data")
    return Data(train, held_out, report)


def show_data(data: Data, say) -> None:
    report, train = data.report, data.train
    rows = [("train / eval samples", f"{len(train)} / {len(data.eval)}"),
            ("train tokens (with loss)", f"{len(train.ids):,} ({train.trained_tokens():,})")]
    if report.truncated or report.dropped_too_long:
        rows.append(("too long", f"{report.truncated} truncated, {report.dropped_too_long} dropped"))
    if report.dropped_no_loss:
        rows.append(("dropped (no answer tokens left)", str(report.dropped_no_loss)))
    if report.removed_count:
        rows.append(("removed (data.dedup, data.filters)", ", ".join(f"{n} {rule}" for rule, n in report.removed_by_rule.items())))
    if report.audit:
        audit = report.audit
        rows.append(("end-of-turn audit", f"'{audit['end_of_turn']}' trained in {audit['answers_ending_trained']} of {audit['answers_ending']} answers"))
    if report.render_proof:  # data.render_check: warn lets a mismatch through; it is shown, never hidden
        proof = report.render_proof
        rows.append(("render proof", f"{proof['turns']} assistant turns checked, "
                     + (f"{proof['mismatched']} differ from inference" if proof["mismatched"] else "all as inference renders them")))
    loop.show_report("data", report, rows, say)
    for m in (report.render_proof or {}).get("mismatches", []):
        say(f"  render proof: {m['place']}, assistant turn messages[{m['turn']}]: {m['detail']}", highlight=False, markup=False)


def start(setup: Setup) -> Step:
    recipe, train = setup.recipe, setup.data.train
    pad_id, device = setup.tokenizer.pad_token_id, setup.ctx.device

    def passes(micro_batches: list[list[list[int]]]) -> list[Pass]:
        """Each micro-batch of rows in passes of at most `setup.budget` tokens; a pass counts its answer tokens."""
        parts = [rows for micro_batch in micro_batches
                 for rows in training.split_passes(micro_batch, steps.row_widths(train, micro_batch), setup.budget)]
        batches = [training.move(collate(train, rows, pad_id, packed=recipe.data.packing), device) for rows in parts]
        return [Pass(batch, int((batch["targets"] != IGNORE).sum())) for batch in batches]

    def loss(batch: dict) -> Loss:
        return Loss(training.sft_loss_sum(setup.scorer, batch)[0])

    def evaluate() -> dict | None:
        return training.sft_eval(setup.scorer, setup.data.eval, recipe=recipe, pad_id=pad_id, device=device, stop=setup.stop)

    return Step(passes, loss, evaluate)


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    return loop.fit(recipe_path, overrides, smoke=smoke, resume=resume, overwrite=overwrite,
                    stage="sft", unit="samples", rate="tokens", smoke_size=16,
                    data=load_data, show=show_data, micro_batches=steps.sft_micro_batches, start=start)

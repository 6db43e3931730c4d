"""`ftune sft RECIPE`: supervised fine-tuning, read top to bottom.

Set up (recipe, run directory, tokenizer, data, model, optimizer), maybe resume, train
with packed batches and loss on answer tokens only, evaluate, save atomically.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from ftune import models, outputs, training
from ftune.data.chat import make_formatter
from ftune.data.packing import collate, micro_batches
from ftune.data.pipeline import prepare_sft
from ftune.errors import FtuneError
from ftune.progress import Reporter, console, plot_losses, summary_table, truncate_metrics
from ftune.recipe import load_recipe, recipe_to_yaml

SMOKE_TRAIN, SMOKE_EVAL, SMOKE_STEPS = 16, 4, 3


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    models.quiet_libraries()
    if recipe.stage != "sft":
        raise FtuneError(f"this recipe is for stage '{recipe.stage}'; run it with `ftune {recipe.stage}`", place=str(recipe_path))
    base_dir = recipe_path.parent.resolve()
    run_dir = outputs.output_dir(recipe.output.dir, base_dir, smoke)
    resume_from = outputs.prepare_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite or smoke)
    training.seed_everything(recipe.training.seed)

    # Tokenizer and data: every sample rendered, labelled on answer tokens, and audited.
    model_path = models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
    tokenizer = models.load_tokenizer(model_path, trust_remote_code=recipe.base_model.trust_remote_code)
    formatter = make_formatter(tokenizer, chat_template=recipe.data.chat_template,
                               system_prompt=recipe.data.system_prompt, train_on=recipe.data.train_on)
    train_set, eval_set, report = prepare_sft(recipe, tokenizer, formatter, base_dir=base_dir,
                                              cache_root=models.cache_dir() / "data")
    if smoke:
        train_set, eval_set = _head(train_set, SMOKE_TRAIN), _head(eval_set, SMOKE_EVAL)
    print_data_report(report, train_set, eval_set)

    # Model, adapter, optimizer and schedule.
    dtype = models.pick_dtype(recipe.base_model.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = training.build_model(recipe, model_path, dtype)
    if not recipe.quantization.load_in_4bit:
        model.to(device)
    trainable, total = training.count_parameters(model)
    tc = recipe.training
    steps_per_epoch, total_steps = count_steps(recipe, train_set, smoke=smoke)
    optimizer = training.make_optimizer(tc, model)
    scheduler = training.make_scheduler(tc, optimizer, total_steps)
    # e.g. 4 rows x 256 tokens x 1 accumulation = 1,024 token slots per optimizer step.
    console.print(
        f"model: {recipe.base_model.name} ({dtype}, {device}{', 4-bit NF4' if recipe.quantization.load_in_4bit else ''}); "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)\n"
        f"steps: {total_steps} ({steps_per_epoch} per epoch; {tc.batch_size} rows x {recipe.data.max_length} tokens "
        f"x {tc.gradient_accumulation_steps} accumulation = {tc.batch_size * recipe.data.max_length * tc.gradient_accumulation_steps:,} "
        f"token slots per step)", highlight=False,
    )

    step, epoch, batch_index = 0, 0, 0
    if resume_from is not None:
        state = training.load_checkpoint(resume_from, model, optimizer, scheduler)
        step, epoch, batch_index = state["step"], state["position"]["epoch"], state["position"]["batch"]
        truncate_metrics(run_dir, step)
        console.print(f"resumed from {resume_from} at step {step}")
    outputs.write_run_json(run_dir, recipe, model_path, dtype, status="running", step=step)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")

    # The loop. Loss is the mean over every answer token in the optimizer step, however
    # the tokens fall into micro-batches, so accumulation does not change the result.
    model.train()
    started, trained_tokens = time.perf_counter(), 0
    with training.StopRequest() as stop, Reporter(run_dir, total_steps, start_step=step, report_to=tc.report_to,
                                                  recipe_dict=json.loads(recipe.model_dump_json())) as reporter:
        if step == 0 and tc.eval_steps and len(eval_set):
            reporter.log(0, evaluate(model, eval_set, recipe, tokenizer.pad_token_id, device))  # the baseline
        while step < total_steps:
            batches = micro_batches(train_set, max_length=recipe.data.max_length, batch_size=tc.batch_size,
                                    packed=recipe.data.packing, seed=tc.seed, epoch=epoch)
            usable = len(batches) - len(batches) % tc.gradient_accumulation_steps
            while batch_index < usable and step < total_steps:
                group = [training.move(collate(train_set, rows, tokenizer.pad_token_id, packed=recipe.data.packing), device)
                         for rows in batches[batch_index: batch_index + tc.gradient_accumulation_steps]]
                count = sum(int((b["targets"] != -100).sum()) for b in group)
                loss_total = 0.0
                for batch in group:
                    loss_sum, _ = training.sft_loss_sum(model, batch)
                    (loss_sum / count).backward()
                    loss_total += float(loss_sum.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_index += tc.gradient_accumulation_steps
                trained_tokens += count
                if step % tc.logging_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - started
                    reporter.log(step, {"loss": loss_total / count, "lr": scheduler.get_last_lr()[0],
                                        "grad_norm": float(grad_norm), "epoch": epoch + batch_index / max(usable, 1),
                                        "tokens_per_s": trained_tokens / elapsed})
                if tc.eval_steps and step % tc.eval_steps == 0 and step < total_steps and len(eval_set):
                    reporter.log(step, evaluate(model, eval_set, recipe, tokenizer.pad_token_id, device))
                position = {"epoch": epoch, "batch": batch_index}
                if stop or (tc.save_steps and step % tc.save_steps == 0 and step < total_steps):
                    path = training.save_checkpoint(run_dir, step, model, optimizer, scheduler, position, tc.save_total_limit)
                    if stop:
                        outputs.write_run_json(run_dir, recipe, model_path, dtype, status="interrupted", step=step)
                        raise outputs.Interrupted("sft", step, path, recipe_path, overrides)
            if step < total_steps:
                epoch, batch_index = epoch + 1, 0
        final_eval = evaluate(model, eval_set, recipe, tokenizer.pad_token_id, device) if len(eval_set) else {}
        if final_eval:
            reporter.log(step, final_eval)
        elapsed = time.perf_counter() - started

    # Outputs: adapter (or model) and tokenizer, written aside and renamed into place.
    outputs.save_trained(model, tokenizer, formatter, run_dir, recipe)
    samples = outputs.generate_samples(model, tokenizer, formatter, recipe, device)
    outputs.write_eval_prompts(run_dir, tokenizer, eval_set)
    plot_losses(run_dir, run_dir / "loss.png")
    summary = {"steps": step, "train_seconds": round(elapsed, 1), "trained_tokens_per_s": round(trained_tokens / max(elapsed, 1e-9), 1),
               "final_train_loss": reporter.last_train.get("loss"), **{k: v for k, v in final_eval.items()}}
    outputs.write_run_card(run_dir, recipe, report, summary, samples)
    outputs.write_run_json(run_dir, recipe, model_path, dtype, status="completed", step=step, summary=summary)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    console.print(summary_table("sft finished", [(k, str(v)) for k, v in summary.items()] + [("run", str(run_dir))]))
    return run_dir


def count_steps(recipe, train_set, *, smoke: bool = False) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for this training set; `ftune inspect` shows the same."""
    tc = recipe.training
    batches_per_epoch = len(micro_batches(train_set, max_length=recipe.data.max_length, batch_size=tc.batch_size,
                                          packed=recipe.data.packing, seed=tc.seed, epoch=0))
    steps_per_epoch = max(1, batches_per_epoch // tc.gradient_accumulation_steps)
    return steps_per_epoch, SMOKE_STEPS if smoke else tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)


def _head(data, n: int):
    from ftune.data.packing import Encoded

    n = min(n, len(data))
    end = data.offsets[n]
    return Encoded(data.ids[:end], data.labels[:end], data.offsets[: n + 1])


def print_data_report(report, train_set, eval_set) -> None:
    rows = [(s["path"], f"{s['used']} rows used of {s['rows']} ({s['format']}), {s['skipped']} skipped") for s in report.sources]
    rows.append(("train / eval samples", f"{len(train_set)} / {len(eval_set)}"))
    rows.append(("train tokens (with loss)", f"{len(train_set.ids):,} ({train_set.trained_tokens():,})"))
    if report.truncated or report.dropped_too_long:
        rows.append(("too long", f"{report.truncated} truncated, {report.dropped_too_long} dropped"))
    if report.dropped_no_loss:
        rows.append(("dropped (no answer tokens left)", str(report.dropped_no_loss)))
    if report.audit:
        rows.append(("end-of-turn audit", f"'{report.audit['end_of_turn']}' trained in {report.audit['answers_ending_trained']} of {report.audit['answers_ending']} answers"))
    console.print(summary_table("data", rows))
    for line in report.skipped:
        console.print(f"  skipped {line}", highlight=False)


@torch.no_grad()
def evaluate(model, eval_set, recipe, pad_id: int, device) -> dict:
    """Held-out loss (mean over answer tokens) and perplexity."""
    model.eval()
    total, count = 0.0, 0
    limit = recipe.evaluation.max_eval_samples
    data = _head(eval_set, limit) if limit else eval_set
    for rows in micro_batches(data, max_length=recipe.data.max_length, batch_size=recipe.training.batch_size,
                              packed=recipe.data.packing, seed=0, epoch=0):
        loss_sum, n = training.sft_loss_sum(model, training.move(collate(data, rows, pad_id, packed=recipe.data.packing), device))
        total += float(loss_sum)
        count += n
    model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}

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

from ftune import attention, distributed, models, outputs, training
from ftune.data.chat import IGNORE, make_formatter
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
    if recipe.distributed.num_processes > 1 and not distributed.is_launched():
        return outputs.launch_distributed("sft", recipe, recipe_path, overrides, run_dir, base_dir, smoke=smoke, resume=resume, overwrite=overwrite)
    ctx = distributed.Context()
    plan = outputs.plan_for(run_dir, recipe, resume=resume, overwrite=overwrite or smoke)
    resume_from = plan.resume_from
    training.seed_everything(recipe.training.seed)
    say = console.print if ctx.is_main else (lambda *a, **k: None)

    # Tokenizer and data: every sample rendered, labelled on answer tokens, and audited.
    model_path = models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
    tokenizer = models.load_tokenizer(model_path, trust_remote_code=recipe.base_model.trust_remote_code)
    formatter = make_formatter(tokenizer, chat_template=recipe.data.chat_template,
                               system_prompt=recipe.data.system_prompt, train_on=recipe.data.train_on)
    train_set, eval_set, report = prepare_sft(recipe, tokenizer, formatter, base_dir=base_dir,
                                              cache_root=models.cache_dir() / "data")
    if smoke:
        train_set, eval_set = train_set.head(SMOKE_TRAIN), eval_set.head(SMOKE_EVAL)
    if ctx.is_main:
        print_data_report(report, train_set, eval_set)

    # Model, adapter, optimizer and schedule; accelerate wraps the scorer for DDP/FSDP.
    dtype = models.pick_dtype(recipe.base_model.dtype)
    device = ctx.device
    model = training.build_model(recipe, model_path, dtype)
    if not recipe.quantization.load_in_4bit:
        model.to(device)
    if ctx.is_main:
        outputs.start_run_dir(run_dir, plan)  # data and model are good: only now is anything written
        outputs.save_initial_adapter(model, run_dir, recipe)
    ctx.barrier()
    trainable, total = training.count_parameters(model)
    tc = recipe.training
    steps_per_epoch, total_steps = count_steps(recipe, train_set, smoke=smoke, world=ctx.world)
    optimizer = training.make_optimizer(tc, model)
    scheduler = training.make_scheduler(tc, optimizer, total_steps)
    scorer, optimizer = ctx.accelerator.prepare(training.TokenLogProbs(model), optimizer)
    rows_per_step = tc.batch_size * tc.gradient_accumulation_steps * ctx.world
    budget = training.pass_budget(recipe, device)
    # e.g. 4 rows x 256 tokens x 1 accumulation x 1 process = 1,024 token slots per optimizer step.
    say(
        f"model: {recipe.base_model.name} ({dtype}, {device}{', 4-bit NF4' if recipe.quantization.load_in_4bit else ''}); "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)\n"
        f"steps: {total_steps} ({steps_per_epoch} per epoch; {tc.batch_size} rows x {recipe.data.max_length} tokens "
        f"x {tc.gradient_accumulation_steps} accumulation x {ctx.world} process{'es' if ctx.world > 1 else ''} = "
        f"{rows_per_step * recipe.data.max_length:,} token slots per step"
        + (f", in passes of at most {budget:,} tokens" if budget and budget < tc.batch_size * recipe.data.max_length else "")
        + ")", highlight=False,
    )

    step, epoch, batch_index = 0, 0, 0
    if resume_from is not None:
        state = training.load_checkpoint(resume_from, model, optimizer, scheduler, rank=ctx.rank)
        step, epoch, batch_index = state["step"], state["position"]["epoch"], state["position"]["batch"]
        if ctx.is_main:
            truncate_metrics(run_dir, step)
        say(f"resumed from {resume_from} at step {step}")
    if ctx.is_main:
        outputs.write_run_json(run_dir, recipe, model_path, dtype, status="running", step=step)
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")

    # The loop. Loss is the mean over every answer token in the optimizer step, however
    # the tokens fall into micro-batches and processes, so neither accumulation nor the
    # number of processes changes the result. Each process takes its share of every
    # micro-batch's rows; DDP averages gradients, hence ctx.loss_scale.
    scorer.train()
    eval_args = dict(recipe=recipe, pad_id=tokenizer.pad_token_id, device=device)
    started, trained_tokens = time.perf_counter(), 0
    with training.StopRequest() as stop, Reporter(run_dir, total_steps, start_step=step, report_to=tc.report_to, enabled=ctx.is_main,
                                                  recipe_dict=json.loads(recipe.model_dump_json())) as reporter:
        if step == 0 and tc.eval_steps and len(eval_set):
            reporter.log(0, evaluate(scorer, eval_set, **eval_args))  # the baseline
        while step < total_steps:
            batches = ctx.shard(micro_batches(train_set, max_length=recipe.data.max_length, batch_size=tc.batch_size * ctx.world,
                                              packed=recipe.data.packing, seed=tc.seed, epoch=epoch), tc.batch_size)
            usable = len(batches) - len(batches) % tc.gradient_accumulation_steps
            while batch_index < usable and step < total_steps:
                passes = [training.move(collate(train_set, rows, tokenizer.pad_token_id, packed=recipe.data.packing), device)
                          for micro_batch in batches[batch_index: batch_index + tc.gradient_accumulation_steps]
                          for rows in training.split_passes(micro_batch, row_widths(train_set, micro_batch), budget)]
                count = ctx.sum(sum(int((b["targets"] != IGNORE).sum()) for b in passes))
                loss_total = 0.0
                for i, batch in enumerate(passes):
                    with ctx.accumulating(scorer, last=i == len(passes) - 1):
                        loss_sum, _ = training.sft_loss_sum(scorer, batch)
                        ctx.accelerator.backward(loss_sum * (ctx.loss_scale(tc.gradient_accumulation_steps) / count))
                    loss_total += float(loss_sum.detach())
                grad_norm = ctx.accelerator.clip_grad_norm_(scorer.parameters(), tc.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_index += tc.gradient_accumulation_steps
                trained_tokens += count
                loss_total = ctx.sum(loss_total)
                if step % tc.logging_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - started
                    reporter.log(step, {"loss": loss_total / count, "lr": scheduler.get_last_lr()[0],
                                        "grad_norm": float(grad_norm), "epoch": epoch + batch_index / max(usable, 1),
                                        "tokens_per_s": trained_tokens / elapsed})
                if tc.eval_steps and step % tc.eval_steps == 0 and step < total_steps and len(eval_set):
                    reporter.log(step, evaluate(scorer, eval_set, **eval_args))
                stopping = ctx.sum(1 if stop else 0) > 0  # every process stops at the same step
                if stopping or (tc.save_steps and step % tc.save_steps == 0 and step < total_steps):
                    path = training.save_checkpoint(run_dir, step, model, optimizer, scheduler, {"epoch": epoch, "batch": batch_index},
                                                    tc.save_total_limit, ctx=ctx)
                    if stopping:
                        if ctx.is_main:
                            outputs.write_run_json(run_dir, recipe, model_path, dtype, status="interrupted", step=step)
                        raise outputs.Interrupted("sft", step, path, recipe_path, overrides)
            if step < total_steps:
                epoch, batch_index = epoch + 1, 0
        final_eval = evaluate(scorer, eval_set, **eval_args) if len(eval_set) else {}
        if final_eval:
            reporter.log(step, final_eval)
        elapsed = time.perf_counter() - started

    # Outputs (main process): adapter (or model) and tokenizer, written aside and renamed into place.
    if ctx.is_main:
        model = ctx.accelerator.unwrap_model(scorer).model
        attention.disable(model)  # generation and saving use transformers' own attention
        outputs.save_trained(model, tokenizer, formatter, run_dir, recipe)
        samples = outputs.generate_samples(model, tokenizer, formatter, recipe, device)
        outputs.write_eval_prompts(run_dir, tokenizer, eval_set)
        plot_losses(run_dir, run_dir / "loss.png")
        summary = {"steps": step, "processes": ctx.world, "train_seconds": round(elapsed, 1),
                   "trained_tokens_per_s": round(trained_tokens / max(elapsed, 1e-9), 1),
                   "final_train_loss": reporter.last_train.get("loss"), **final_eval}
        outputs.write_run_card(run_dir, recipe, report, summary, samples)
        outputs.write_run_json(run_dir, recipe, model_path, dtype, status="completed", step=step, summary=summary)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        console.print(summary_table("sft finished", [(k, str(v)) for k, v in summary.items()] + [("run", str(run_dir))]))
    ctx.barrier()
    return run_dir


def row_widths(data, rows: list[list[int]]) -> list[int]:
    """Tokens in each row of a micro-batch (a row holds one sample, or several packed)."""
    lengths = data.lengths()
    return [int(sum(lengths[i] for i in row)) for row in rows]


def count_steps(recipe, train_set, *, smoke: bool = False, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for this training set; `ftune inspect` shows the same."""
    tc = recipe.training
    batches = micro_batches(train_set, max_length=recipe.data.max_length, batch_size=tc.batch_size * world,
                            packed=recipe.data.packing, seed=tc.seed, epoch=0)
    batches_per_epoch = len(batches) if world == 1 else sum(len(b) >= world * tc.batch_size for b in batches)
    steps_per_epoch = max(1, batches_per_epoch // tc.gradient_accumulation_steps)
    return steps_per_epoch, SMOKE_STEPS if smoke else tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)


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
def evaluate(scorer, eval_set, *, recipe, pad_id: int, device) -> dict:
    """Held-out loss (mean over answer tokens) and perplexity.

    Every process evaluates the whole (small) eval set, so all of them run the same
    forwards, as FSDP requires, and agree on the result without communicating.
    """
    scorer.eval()
    total, count = 0.0, 0
    limit = recipe.evaluation.max_eval_samples
    data = eval_set.head(limit) if limit else eval_set
    for rows in micro_batches(data, max_length=recipe.data.max_length, batch_size=recipe.training.batch_size,
                              packed=recipe.data.packing, seed=0, epoch=0):
        loss_sum, n = training.sft_loss_sum(scorer, training.move(collate(data, rows, pad_id, packed=recipe.data.packing), device))
        total += float(loss_sum)
        count += n
    scorer.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}

"""`ftune dpo RECIPE`: preference tuning (DPO, IPO, SimPO, CPO, ORPO, KTO), read top to bottom.

Set up (recipe, run directory, the SFT run it continues, data, model), compute the
reference model's log-probabilities once, then train on packed chosen/rejected pairs.

The reference is the model as training starts: the SFT model when `init_from` names an SFT
run, else the base (a fresh LoRA adapter changes nothing until trained). Its log-probs are
computed once, before the first step, and saved with the run, so no second copy of the
model is ever held and a resumed run uses the same reference.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from ftune import attention, distributed, models, outputs, training
from ftune.data.chat import make_formatter
from ftune.data.pipeline import load_samples
from ftune.errors import FtuneError
from ftune.preference import REFERENCE_FREE, PairSet, encode_pairs, preference_loss, reward_metrics, sequence_logps
from ftune.progress import Reporter, console, plot_losses, summary_table, truncate_metrics
from ftune.recipe import load_recipe, recipe_to_yaml
from ftune.runs import ADAPTER_DIR, atomic_file, read_run

SMOKE_PAIRS, SMOKE_EVAL, SMOKE_STEPS = 8, 4, 3
REFERENCE_FILE = "reference_logps.safetensors"


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    models.quiet_libraries()
    if recipe.stage != "dpo":
        raise FtuneError(f"this recipe is for stage '{recipe.stage}'; run it with `ftune {recipe.stage}`", place=str(recipe_path))
    pref, tc = recipe.preference, recipe.training
    base_dir = recipe_path.parent.resolve()
    run_dir = outputs.output_dir(recipe.output.dir, base_dir, smoke)
    if recipe.distributed.num_processes > 1 and not distributed.is_launched():
        return outputs.launch_distributed("dpo", recipe, recipe_path, overrides, run_dir, base_dir, smoke=smoke, resume=resume, overwrite=overwrite)
    ctx = distributed.Context()
    plan = outputs.plan_for(run_dir, recipe, resume=resume, overwrite=overwrite or smoke)
    resume_from = plan.resume_from
    training.seed_everything(tc.seed)
    say = console.print if ctx.is_main else (lambda *a, **k: None)

    # The SFT run this continues (if any) fixes the base model and the starting adapter.
    init_adapter, model_path = None, None
    if pref.init_from:
        init_adapter, model_path = sft_run_inputs(Path(pref.init_from) if Path(pref.init_from).is_absolute() else base_dir / pref.init_from, recipe)
    model_path = model_path or models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
    tokenizer = models.load_tokenizer(str(init_adapter or model_path), trust_remote_code=recipe.base_model.trust_remote_code)
    formatter = make_formatter(tokenizer, chat_template=recipe.data.chat_template, system_prompt=recipe.data.system_prompt)

    # Pairs: prompt + chosen and prompt + rejected, labelled on the final answer only.
    train_rows, eval_rows, report, _ = load_samples(recipe.data, base_dir=base_dir, seed=tc.seed, allowed={"preference", "kto"})
    if smoke:
        train_rows.samples, eval_rows.samples = train_rows.samples[:SMOKE_PAIRS], eval_rows.samples[:SMOKE_EVAL]
    encode = dict(method=pref.method, max_length=recipe.data.max_length, max_prompt_length=pref.max_prompt_length, report=report)
    train_set = encode_pairs(formatter, train_rows.samples, **encode)
    eval_set = encode_pairs(formatter, eval_rows.samples, **encode)
    if len(train_set) == 0:
        raise FtuneError("no usable preference pairs", hint="check data.max_length and the rows reported above")
    unit = "examples" if pref.method == "kto" else "pairs"
    say(summary_table("preference data", [
        *[(s["path"], f"{s['used']} rows used of {s['rows']} ({s['format']}), {s['skipped']} skipped") for s in report.sources],
        (f"train / eval {unit}", f"{len(train_set)} / {len(eval_set)}"),
        ("too long", f"{report.truncated} truncated, {report.dropped_too_long} dropped"),
    ]))
    for line in report.skipped:
        say(f"  skipped {line}", highlight=False)

    dtype = models.pick_dtype(recipe.base_model.dtype)
    device = ctx.device
    model = training.build_model(recipe, model_path, dtype, adapter_from=init_adapter)
    if not recipe.quantization.load_in_4bit:
        model.to(device)
    if ctx.is_main:
        outputs.start_run_dir(run_dir, plan)  # data and model are good: only now is anything written
        outputs.save_initial_adapter(model, run_dir, recipe)
    ctx.barrier()
    trainable, total = training.count_parameters(model)
    per_step = tc.batch_size * tc.gradient_accumulation_steps * ctx.world
    steps_per_epoch = max(1, len(train_set) // per_step)
    total_steps = SMOKE_STEPS if smoke else tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    optimizer = training.make_optimizer(tc, model)
    scheduler = training.make_scheduler(tc, optimizer, total_steps)
    scorer, optimizer = ctx.accelerator.prepare(training.TokenLogProbs(model), optimizer)
    # KTO's KL baseline is a mean over the micro-batch: split into passes, it would change.
    budget = None if pref.method == "kto" else training.pass_budget(recipe, device)
    say(
        f"{pref.method} (beta {pref.beta}) from {'the SFT run ' + pref.init_from if pref.init_from else recipe.base_model.name}; "
        f"trainable {trainable:,} of {total:,} parameters\nsteps: {total_steps} ({steps_per_epoch} per epoch; "
        f"{tc.batch_size} {unit} x {tc.gradient_accumulation_steps} accumulation x {ctx.world} process(es) = {per_step} {unit} per step)", highlight=False,
    )

    # The reference: log-probs of the starting model, computed once and kept with the run.
    batches = dict(max_length=recipe.data.max_length, pad_id=tokenizer.pad_token_id, device=device, batch_size=tc.batch_size)
    reference = None
    if pref.method not in REFERENCE_FREE:
        reference = load_reference(run_dir) if resume_from is not None else None
        if reference is None:
            reference = {"train": all_logps(scorer, train_set, **batches), "eval": all_logps(scorer, eval_set, **batches)}
            if ctx.is_main:
                save_reference(run_dir, reference)

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

    # The loop: each micro-batch packs its pairs' chosen and rejected sequences together;
    # the loss is the mean over every pair in the optimizer step, across processes too
    # (DDP averages gradients over processes, hence ctx.loss_scale).
    scorer.train()
    started = time.perf_counter()
    pairs_seen = 0
    with training.StopRequest() as stop, Reporter(run_dir, total_steps, start_step=step, report_to=tc.report_to,
                                                  enabled=ctx.is_main, recipe_dict=json.loads(recipe.model_dump_json())) as reporter:
        if step == 0 and tc.eval_steps and len(eval_set):
            reporter.log(0, evaluate(scorer, eval_set, reference, pref, **batches))
        while step < total_steps:
            order = ctx.shard(epoch_order(len(train_set), tc.batch_size * ctx.world, tc.seed, epoch), tc.batch_size)
            usable = len(order) - len(order) % tc.gradient_accumulation_steps
            while batch_index < usable and step < total_steps:
                group = order[batch_index: batch_index + tc.gradient_accumulation_steps]
                n_pairs = ctx.sum(sum(len(mb) for mb in group))
                loss_total, metrics = 0.0, []
                passes = [part for pairs in group for part in training.split_passes(pairs, pair_sizes(train_set, pairs), budget, padded=False)]
                for i, pairs in enumerate(passes):
                    with ctx.accumulating(scorer, last=i == len(passes) - 1):
                        losses, rewards = pair_losses(scorer, train_set, pairs, reference and reference["train"], pref, **batches)
                        ctx.accelerator.backward(losses.sum() * (ctx.loss_scale(tc.gradient_accumulation_steps) / n_pairs))
                    loss_total += float(losses.detach().sum())
                    metrics.append((len(pairs), reward_metrics(rewards)))
                grad_norm = ctx.accelerator.clip_grad_norm_(scorer.parameters(), tc.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_index += tc.gradient_accumulation_steps
                pairs_seen += n_pairs
                loss_total = ctx.sum(loss_total)
                local = weighted(metrics)
                local_pairs = sum(count for count, _ in metrics)
                step_metrics = {k: ctx.sum(v * local_pairs) / n_pairs for k, v in local.items()}
                if step % tc.logging_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - started
                    reporter.log(step, {"loss": loss_total / n_pairs, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                        **step_metrics, "pairs_per_s": pairs_seen / elapsed})
                if tc.eval_steps and step % tc.eval_steps == 0 and step < total_steps and len(eval_set):
                    reporter.log(step, evaluate(scorer, eval_set, reference, pref, **batches))
                stopping = ctx.sum(1 if stop else 0) > 0  # every process stops at the same step
                if stopping or (tc.save_steps and step % tc.save_steps == 0 and step < total_steps):
                    path = training.save_checkpoint(run_dir, step, model, optimizer, scheduler, {"epoch": epoch, "batch": batch_index},
                                                    tc.save_total_limit, ctx=ctx)
                    if stopping:
                        if ctx.is_main:
                            outputs.write_run_json(run_dir, recipe, model_path, dtype, status="interrupted", step=step)
                        raise outputs.Interrupted("dpo", step, path, recipe_path, overrides)
            if step < total_steps:
                epoch, batch_index = epoch + 1, 0
        final_eval = evaluate(scorer, eval_set, reference, pref, **batches) if len(eval_set) else {}
        if final_eval:
            reporter.log(step, final_eval)
        elapsed = time.perf_counter() - started

    if ctx.is_main:
        model = ctx.accelerator.unwrap_model(scorer).model
        attention.disable(model)  # generation and saving use transformers' own attention
        outputs.save_trained(model, tokenizer, formatter, run_dir, recipe)
        samples = outputs.generate_samples(model, tokenizer, formatter, recipe, device)
        plot_losses(run_dir, run_dir / "loss.png")
        summary = {"steps": step, "processes": ctx.world, "train_seconds": round(elapsed, 1),
                   f"{unit}_per_s": round(pairs_seen / max(elapsed, 1e-9), 2), "final_train_loss": reporter.last_train.get("loss"), **final_eval}
        outputs.write_run_card(run_dir, recipe, report, summary, samples)
        outputs.write_run_json(run_dir, recipe, model_path, dtype, status="completed", step=step, summary=summary)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        console.print(summary_table(f"{pref.method} finished", [(k, str(v)) for k, v in summary.items()] + [("run", str(run_dir))]))
    ctx.barrier()
    return run_dir


def sft_run_inputs(run_dir: Path, recipe) -> tuple[Path, str]:
    """The adapter and base model of the SFT run named by `preference.init_from`."""
    meta = read_run(run_dir)
    if meta.get("status") != "completed":
        raise FtuneError(f"preference.init_from: {run_dir} is not a completed run (status: {meta.get('status')})")
    trained_on = meta["base_model"]["name"]
    if trained_on != recipe.base_model.name:
        raise FtuneError(
            f"preference.init_from: {run_dir} was trained on '{trained_on}', but this recipe names base_model '{recipe.base_model.name}'",
            hint=f"set base_model.name: {trained_on}",
        )
    if recipe.adapter.method == "none":
        raise FtuneError("preference.init_from continues an adapter; adapter.method: none cannot")
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise FtuneError(f"preference.init_from: {run_dir} has no adapter to continue from (was it full fine-tuning?)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FtuneError(f"preference.init_from: {adapter} has no adapter_model.safetensors; ftune does not load pickle-based weights")
    return adapter, meta["base_model"]["path"]


def pair_sizes(data: PairSet, pairs: list[int]) -> list[int]:
    """Tokens of each pair (or KTO example): both its sequences, which are packed together."""
    lengths = data.sequences.lengths()
    return [int(lengths[2 * p] + lengths[2 * p + 1]) for p in pairs]


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[b: b + batch_size] for b in range(0, n, batch_size)]


def pair_losses(scorer, data: PairSet, pairs: list[int], reference, pref, *, max_length, pad_id, device, batch_size):
    sequences = [i for p in pairs for i in (2 * p, 2 * p + 1)]
    logps, counts = sequence_logps(scorer, data.sequences, sequences, max_length=max_length, pad_id=pad_id, device=device)
    ref = reference[sequences].to(device) if reference is not None else None
    labels = torch.from_numpy(data.kto_labels[pairs]).to(device) if data.kto_labels is not None else None
    return preference_loss(pref, logps, counts, ref, labels)


@torch.no_grad()
def all_logps(scorer, data: PairSet, *, max_length, pad_id, device, batch_size) -> torch.Tensor:
    scorer.eval()
    out = torch.zeros(len(data.sequences), dtype=torch.float32)
    for start in range(0, len(data.sequences), 2 * batch_size):
        indices = list(range(start, min(start + 2 * batch_size, len(data.sequences))))
        logps, _ = sequence_logps(scorer, data.sequences, indices, max_length=max_length, pad_id=pad_id, device=device)
        out[indices] = logps.float().cpu()
    scorer.train()
    return out


@torch.no_grad()
def evaluate(scorer, data: PairSet, reference, pref, *, max_length, pad_id, device, batch_size) -> dict:
    """Held-out preference loss, reward accuracy and margin (every process evaluates all of it)."""
    scorer.eval()
    total, parts = 0.0, []
    for pairs in epoch_order(len(data), batch_size, 0, 0):
        losses, rewards = pair_losses(scorer, data, pairs, reference and reference["eval"], pref,
                                      max_length=max_length, pad_id=pad_id, device=device, batch_size=batch_size)
        total += float(losses.sum())
        parts.append((len(pairs), reward_metrics(rewards)))
    scorer.train()
    return {"eval_loss": total / len(data), **{f"eval_{k}": v for k, v in weighted(parts).items()}}


def weighted(parts: list[tuple[int, dict]]) -> dict:
    """Average per-micro-batch metrics, weighted by how many pairs each held."""
    n = sum(count for count, _ in parts)
    keys = {k for _, m in parts for k in m}
    return {k: sum(count * m[k] for count, m in parts if k in m) / max(sum(count for count, m in parts if k in m), 1) for k in sorted(keys)} if n else {}


def save_reference(run_dir: Path, reference: dict) -> None:
    from safetensors.torch import save

    with atomic_file(run_dir / REFERENCE_FILE, "wb") as handle:
        handle.write(save({k: v.contiguous() for k, v in reference.items()}))


def load_reference(run_dir: Path) -> dict | None:
    from safetensors.torch import load_file

    path = run_dir / REFERENCE_FILE
    return load_file(path) if path.is_file() else None

"""The one training loop every stage runs: `fit(recipe_path, ..., data=, start=)`.

A stage (sft.py, dpo.py, rm.py) calls `fit` with what differs: a few plain facts (its name, what
its data and its passes count, its --smoke size, the recipe key of an SFT run it continues, its
model's head), its data function and how an epoch is cut into micro-batches, and its `start`,
which, once the model is built, gives its `Step` (stage.py): how a step's micro-batches become
passes, the loss of a pass, its evaluation. The rest is here:

1. the recipe (another stage's is refused), the run directory's plan, a distributed launch;
2. tokenizer and data, and the step plan: a recipe that cannot make one optimizer step is an
   error now, before the model loads; nothing has been written so far;
3. model, adapter, optimizer and schedule; the run directory is written from here on;
4. resume; the steps: passes, accumulation, clipping, logging, eval, checkpoints;
5. the finish: sample answers, adapter saved atomically, eval prompts, loss curve, run card, run.json.

A stop signal before 3 ends the command at once; after it, the loop stops at the next safe
point: a stop after the first step saves a checkpoint to resume from, one before it leaves no
run behind. A NaN or infinite loss or gradient norm ends the run as `failed` at that step,
before the step is applied; the last good checkpoint stays.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.artifacts import lock, ownership, runs
from ftune.data.rendering import Formatter, formatter_for
from ftune.errors import FtuneError
from ftune.guards import usercode
from ftune.modeling import attention, models
from ftune.modeling.reward_model import SequenceRewards
from ftune.recipe import Recipe, load_recipe, recipe_to_yaml
from ftune.train import checkpoints, distributed, outputs, reward_training, steps, training
from ftune.train.progress import Reporter, console, plot_losses, summary_table, truncate_metrics
from ftune.train.stage import Data, Inputs, Setup, Step
from ftune.train.stopping import Diverged, Interrupted, Stopped, StopRequest, ignoring_signals

class _StopAt(Exception):
    """The agreed stop, raised at a safe point of the loop."""


def fit(recipe_path: Path, overrides: Sequence[str] = (), *, smoke: bool = False, resume: bool = False,
        overwrite: bool = False, stage: str, unit: str, rate: str, smoke_size: int,
        data: Callable[[Recipe, Any, Formatter, Path, bool], Data], show: Callable[[Data, Callable], None],
        micro_batches: Callable[..., list], start: Callable[[Setup], Step],
        eval_prompts: Callable[[Any], Iterable[tuple]] | None = None, continues: str | None = None,
        score_head: bool = False, scorer: type | None = None,
        describe: Callable[[Recipe], str] | None = None) -> Path:
    """Train one stage from its recipe (recipe_path .. overwrite: the command's own); returns the run directory.

    stage: the command and the recipe's `stage:`. unit: what training data counts ("samples", "pairs"),
    for step plans and their errors. rate: what a pass's count counts ("tokens"), logged as RATE_per_s.
    smoke_size: --smoke trains on this many items, or as many as one optimizer step needs.
    data(recipe, tokenizer, formatter, base_dir, smoke): the training and held-out sets; show(data, say)
    prints their table. micro_batches(recipe, train, world=, epoch=): an epoch's global micro-batches.
    start(setup): the stage's `Step`, once the model is built. eval_prompts(held-out set): (ids, labels)
    whose prompts go to eval_prompts.jsonl (None: an `Encoded` set's samples). continues: the recipe key
    ("preference.init_from") that may name an SFT run to start from. score_head: a reward model
    (reward_training.build_model), else a causal LM. scorer: the module around the model that accelerate
    wraps (None: SequenceRewards for a score head, else TokenLogProbs). describe(recipe): the model
    line's first words ("dpo (beta 0.1)"); None: the stage's name.
    """
    spec = _Spec(stage, unit, rate, smoke_size, data, show, micro_batches, start,
                 eval_prompts or (lambda held_out: (held_out.sample(i) for i in range(len(held_out)))), continues,
                 score_head, scorer or (SequenceRewards if score_head else training.TokenLogProbs),
                 describe or (lambda recipe: recipe.stage))
    recipe_path = Path(recipe_path)
    with StopRequest() as stop, contextlib.ExitStack() as held:
        held.callback(usercode.close_all)  # the workers of the user's reward functions end with the run
        try:
            return _run(spec, recipe_path, list(overrides), stop, held, smoke=smoke, resume=resume, overwrite=overwrite)
        except KeyboardInterrupt:  # a stop while nothing was written yet
            raise Stopped(stop.signal_name, stage) from None


@dataclass(frozen=True)
class _Spec:
    """`fit`'s arguments about the stage, kept together for the loop's parts (documented on `fit`)."""

    name: str
    unit: str
    rate: str
    smoke_size: int
    data: Callable
    show: Callable
    micro_batches: Callable
    start: Callable
    eval_prompts: Callable
    continues: str | None
    score_head: bool
    scorer: type
    describe: Callable


def _run(stage: _Spec, recipe_path: Path, overrides: list[str], stop: StopRequest, held: contextlib.ExitStack, *,
         smoke: bool, resume: bool, overwrite: bool) -> Path:
    recipe = load_recipe(recipe_path, overrides)
    models.quiet_libraries()
    if recipe.stage != stage.name:
        raise FtuneError(f"this recipe is for stage '{recipe.stage}'; run it with `ftune {recipe.stage}`", place=str(recipe_path))
    if smoke and recipe.data.train[0].weight is not None:
        # --smoke trains on a few samples of each source: its mixture draws them with replacement.
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"replacement": True, "epoch_samples": None})})
    tc = recipe.training
    base_dir = recipe_path.parent.resolve()
    run_dir = runs.output_dir(recipe.output.dir, base_dir, smoke)
    if recipe.distributed.num_processes > 1 and not lock.is_launched():
        return distributed.launch_distributed(stage.name, recipe, recipe_path, overrides, run_dir, base_dir,
                                              smoke=smoke, resume=resume, overwrite=overwrite)
    ctx = distributed.Context()
    say = console.print if ctx.is_main else (lambda *a, **k: None)
    # --smoke replaces its own earlier smoke run (ftune's: the ownership rule still applies)
    plan = runs.plan_for(run_dir, recipe, recipe_path, resume=resume, overwrite=overwrite or smoke, say=say)
    training.seed_everything(tc.seed)

    # Inputs, data and the step plan: all read and checked before anything is written.
    inputs = training.starting_point(recipe, base_dir, smoke, stage.continues)
    tokenizer = models.load_tokenizer(str(inputs.adapter_from or inputs.model_path), trust_remote_code=recipe.base_model.trust_remote_code)
    formatter = formatter_for(tokenizer, recipe.data, base_dir=base_dir)
    data, step_plan = steps.plan_data(recipe, stage.data(recipe, tokenizer, formatter, base_dir, smoke), stage.micro_batches,
                                      unit=stage.unit, smoke_size=stage.smoke_size if smoke else None, world=ctx.world,
                                      source=str(recipe_path))
    stage.show(data, say)

    # Model, adapter, optimizer and schedule; accelerate wraps the scorer for DDP/FSDP.
    dtype = models.pick_dtype(recipe.base_model.dtype)
    build = reward_training.build_model if stage.score_head else training.build_model
    model = build(recipe, inputs.model_path, dtype, adapter_from=inputs.adapter_from)
    if not recipe.quantization.load_in_4bit:
        model.to(ctx.device)
    optimizer = training.make_optimizer(tc, model, recipe.adapter)
    scheduler = training.make_scheduler(tc, optimizer, step_plan.total_steps)
    scorer, optimizer = ctx.accelerator.prepare(stage.scorer(model), optimizer)
    budget = training.pass_budget(recipe, ctx.device)
    say(_plan_line(stage, recipe, inputs, model, dtype, ctx, step_plan, budget), highlight=False)

    # The run directory is written from here on: a stop now waits for a safe point.
    stop.defer()
    if ctx.is_main:
        if not run_dir.exists():  # a run stopped before its first step leaves no empty directory either
            held.callback(_remove_if_empty, run_dir)
        held.enter_context(runs.start_run_dir(run_dir, plan, say))
    agreed = lambda: stop.agreed(ctx)  # noqa: E731
    run = _Run(stage, recipe, recipe_path, overrides, run_dir, base_dir, inputs.model_path, dtype, ctx, smoke)
    step = None
    try:
        if ctx.is_main:
            outputs.save_initial_adapter(model, run_dir, recipe)
        ctx.barrier()
        step = stage.start(Setup(recipe, data, tokenizer, formatter, model, scorer, ctx, step_plan, budget, agreed,
                                  plan.resume_from is not None, base_dir))
        if plan.resume_from is not None:
            state = checkpoints.load_checkpoint(plan.resume_from, model, optimizer, scheduler, rank=ctx.rank)
            run.step, run.epoch = state["step"], state["position"]["epoch"]
            run.group = state["position"]["batch"] // tc.gradient_accumulation_steps
            run.resumed = True
            if step.extras.kept is not None:
                try:
                    step.extras.kept.restore(state["stage_state"])
                except FtuneError as exc:  # the stage checks what it reads back; where it read it is known here
                    exc.place = exc.place or str(plan.resume_from / f"stage-rank{ctx.rank}.*")
                    raise
            if ctx.is_main:
                truncate_metrics(run_dir, run.step)
            say(f"resumed from {plan.resume_from} at step {run.step}")
        if ctx.is_main:
            run.mark("running")
            (run_dir / runs.RECIPE_FILE).write_text(recipe_to_yaml(recipe), encoding="utf-8")
        if agreed():
            raise _StopAt()
        with Reporter(run_dir, step_plan.total_steps, start_step=run.step, report_to=tc.report_to, enabled=ctx.is_main,
                      recipe_dict=json.loads(recipe.model_dump_json())) as reporter:
            final_eval = _steps(run, step, data, scorer, model, optimizer, scheduler, step_plan, reporter, agreed)
        _finish(run, step, data, model, tokenizer, formatter, final_eval, reporter, stop, agreed)
    except (_StopAt, usercode.Stopped):  # a user function's call is abandoned before its step trains: a safe point
        _stopped(run, step, model, optimizer, scheduler, stop.signal_name)
    except KeyboardInterrupt:  # a second stop signal: no checkpoint now, but run.json must not stay "running"
        _stopped(run, None, model, optimizer, scheduler, stop.signal_name)
    except BaseException:  # NaN (Diverged), a bug, out of memory: never "running" for ever either
        run.mark("failed")
        raise
    return run_dir


class _Run:
    """Where the run is (steps done; epoch and step within it) and how it records its status."""

    def __init__(self, stage: _Spec, recipe: Recipe, recipe_path: Path, overrides: list[str], run_dir: Path, base_dir: Path,
                 model_path: str, dtype, ctx: distributed.Context, smoke: bool):
        self.stage, self.recipe, self.recipe_path, self.overrides = stage, recipe, recipe_path, overrides
        self.run_dir, self.base_dir, self.model_path, self.dtype, self.ctx = run_dir, base_dir, model_path, dtype, ctx
        self.smoke = smoke  # the resume command says --smoke too
        self.step, self.epoch, self.group = 0, 0, 0  # done: steps in all; where: epoch, step within it
        self.resumed, self.written = False, False  # resumed from a checkpoint; run.json written
        self.trained, self.elapsed = 0, 0.0  # units (tokens, pairs) trained and seconds, by this process

    def mark(self, status: str, summary: dict | None = None) -> None:
        if self.ctx.is_main and (self.written or status == "running"):
            with ignoring_signals():
                outputs.write_run_json(self.run_dir, self.recipe, self.model_path, self.dtype, recipe_dir=self.base_dir,
                                       status=status, step=self.step, summary=summary)
            self.written = True


def _steps(run: _Run, step: Step, data: Data, scorer, model, optimizer, scheduler, plan: steps.StepPlan,
           reporter: Reporter, stop: Callable[[], bool]) -> dict:
    """The optimizer steps, then the final evaluation (returned).

    Loss is the mean over every unit (token, pair) in the optimizer step, however they fall
    into passes, micro-batches and processes, so neither accumulation nor the number of
    processes changes the result. DDP averages gradients over processes, hence ctx.loss_scale.
    """
    recipe, ctx = run.recipe, run.ctx
    tc = recipe.training
    evaluating = len(data.eval) > 0
    scorer.train()
    if run.step == 0 and tc.eval_steps and evaluating:
        reporter.log(0, _evaluated(run, step))  # the baseline
    started = time.perf_counter()
    while run.step < plan.total_steps:
        groups = steps.optimizer_steps(run.stage.micro_batches(recipe, data.train, world=ctx.world, epoch=run.epoch), tc,
                                       world=ctx.world, rank=ctx.rank)
        if not groups:  # steps.plan_steps refuses such data up front; never spin on empty epochs
            raise FtuneError(f"epoch {run.epoch} makes no optimizer step")
        for group in groups[run.group: run.group + plan.total_steps - run.step]:
            passes = step.passes(group)
            count = ctx.sum(sum(p.count for p in passes))
            loss_total, figures = 0.0, {}
            for i, one in enumerate(passes):
                with ctx.accumulating(scorer, last=i == len(passes) - 1):
                    loss = step.loss(one.batch)
                    ctx.accelerator.backward(loss.sum * (ctx.loss_scale(tc.gradient_accumulation_steps) / count))
                loss_total += float(loss.sum.detach())
                for name, (total, weight) in loss.metrics.items():
                    figures[name] = (figures.get(name, (0.0, 0.0))[0] + total, figures.get(name, (0.0, 0.0))[1] + weight)
            grad_norm = ctx.accelerator.clip_grad_norm_(scorer.parameters(), tc.max_grad_norm or float("inf"))
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            loss_total = ctx.sum(loss_total)
            reduced = {k: (ctx.sum(t), ctx.sum(w)) for k, (t, w) in sorted(figures.items())}
            logged = {"loss": loss_total / count, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      **{k: t / w for k, (t, w) in reduced.items() if w},
                      **(step.extras.figures() if step.extras.figures else {})}
            if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                reporter.log(run.step + 1, logged)  # as null: metrics.jsonl stays valid JSON
                raise Diverged(run.step + 1, "loss" if not math.isfinite(loss_total) else "gradient norm",
                               runs.latest_checkpoint(run.run_dir), recipe)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.step, run.group, run.trained = run.step + 1, run.group + 1, run.trained + count
            run.elapsed = time.perf_counter() - started
            if run.step % tc.logging_steps == 0 or run.step == plan.total_steps:
                reporter.log(run.step, {**logged, "epoch": run.epoch + run.group / len(groups),
                                        f"{run.stage.rate}_per_s": run.trained / max(run.elapsed, 1e-9)})
            if tc.eval_steps and run.step % tc.eval_steps == 0 and run.step < plan.total_steps and evaluating:
                reporter.log(run.step, _evaluated(run, step))
            stopping = stop()  # every process stops at the same step
            if stopping or (tc.save_steps and run.step % tc.save_steps == 0 and run.step < plan.total_steps):
                _save(run, step, model, optimizer, scheduler)
            if stopping:
                raise _StopAt()
        if run.step < plan.total_steps:
            run.epoch, run.group = run.epoch + 1, 0
    final = _evaluated(run, step) if evaluating else {}
    if final:
        reporter.log(run.step, final)
    return final


def _evaluated(run: _Run, step: Step) -> dict:
    result = step.evaluate()
    if result is None:
        raise _StopAt()
    if not math.isfinite(result.get("eval_loss", 0.0)):
        raise Diverged(run.step, "held-out loss", runs.latest_checkpoint(run.run_dir), run.recipe)
    return result


def _save(run: _Run, step: Step, model, optimizer, scheduler) -> Path:
    """A checkpoint at the current step, unless its state is poisoned (then the run fails instead)."""
    bad = training.first_nonfinite(model)
    if run.ctx.sum(1 if bad else 0) > 0:
        raise Diverged(run.step, f"parameter {bad or 'on another process'}", runs.latest_checkpoint(run.run_dir), run.recipe)
    return checkpoints.save_checkpoint(run.run_dir, run.step, model, optimizer, scheduler,
                                       {"epoch": run.epoch, "batch": run.group * run.recipe.training.gradient_accumulation_steps},
                                       run.recipe.training.save_total_limit, ctx=run.ctx,
                                       stage_state=step.extras.kept.state() if step.extras.kept is not None else {})


def _finish(run: _Run, step: Step, data: Data, model, tokenizer, formatter, final_eval: dict, reporter: Reporter,
            stop: StopRequest, agreed: Callable[[], bool]) -> None:
    """Sample answers, then the final artifacts (main process): written aside and renamed into place."""
    ctx, recipe, run_dir = run.ctx, run.recipe, run.run_dir
    summary = {"steps": run.step, "processes": ctx.world, "train_seconds": round(run.elapsed, 1),
               f"{run.stage.rate}_per_s": round(run.trained / max(run.elapsed, 1e-9), 2),
               "final_train_loss": reporter.last_train.get("loss"),
               **(step.extras.summary() if step.extras.summary else {}), **final_eval}
    samples, title = [], None
    if ctx.is_main and step.extras.card is not None:
        title, samples = step.extras.card()
    elif ctx.is_main:
        attention.disable(model)  # generation and saving use transformers' own attention
        samples = outputs.generate_samples(model, tokenizer, formatter, recipe, ctx.device, stop=lambda: bool(stop))
    if agreed():
        raise _StopAt()
    if ctx.is_main:
        bad = training.first_nonfinite(model)
        if bad:
            raise Diverged(run.step, f"parameter {bad}", runs.latest_checkpoint(run_dir), recipe)
        outputs.save_trained(model, tokenizer, formatter, run_dir, recipe)
        outputs.write_eval_prompts(run_dir, tokenizer, itertools.islice(run.stage.eval_prompts(data.eval), 8))
        plot_losses(run_dir, run_dir / runs.LOSS_PLOT)
        outputs.write_run_card(run_dir, recipe, data.report, summary, samples, title=title)
        run.mark("completed", summary)
        shutil.rmtree(run_dir / runs.CHECKPOINTS_DIR, ignore_errors=True)
        console.print(summary_table(f"{run.stage.describe(recipe)} finished", [(k, str(v)) for k, v in summary.items()] + [("run", str(run_dir))]))
    ctx.barrier()


def _stopped(run: _Run, step: Step | None, model, optimizer, scheduler, signal_name: str | None) -> None:
    """End a stopped run: with a checkpoint to resume from once it trained, without a trace before that.
    `step` is None after a second signal: then nothing more is saved."""
    if run.step == 0 and not run.resumed:
        if run.ctx.is_main:
            with ignoring_signals():
                for name in (ownership.RUN_FILE, runs.RECIPE_FILE, runs.METRICS_FILE, runs.INITIAL_ADAPTER_DIR, runs.CHECKPOINTS_DIR, "tensorboard"):
                    path = run.run_dir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise Stopped(signal_name, run.stage.name)
    checkpoint = runs.latest_checkpoint(run.run_dir)
    if step is not None and (checkpoint is None or checkpoint.name != f"step-{run.step:06d}"):
        try:
            with contextlib.suppress(KeyboardInterrupt):  # a second signal while saving: the last complete one stays
                _save(run, step, model, optimizer, scheduler)
        except Diverged:
            run.mark("failed")
            raise
        checkpoint = runs.latest_checkpoint(run.run_dir)
    run.mark("interrupted")
    raise Interrupted(run.stage.name, run.step, checkpoint, run.recipe_path, run.overrides, smoke=run.smoke)


def show_report(title: str, report, rows: list[tuple[str, str]], say) -> None:
    """The data table: each source's rows used and skipped, then the stage's own rows."""
    sources = [(s["path"], f"{s['used']} rows used of {s['rows']} ({s['format']}), {s['skipped']} skipped") for s in report.sources]
    say(summary_table(title, sources + rows))
    for line in report.skipped:
        say(f"  skipped {line}", highlight=False)


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _plan_line(stage: _Spec, recipe: Recipe, inputs: Inputs, model, dtype, ctx, plan: steps.StepPlan, budget: int | None) -> str:
    tc, (trainable, total) = recipe.training, training.count_parameters(model)
    rows = "rows" if stage.unit == "samples" else stage.unit
    # e.g. 4 rows x 2 accumulation x 1 process = 8 rows per step, of at most 256 tokens each
    return (f"{stage.describe(recipe)} from {inputs.source} ({dtype}, {ctx.device}{', 4-bit NF4' if recipe.quantization.load_in_4bit else ''}); "
            f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)\nsteps: {plan.total_steps} "
            f"({plan.steps_per_epoch} per epoch; {tc.batch_size} {rows} x {tc.gradient_accumulation_steps} accumulation x {ctx.world} "
            f"process(es) = {tc.batch_size * tc.gradient_accumulation_steps * ctx.world} {rows} per step, of at most "
            f"{recipe.data.max_length} tokens each" + (f", in passes of at most {budget:,} tokens" if budget else "") + ")")

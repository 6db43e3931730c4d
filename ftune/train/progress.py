"""What a user watches and keeps: progress as training goes, metrics.jsonl, a summary table, a loss curve.

Only the main process reports. On a terminal, progress is a live bar; anywhere else (CI
logs, SLURM, `| tee`, FTUNE_NO_PROGRESS=1) a live bar shows nothing until the end, so each
logging step prints one plain line instead. Trackers named in `training.report_to`
(TensorBoard, Weights & Biases, MLflow) get the same metrics when they are installed.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ftune.errors import FtuneError
from ftune.guards import textio

console = Console(stderr=True)


def live_bar_wanted() -> bool:
    """A live bar only where someone watches a terminal: both output streams are one, and it is not turned off."""
    return console.is_terminal and sys.stdout.isatty() and not os.environ.get("FTUNE_NO_PROGRESS")


class Reporter:
    def __init__(self, run_dir: Path, total_steps: int, *, start_step: int = 0, report_to=(), enabled: bool = True, recipe_dict: dict | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.trackers = _open_trackers(report_to, run_dir, recipe_dict or {}) if enabled else []
        self.total_steps = total_steps
        self.start_step = start_step
        self.live = enabled and live_bar_wanted()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.started = time.perf_counter()
        self.last_logged = self.started
        self.training_seconds = 0.0  # time between logs that ended in a training step: evaluations are not the pace

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
        for tracker in self.trackers:
            tracker.close()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(_dumps(record) + "\n")
        is_eval = any(k.startswith("eval_") for k in metrics)
        now = time.perf_counter()
        if is_eval:
            self.last_eval = record
        else:
            self.last_train = record
            self.training_seconds += now - self.last_logged
        self.last_logged = now
        for tracker in self.trackers:
            tracker.log(step, metrics)
        if self.live:
            self.progress.update(self.task, completed=step, status=self._status())
        elif is_eval:
            console.print(f"step {step}/{self.total_steps}  " + "  ".join(f"{k} {_number(v)}" for k, v in record.items() if k.startswith("eval_")),
                          highlight=False, markup=False, soft_wrap=True)
        else:
            console.print(f"step {step}/{self.total_steps}  {self._status(with_eval=False)}  eta {self._eta(step)}",
                          highlight=False, markup=False, soft_wrap=True)

    def _status(self, *, with_eval: bool = True) -> str:
        """loss, lr and throughput of the last training log (and the last eval loss, for the bar)."""
        train = self.last_train
        parts = [f"loss {_number(train.get('loss'))}", f"lr {_number(train.get('lr'), '.2e')}"]
        # SFT counts tokens per second, preference stages pairs (`pairs_per_s`): whichever the stage logs.
        for key, value in train.items():
            if key.endswith("_per_s") and isinstance(value, (int, float)):
                unit = {"tokens": "tok"}.get(key.removesuffix("_per_s"), key.removesuffix("_per_s"))
                parts.append(f"{value:,.0f} {unit}/s" if value >= 100 else f"{value:.3g} {unit}/s")
        if with_eval and self.last_eval.get("eval_loss") is not None:
            parts.append(f"eval {_number(self.last_eval['eval_loss'])}")
        return "  ".join(parts)

    def _eta(self, step: int) -> str:
        """Time left at the pace of the steps this process has run (a resumed run counts from where it resumed)."""
        done = step - self.start_step
        if done <= 0:
            return "-"
        seconds = self.training_seconds / done * max(self.total_steps - step, 0)
        minutes, secs = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{secs:02d}"

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, highlight=False)


def _clean(value):
    """A metric as metrics.jsonl keeps it: floats rounded, and NaN or infinity as null, so every line stays valid JSON."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def _dumps(record: dict) -> str:
    # allow_nan=False: a non-finite number that slipped past _clean is a bug to hear about, not a line no JSON reader accepts.
    return textio.dumps({k: _clean(v) for k, v in record.items()})


def _number(value, spec: str = ".4f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"  # a non-finite number, logged as null
    return str(value) if isinstance(value, int) else format(value, spec)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as ftune wrote it: each line an object with an integer step; anything else is refused at its line."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in textio.text_lines(path, "metrics file"):
        if not line.strip():
            continue
        place = f"{path} line {number}"
        record = textio.loads(line, place, nonfinite_as_null=True)  # an older ftune wrote NaN literals here
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise FtuneError("not a metrics record ftune wrote: an object with a whole, non-negative 'step'", place=place,
                             hint="the run's metrics.jsonl is damaged; move it aside to continue without its history")
        records.append(record)
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, forget what was logged after the checkpoint being resumed."""
    records = [r for r in read_metrics(run_dir) if r["step"] <= step]
    path = run_dir / "metrics.jsonl"
    if path.exists():
        path.write_text("".join(_dumps(r) + "\n" for r in records), encoding="utf-8")


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    return table


def plot_losses(run_dir: Path, out: Path) -> bool:
    """loss.png: training loss per step and eval loss where measured."""
    records = read_metrics(run_dir)
    # A non-finite loss is logged as null: the curve skips it.
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


class _Tracker:
    def log(self, step: int, metrics: dict) -> None: ...
    def close(self) -> None: ...


def _open_trackers(names, run_dir: Path, recipe_dict: dict) -> list:
    trackers = []
    for name in names:
        try:
            trackers.append(_TRACKERS[name](run_dir, recipe_dict))
        except ImportError:
            console.print(f"[yellow]warning:[/] report_to: {name} is not installed; pip install {name}")
    return trackers


class _TensorBoard(_Tracker):
    def __init__(self, run_dir: Path, recipe_dict: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step, metrics):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self):
        self.writer.close()


class _Wandb(_Tracker):
    def __init__(self, run_dir: Path, recipe_dict: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ftune"), name=run_dir.name, config=recipe_dict)

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class _MLflow(_Tracker):
    def __init__(self, run_dir: Path, recipe_dict: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)

    def log(self, step, metrics):
        self.mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        self.mlflow.end_run()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}

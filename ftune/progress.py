"""What a user watches and keeps: a live bar, metrics.jsonl, a summary table, a loss curve.

Only the main process reports. Trackers named in `training.report_to` (TensorBoard,
Weights & Biases, MLflow) get the same metrics when they are installed.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class Reporter:
    def __init__(self, run_dir: Path, total_steps: int, *, start_step: int = 0, report_to=(), enabled: bool = True, recipe_dict: dict | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.trackers = _open_trackers(report_to, run_dir, recipe_dict or {}) if enabled else []
        show_bar = enabled and not os.environ.get("FTUNE_NO_PROGRESS")
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not show_bar,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.started = time.perf_counter()

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
        record = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if any(k.startswith("eval_") for k in metrics):
            self.last_eval = record
        else:
            self.last_train = record
        for tracker in self.trackers:
            tracker.log(step, metrics)
        status = f"loss {self.last_train.get('loss', float('nan')):.4f}  lr {self.last_train.get('lr', 0):.2e}"
        status += f"  {self.last_train.get('tokens_per_s', 0):.0f} tok/s"
        if self.last_eval:
            status += f"  eval {self.last_eval.get('eval_loss', float('nan')):.4f}"
        self.progress.update(self.task, completed=step, status=status)
        if os.environ.get("FTUNE_NO_PROGRESS") and "loss" in metrics:
            console.print(f"step {step}: {status}", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, highlight=False)


def _round(value):
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, forget what was logged after the checkpoint being resumed."""
    records = [r for r in read_metrics(run_dir) if r["step"] <= step]
    path = run_dir / "metrics.jsonl"
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


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
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
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

"""A stage that continues an earlier run (DPO, RM or GRPO from an SFT run's adapter): that run, checked."""

from __future__ import annotations

from pathlib import Path

from ftune.artifacts import run_checks
from ftune.artifacts.ownership import RUN_FILE
from ftune.artifacts.runs import output_dir, read_run
from ftune.errors import FtuneError
from ftune.modeling.models import run_base_path
from ftune.recipe import Recipe


def init_from_run(init_from: str, recipe: Recipe, base_dir: Path, *, smoke: bool, key: str) -> tuple[Path, Path, str]:
    """The completed policy run (sft, dpo, grpo) that recipe key `key` (preference.init_from, ...) names, checked:
    (its directory, its adapter, its base model's path). In --smoke, that run's own smoke run when
    there is one, so a CI can smoke-test a chain: sft --smoke, then dpo --smoke."""
    run_dir = Path(init_from).expanduser()
    run_dir = run_dir if run_dir.is_absolute() else base_dir / run_dir
    smoke_run = output_dir(str(run_dir), base_dir, smoke=True)
    if smoke and (smoke_run / RUN_FILE).is_file():
        run_dir = smoke_run
    if recipe.adapter.method == "none":  # the recipe's own problem, whatever the run is
        raise FtuneError(f"{key} continues an adapter; adapter.method: none cannot")
    run = read_run(run_dir)
    run_checks.check_kind(run, key)  # a policy run, finished (run_checks.USES)
    if run.base_model != recipe.base_model.name:
        raise FtuneError(f"{key}: {run_dir} was trained on '{run.base_model}', but this recipe names "
                         f"base_model '{recipe.base_model.name}'", hint=f"set base_model.name: {run.base_model}")
    if run.adapter_method == "none":
        raise FtuneError(f"{key}: {run_dir} has no adapter to continue from: it was full fine-tuning",
                         hint="continue it as a base model (base_model.name: its model/ folder), without init_from")
    run_checks.check_weights(run)
    return run_dir, run.adapter_dir, run_base_path(run)

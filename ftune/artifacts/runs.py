"""Run directories: their files, whose they are, who holds them, and how they are replaced.

A run directory describes itself: `run.json` names the stage, status, step and resolved base
model; `recipe.yaml` is the resolved recipe. Later commands (merge, export, eval, chat, an
`init_from`, a reward model) read a run through `read_run`, never by parsing run.json themselves:
it refuses a damaged run, and one of the wrong kind for the reader (run_checks.py).

ftune deletes or replaces only what ftune wrote (ownership.py holds the rule). A run is
replaced by renaming it aside, building the new one, and deleting the old one once the new
one has completed: a crash at any point leaves one of them whole, and the next command puts
a set-aside run back when its replacement never got as far as a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftune.artifacts import run_checks
from ftune.artifacts.lock import is_launched
from ftune.artifacts.ownership import ASIDE, contents, is_run, make_parents, owned, remove_empty, refuse_file_on_path, refuse_foreign, refuse_inside, refuse_other_kind, refuse_protected, set_aside
from ftune.errors import FtuneError

from ftune.artifacts.lock import LOCK_FILE, RunLock, RunLocked, lock_holder
from ftune.artifacts.ownership import OUTPUT_MARKER, RUN_FILE, read_json_object
from ftune.recipe import Recipe, load_recipe, recipe_to_yaml

RECIPE_FILE = "recipe.yaml"  # the resolved recipe; never a source of trust_remote_code
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # full fine-tuning writes a whole model instead of an adapter
INITIAL_ADAPTER_DIR = "initial_adapter"  # PiSSA/OLoRA: the adapter as initialised
CHECKPOINTS_DIR = "checkpoints"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"  # held-out prompts for merge and export parity checks
METRICS_FILE = "metrics.jsonl"
README_FILE = "README.md"  # the run card
LOSS_PLOT = "loss.png"


# --------------------------------------------------------------------------- reading a run


@dataclass(frozen=True)
class Run:
    """What a run directory says about itself (run.json), typed.

    run.json also records the recipe's trust_remote_code; it is deliberately absent here. A
    run directory may come from anyone: whether to run Python shipped with a model is the
    user's choice on the command line or in their own recipe, never a file ftune reads back.
    Its base model's directory, found again when the run moved, is models.run_base_path(run).
    """

    dir: Path
    stage: str
    status: str  # running, interrupted, failed or completed
    step: int
    base_model: str  # the base as the recipe named it: 'demo', a hub id or a directory
    base_model_path: str | None  # where training found it (a local directory)
    base_model_revision: str | None
    adapter_method: str  # lora, dora, or none (full fine-tuning)
    quantization: dict | None  # the recipe's 4-bit settings for a QLoRA run, else None
    dtype: str | None  # the dtype training loaded the base in
    summary: dict
    ftune_version: str | None
    recipe_dir: Path | None = None  # the recipe's folder when it ran: recipe.yaml's data paths are relative to it

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def adapter_dir(self) -> Path:
        return self.dir / ADAPTER_DIR

    @property
    def model_dir(self) -> Path:
        return self.dir / MODEL_DIR

    @property
    def recipe_file(self) -> Path:
        return self.dir / RECIPE_FILE

    @property
    def eval_prompts_file(self) -> Path:
        return self.dir / EVAL_PROMPTS_FILE

    def recipe(self) -> Recipe | None:
        """The resolved recipe saved with the run, with trust_remote_code off whatever it says."""
        if not self.recipe_file.is_file():
            return None
        recipe = load_recipe(self.recipe_file)
        return recipe.model_copy(update={"base_model": recipe.base_model.model_copy(update={"trust_remote_code": False})})

    # Transitional: a dict view of run.json for code not yet switched to the fields above.
    # base_model.trust_remote_code reads False there too, for the reason in the docstring.
    def get(self, key: str, default=None):
        return _dict_view(self).get(key, default)

    def __getitem__(self, key: str):
        return _dict_view(self)[key]


def read_run(run_dir: Path, expect: str | None = None, *, what: str | None = None) -> Run:
    """The run in `run_dir`, refused with the file named when it is not one, is damaged, or is
    another user's. With `expect` (a key of run_checks.USES: "grpo.init_from", "merge", ...),
    also of the stage that use reads, finished when it must be, its weights readable; `what`
    names the user in the message when it is not `expect` itself (e.g. "rewards[0]")."""
    run_dir = Path(run_dir)
    meta = run_dir / RUN_FILE
    if not meta.is_file():
        raise run_checks.not_a_run(run_dir, RUN_FILE, OUTPUT_MARKER)
    run_checks.check_owner(meta)
    data = run_checks.check_meta(run_checks.json_file(meta, "run file"), meta)
    base = data["base_model"]
    quantization = data.get("quantization") if isinstance(data.get("quantization"), dict) else None
    adapter = data.get("adapter") if isinstance(data.get("adapter"), dict) else {}
    run = Run(
        dir=run_dir,
        stage=data["stage"],
        status=data["status"],
        step=data.get("global_step") or 0,
        base_model=base["name"],
        base_model_path=base.get("path"),
        base_model_revision=base.get("revision"),
        adapter_method=adapter.get("method", "lora"),
        quantization=quantization if quantization and quantization.get("load_in_4bit") else None,
        dtype=data.get("dtype"),
        summary=data.get("summary") or {},
        ftune_version=data["ftune_version"],
        recipe_dir=Path(data["recipe_dir"]) if data.get("recipe_dir") else None,
    )
    if expect is not None:
        run_checks.check_use(run, expect, what)
    return run


def _dict_view(run: Run) -> dict:
    data = run_checks.json_file(run.dir / RUN_FILE, "run file")
    if isinstance(data.get("base_model"), dict):
        data["base_model"] = {**data["base_model"], "trust_remote_code": False}
    return data


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (Path(run_dir) / CHECKPOINTS_DIR).glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["ftune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "gguf", "llama-cpp-python"]
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


# --------------------------------------------------------------------------- planning a run


def output_dir(directory: str, base_dir: Path, smoke: bool) -> Path:
    """The run directory: relative to the recipe's folder; symlinks resolved, so every rule
    below applies to the directory that would really be written."""
    path = Path(directory).expanduser()
    path = (path if path.is_absolute() else base_dir / path).resolve()
    return path.with_name(path.name + "-smoke").resolve() if smoke else path


def recipe_inputs(recipe: Recipe, recipe_path: Path) -> list[tuple[str, Path]]:
    """What a training run reads from disk: the run directory may hold none of it."""
    base_dir = Path(recipe_path).parent
    inputs = [("the recipe", Path(recipe_path))]

    def local(text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else base_dir / path

    for source in [*recipe.data.train, *recipe.data.eval]:
        if local(source.path).exists():
            inputs.append(("the data file", local(source.path)))
    if local(recipe.base_model.name).is_dir():
        inputs.append(("the base model", local(recipe.base_model.name)))
    for key, section in (("preference.init_from", recipe.preference), ("rm.init_from", recipe.rm), ("grpo.init_from", recipe.grpo)):
        if section is not None and section.init_from:
            inputs.append((f"the run in {key}", local(section.init_from)))
            smoke = output_dir(section.init_from, base_dir, smoke=True)  # what a --smoke chain continues from
            if smoke.exists():
                inputs.append((f"the smoke run of {key}", smoke))
    for i, reward in enumerate(recipe.rewards or []):  # grpo: the user's reward functions and reward-model runs
        if reward.function or reward.run:
            inputs.append((f"the {'reward function file' if reward.function else 'reward-model run'} of rewards[{i}]",
                           local(reward.function.rpartition(":")[0] if reward.function else reward.run)))
    return inputs


@dataclass(frozen=True)
class RunPlan:
    """What to do with the run directory, decided before anything is written."""

    resume_from: Path | None
    replace: bool  # set the ftune run there aside; it is deleted once the new run completes


def plan_for(run_dir: Path, recipe: Recipe, recipe_path: Path, *, resume: bool, overwrite: bool,
             say: Callable[[str], None] | None = None) -> RunPlan:
    """Under `accelerate launch` the launcher has decided (and holds the lock): resume if it left a checkpoint."""
    if is_launched():
        return RunPlan(latest_checkpoint(run_dir), replace=False)
    return plan_run_dir(run_dir, recipe, recipe_path, resume=resume, overwrite=overwrite, say=say)


def plan_run_dir(run_dir: Path, recipe: Recipe, recipe_path: Path, *, resume: bool, overwrite: bool,
                 say: Callable[[str], None] | None = None) -> RunPlan:
    """Decide between a fresh run, a resume, a replacement and refusing.

    Only an ftune run (or output) is ever replaced, and only with --overwrite; a directory
    holding anything else is refused with a message that suggests another output.dir.
    """
    say = say or _note
    option, place = "output.dir", f"output.dir in {recipe_path}"
    ours = run_dir.is_dir() and owned(run_dir)
    refuse_protected(run_dir, inputs=recipe_inputs(recipe, recipe_path), option=option, place=place,
                     cwd_ok=ours or not run_dir.exists() or not contents(run_dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise FtuneError(f"{run_dir} is a file, not a directory", place=place, hint="set output.dir to a directory for the run")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunLocked(run_dir, holder)
    restore_set_aside(run_dir, say)
    refuse_file_on_path(run_dir, option=option, place=place)
    refuse_inside(run_dir, kind="run", option=option, place=place)  # a run inside a merged model, curated data, another run
    refuse_other_kind(run_dir, kind="run", option=option, place=place)  # a run's adapter, a merged model: never replaced by a run
    refuse_other_stage(run_dir, recipe.stage, place=place)
    if run_dir.exists() and contents(run_dir) and not owned(run_dir):
        refuse_foreign(run_dir, option=option, place=place)
    meta = read_json_object(run_dir / RUN_FILE)
    status = meta.get("status") if meta else None
    checkpoint = latest_checkpoint(run_dir)
    if overwrite and not resume:
        return RunPlan(None, replace=bool(run_dir.exists() and contents(run_dir)))
    if status == "completed":
        raise FtuneError(f"{run_dir} already holds a completed run", place=place,
                         hint="pass --overwrite to replace it (ftune's own run), or set output.dir")
    if checkpoint is not None:
        saved = run_dir / RECIPE_FILE
        if saved.is_file() and saved.read_text(encoding="utf-8") != recipe_to_yaml(recipe):
            raise FtuneError(
                f"{run_dir} holds an interrupted run of a different recipe", place=place,
                hint="resume with the same recipe and --set options, or pass --overwrite to start again",
            )
        if not resume:
            say(f"found an interrupted run in {run_dir}; resuming from {checkpoint.name}")
        return RunPlan(checkpoint, replace=False)
    if resume:
        raise FtuneError(f"nothing to resume in {run_dir}: no checkpoint found", place=place)
    if run_dir.exists() and contents(run_dir):
        raise FtuneError(f"{run_dir} holds an unfinished ftune run with no checkpoint to resume (status: {status})",
                         place=place, hint="pass --overwrite to start it again, or set output.dir")
    return RunPlan(None, replace=False)


def refuse_other_stage(run_dir: Path, stage: str, *, place: str) -> None:
    """`ftune sft --overwrite` replaces an earlier sft run, never a reward model or a GRPO policy."""
    meta = read_json_object(run_dir / RUN_FILE) if is_run(run_dir) else None
    found = meta.get("stage") if meta else None
    if isinstance(found, str) and found != stage:
        raise FtuneError(f"{run_dir} is an ftune run (written by ftune {found}), not an earlier `ftune {stage}` output; "
                         f"ftune {stage} replaces only its own outputs", place=place, hint="set output.dir to a new directory for this run")


def start_run_dir(run_dir: Path, plan: RunPlan, say: Callable[[str], None] | None = None) -> OpenRun:
    """Act on the plan once the inputs are known to be good (nothing is touched before):
    set a replaced run aside, create the directory and take its lock.

    Returns the open run; use it as a context manager that lasts as long as the run writes.
    """
    say = say or _note
    replaced = None
    if plan.replace and run_dir.is_dir() and contents(run_dir):
        holder = lock_holder(run_dir)
        if holder is not None:
            raise RunLocked(run_dir, holder)
        if not is_run(run_dir):  # the directory changed since it was planned
            refuse_foreign(run_dir, option="output.dir")
        replaced = set_aside(run_dir)
        say(f"replacing the run in {run_dir}; the previous one is kept in {replaced} until this one completes")
    created = make_parents(run_dir / RUN_FILE)  # the run directory and any folder above it that was missing
    try:
        lock = RunLock(run_dir, say=say).acquire()
    except BaseException:
        if replaced is not None:
            _put_back(run_dir, replaced)
        else:
            remove_empty(created)  # a full or read-only disk: no folder left behind
        raise
    # A checkpoint being written when the process was killed: never complete, never used.
    for partial in (run_dir / CHECKPOINTS_DIR).glob(".*.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    return OpenRun(run_dir, lock, replaced, say)


class OpenRun:
    """A run directory while this process writes it: its lock, and the run it replaces.

    On leaving, the lock is released. A completed run deletes the run it replaced. A run that
    failed before its first checkpoint is removed and the replaced one put back, as if the
    command had never started; one with a checkpoint stays to be resumed, and so does the
    replaced run until the resumed one completes.
    """

    def __init__(self, run_dir: Path, lock: RunLock, replaced: Path | None, say: Callable[[str], None]):
        self.run_dir, self.lock, self.replaced, self.say = run_dir, lock, replaced, say

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if _status(self.run_dir) == "completed":
                for old in set_aside_runs(self.run_dir):
                    shutil.rmtree(old, ignore_errors=True)
            elif kind is not None and self.replaced is not None and self.replaced.is_dir():
                if latest_checkpoint(self.run_dir) is None:  # this process made the directory: all of it is ours
                    _put_back(self.run_dir, self.replaced)
                    self.say(f"the run in {self.run_dir} is as it was: this one stopped before its first checkpoint")
                else:
                    self.say(f"the run this one replaces is kept in {self.replaced} until this one completes")
        finally:
            self.lock.release()


def set_aside_runs(run_dir: Path) -> list[Path]:
    """ftune runs that a replacement of `run_dir` set aside, oldest first."""
    run_dir = Path(run_dir)
    found = run_dir.parent.glob(f".{run_dir.name}{ASIDE}*") if run_dir.parent.is_dir() else []
    return sorted(p for p in found if p.is_dir() and owned(p))


def restore_set_aside(run_dir: Path, say: Callable[[str], None]) -> None:
    """Finish what an interrupted replacement left: the old run back, or gone once the new one completed."""
    asides = set_aside_runs(run_dir)
    if not asides:
        return
    if _status(run_dir) == "completed":
        for old in asides:
            shutil.rmtree(old, ignore_errors=True)
    elif _replaceable(run_dir):
        _put_back(run_dir, asides[-1])
        say(f"put back the run set aside in {asides[-1].name}: the run replacing it stopped before its first checkpoint")
        restore_set_aside(run_dir, say)  # older set-aside runs go too when the restored one is complete
    elif is_run(run_dir):
        say(f"note: the run this one replaces is kept in {asides[-1]} until it completes")


def _replaceable(run_dir: Path) -> bool:
    """Nothing there, or ftune's own replacement that never reached a checkpoint."""
    if not run_dir.exists():
        return True
    if owned(run_dir):
        return latest_checkpoint(run_dir) is None
    return all(p.name == LOCK_FILE for p in run_dir.iterdir())  # a stale lock at most (a live one was refused)


def _put_back(run_dir: Path, replaced: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # what `_replaceable` allows: ftune's unfinished replacement, or a stale lock
    os.rename(replaced, run_dir)


def _status(run_dir: Path) -> str | None:
    """The status of the ftune run in `run_dir` (None when there is none)."""
    meta = read_json_object(run_dir / RUN_FILE)
    return meta.get("status") if meta and "ftune_version" in meta else None


def _note(text: str) -> None:
    """Where notes go when the caller names nothing (the training commands pass their console's)."""
    print(text, file=sys.stderr)


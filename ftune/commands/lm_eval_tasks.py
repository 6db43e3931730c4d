"""lm-evaluation-harness tasks for `ftune eval --lm-eval-tasks`: named, checked before any model
loads, run on each transformers model, and their errors turned into ftune errors."""

from __future__ import annotations

import difflib
import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path

import yaml

from ftune.commands import chat
from ftune.errors import FtuneError
from ftune.modeling import models

LM_EVAL_INSTALL = "pip install 'ftune[lm-eval]' (lm-eval alone: pip install 'lm-eval[hf]')"


class LmEvalTasks:
    """lm-evaluation-harness tasks, checked by name before any model loads, then run on each model.

    A name is a task, group or tag lm-eval knows (its own, or from an --lm-eval-include
    folder), a glob over those names, or a task YAML file. lm-eval's own errors come back as
    ftune errors naming the tasks.
    """

    def __init__(self, manager, names: list[str]):
        self.manager, self.names = manager, names

    @classmethod
    def check(cls, names: list[str], include: list[Path]) -> LmEvalTasks:
        if importlib.util.find_spec("lm_eval") is None:
            raise FtuneError("--lm-eval-tasks needs lm-evaluation-harness, which is not installed", hint=f"install it with: {LM_EVAL_INSTALL}")
        for folder in include:
            check_include(Path(folder))
        models.quiet_libraries()
        from lm_eval.tasks import TaskManager

        try:
            manager = TaskManager(include_path=[str(Path(f).resolve()) for f in include] or None)
        except Exception as exc:  # a malformed YAML in the folder, a bad !function: lm-eval's message says which
            raise FtuneError(f"lm-eval cannot read the task folders {', '.join(map(str, include))}: {_reason(exc)}") from None
        known = manager.all_tasks
        resolved: list[str] = []
        for name in names:
            if name in known:
                resolved.append(name)
            elif Path(name).suffix in (".yaml", ".yml"):
                if not Path(name).is_file():
                    raise FtuneError(f"--lm-eval-tasks {name}: no such task file")
                resolved.append(str(Path(name).resolve()))
            elif any(c in name for c in "*?["):
                matched = manager.match_tasks([name])
                if not matched:
                    raise FtuneError(f"--lm-eval-tasks {name}: the pattern matches no lm-eval task, group or tag")
                resolved.extend(m for m in matched if m not in resolved)
            else:
                close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
                guess = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise FtuneError(f"--lm-eval-tasks {name}: lm-eval knows no task, group or tag of that name{guess}",
                                 hint="list them with `lm-eval ls tasks`; a folder of your own task YAML files goes in with "
                                      "--lm-eval-include DIR")
        # Built once here, datasets and all, so a task that cannot load fails before any model
        # does; each model then gets freshly built tasks (lm-eval keeps per-run state in them).
        try:
            manager.load(resolved)
        except Exception as exc:
            raise FtuneError(f"lm-eval cannot load {', '.join(resolved)}: {_reason(exc)}") from None
        return cls(manager, resolved)

    def run(self, loaded, limit: int | None, say: Callable[[str], None]) -> dict:
        """{task or group: {"metrics": {name: value}, "samples": n}} for a transformers model (GGUF files are skipped)."""
        if isinstance(loaded, chat.GGUFModel):
            say(f"  lm-eval: skipped for {loaded.target.spec} (it evaluates transformers models)")
            return {}
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        try:
            lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, backend="causal")
            output = simple_evaluate(model=lm, tasks=list(self.names), limit=limit, task_manager=self.manager, log_samples=False)
        except FtuneError:
            raise
        except Exception as exc:  # a dataset that cannot be read, a template that fails on a row, ...
            raise FtuneError(f"lm-eval failed on {', '.join(self.names)} with {loaded.target.spec}: {_reason(exc)}") from None
        counts = output.get("n-samples", {})
        scores = {}
        for name, section in {**output.get("results", {}), **output.get("groups", {})}.items():
            samples = section.get("sample_len", counts.get(name, {}).get("effective"))
            scores[name] = {"metrics": lm_eval_metrics(section), "samples": samples if isinstance(samples, int) else None}
        return scores


def lm_eval_metrics(section: dict) -> dict:
    """The scores in one lm-eval result: its 'metric,filter' entries, named 'metric' for the unfiltered ones.

    The rest (alias, name, sample_len, sample_count) is bookkeeping, not a score; an
    undefined value (a standard error over one sample) is None.
    """
    found = {}
    for key, value in section.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        metric, _, filtered = key.partition(",")
        value = float(value)
        found[metric if filtered == "none" else f"{metric} ({filtered})"] = value if math.isfinite(value) else None
    return found


def _reason(exc: BaseException) -> str:
    # A KeyError's str() quotes its message; the message itself reads better.
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)
    return f"{type(exc).__name__}: {text.strip()}" if text.strip() else type(exc).__name__


# --------------------------------------------------------------------------- --lm-eval-include folders

MAX_TASK_YAML_BYTES = 16 << 20  # a task YAML is a few KB; lm-eval reads every one of a folder whole


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML plus lm-eval's one tag, `!function utils.process_docs`, read as text (never imported here)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_include(folder: Path) -> None:
    """Every task YAML of an --lm-eval-include folder read up front, each broken one named with its line.

    lm-eval skips a YAML it cannot parse without a word (its tasks are then simply unknown), so a typo
    in a task file would surface as "lm-eval knows no task of that name". Its files are the ones
    lm-eval reads: `**/*.yaml`, outside __pycache__ and .ipynb_checkpoints."""
    option = f"--lm-eval-include {folder}"
    if not folder.exists():
        raise FtuneError(f"{option}: no such directory", hint="name a folder of lm-eval task YAML files")
    if not folder.is_dir():
        raise FtuneError(f"{option}: is a file, not a folder", hint="name the folder that holds your task YAML files "
                         "(a single task file goes in --lm-eval-tasks FILE.yaml)")
    found = 0
    for path in sorted(folder.glob("**/*.yaml")):
        if any(part in ("__pycache__", ".ipynb_checkpoints") for part in path.relative_to(folder).parts):
            continue
        found += 1
        _check_task_yaml(path, option)
    if not found:
        raise FtuneError(f"{option}: the folder holds no task YAML files (*.yaml)", hint="lm-eval reads tasks from *.yaml files")


def _check_task_yaml(path: Path, option: str) -> None:
    try:
        if not path.is_file():
            raise FtuneError(f"{option}: {path} is not a regular file")
        if path.stat().st_size > MAX_TASK_YAML_BYTES:
            raise FtuneError(f"larger than {MAX_TASK_YAML_BYTES >> 20} MiB; not an lm-eval task file", place=str(path))
        text = path.read_bytes().decode("utf-8-sig")
        data = yaml.load(text, Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as exc:
        raise FtuneError(f"byte {exc.start} is not UTF-8 text; save the task file as UTF-8", place=str(path)) from None
    except OSError as exc:
        raise FtuneError(f"cannot read it: {exc.strerror or exc}", place=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FtuneError(f"invalid YAML in an lm-eval task file: {problem}", place=where,
                         hint=f"fix or remove it: lm-eval would skip it, and the tasks it defines would be unknown ({option})") from None
    if not isinstance(data, dict):
        raise FtuneError(f"an lm-eval task file is a mapping (task:, dataset_path:, ...), not {type(data).__name__}",
                         place=f"{path} line 1", hint=f"fix or remove it ({option})")
    includes = data.get("include")
    for name in includes if isinstance(includes, list) else [includes] if includes is not None else []:
        target = Path(str(name)) if Path(str(name)).is_absolute() else path.parent / str(name)
        if not target.is_file():
            raise FtuneError(f"include: {name} does not exist ({target})", place=str(path), hint=f"fix the include ({option})")


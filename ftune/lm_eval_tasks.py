"""lm-evaluation-harness tasks for `ftune eval --lm-eval-tasks`: named, checked before any model
loads, run on each transformers model, and their errors turned into ftune errors."""

from __future__ import annotations

import difflib
import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path

from ftune import chat, models
from ftune.errors import FtuneError

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
            if not Path(folder).is_dir():
                raise FtuneError(f"--lm-eval-include {folder}: no such directory", hint="name a folder of lm-eval task YAML files")
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

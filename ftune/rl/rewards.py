"""Reward functions: the built-ins, the user's own (FILE.py:FUNCTION), a reward model, and the
one guarded place every one of them is called from (`score`).

Each reward scores a batch of completions with one number (or None: does not apply) each.
A reward function that raises, returns the wrong count, NaN or something not a number stops
the run with a message naming the function and the data row (file and line) of the prompt,
and, for the user's own function, only its own traceback frames, never the trainer's.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.recipe import Recipe, RewardSection

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
JSON_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class Batch:
    """Completions to score, one entry per completion (a prompt's group of n is n entries)."""

    prompts: list  # each completion's prompt as the data gave it (text or messages)
    completions: list[str]
    columns: dict[str, list]  # the rows' other columns, one value per completion
    tokens: list[int]  # each completion's length in tokens
    places: list[str]  # each completion's prompt's data row


@dataclass(frozen=True)
class Reward:
    label: str  # the name in metrics and messages
    weight: float
    call: Callable[[Batch], list]  # batch -> one value per completion
    user_file: Path | None = None  # a user's function: its file, whose frames an error shows
    what: str = ""  # how messages name it: "reward function 'correct' (rewards.py:correct)"


def function_file(reference: str, base_dir: Path) -> tuple[Path, str]:
    path, _, name = reference.rpartition(":")
    file = Path(path).expanduser()
    return (file if file.is_absolute() else base_dir / file), name


def check_rewards(recipe: Recipe, base_dir: Path, rows) -> None:
    """Before the model loads: every function file exists and defines its function (read, not run),
    every reward-model run is there, and every row has the column exact_answer reads."""
    for i, spec in enumerate(recipe.rewards):
        at = f"rewards[{i}] ({spec.label})"
        if spec.type == "function":
            file, name = function_file(spec.function, base_dir)
            if not file.is_file():
                raise FtuneError(f"{at}: the reward function's file {file} does not exist")
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
            except SyntaxError as exc:
                raise FtuneError(f"{at}: {file} line {exc.lineno}: invalid Python: {exc.msg}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise FtuneError(f"{at}: cannot read {file}: {exc}") from None
            names = _top_level_names(tree)
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                raise FtuneError(f"{at}: {file} defines no function '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        elif spec.type == "reward_model":
            run_dir = Path(spec.run).expanduser()
            run_dir = run_dir if run_dir.is_absolute() else base_dir / run_dir
            if not run_dir.is_dir():
                raise FtuneError(f"{at}: the reward-model run {run_dir} does not exist", hint="train one with `ftune rm RECIPE`")
            from ftune import runs
            from ftune.reward import reward_model_kind

            meta = runs.read_json_object(run_dir / runs.RUN_FILE) if (run_dir / runs.RUN_FILE).is_file() else None
            if meta is not None and meta.get("stage") != "rm":  # found now, not after the policy has loaded
                raise FtuneError(f"{at}: {run_dir} is an ftune {meta.get('stage')} run, not a reward model",
                                 hint="name an `ftune rm` run directory")
            if reward_model_kind(run_dir) is None:
                raise FtuneError(f"{at}: {run_dir} is not a reward model (an `ftune rm` run, a score-head adapter or a "
                                 "sequence-classification model)")
            if meta is not None and meta.get("status") != "completed":
                raise FtuneError(f"{at}: the reward-model run {run_dir} is not a completed run (status: {meta.get('status')})",
                                 hint="finish it (`ftune rm RECIPE --resume`) or name a completed one")
        elif spec.type == "exact_answer":
            for prompts in rows:
                for columns, place in zip(prompts.columns, prompts.places):
                    if columns.get(spec.column) is None:
                        raise FtuneError(f"{at} compares the answer with column '{spec.column}', which this row does not "
                                         f"have (its columns: {', '.join(sorted(columns)) or 'none'})", place=place,
                                         hint=f"set rewards[{i}].column to the column holding the expected answer")


def _top_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
    return names


def load_rewards(recipe: Recipe, base_dir: Path, *, reward_model: Callable[[RewardSection, Path], Callable] | None = None) -> list[Reward]:
    """The recipe's rewards, ready to call. A user's file is executed here, and only because the recipe names it."""
    out = []
    for spec in recipe.rewards:
        if spec.type == "function":
            file, name = function_file(spec.function, base_dir)
            fn = _load_function(file, name, spec.label)
            out.append(Reward(spec.label, spec.weight, _user_call(fn), file, f"reward function '{spec.label}' ({spec.function})"))
        elif spec.type == "reward_model":
            if reward_model is None:
                raise FtuneError(f"reward '{spec.label}': reward_model rewards need a way to load an ftune rm run")
            run_dir = Path(spec.run).expanduser()
            out.append(Reward(spec.label, spec.weight, reward_model(spec, run_dir if run_dir.is_absolute() else base_dir / run_dir),
                              what=f"reward model '{spec.label}' ({spec.run})"))
        else:
            out.append(Reward(spec.label, spec.weight, BUILT_INS[spec.type](spec, recipe), what=f"reward '{spec.label}' ({spec.type})"))
    return out


def _load_function(file: Path, name: str, label: str) -> Callable:
    module_name = f"ftune_user_rewards_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise FtuneError(f"reward function '{label}': cannot load {file} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the user's module look themselves up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's module failed while loading: show its own frames only
        raise FtuneError(f"reward function '{label}': loading {file} raised {type(exc).__name__}: {exc}"
                         + _user_frames(exc, file)) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise FtuneError(f"reward function '{label}': {file}'s '{name}' is a {type(fn).__name__}, not a function")
    return fn


def _user_call(fn: Callable) -> Callable[[Batch], list]:
    return lambda batch: fn(batch.prompts, batch.completions, **batch.columns)


def score(rewards: list[Reward], batch: Batch, group: int) -> tuple[list[float], dict[str, list[float | None]]]:
    """The weighted total of every completion (None counts 0) and each reward's own values.

    The one place reward functions are called: an exception, a wrong count or a value that is
    no finite number stops the run here, naming the function and the data row."""
    per = {reward.label: _checked(reward, batch, group) for reward in rewards}
    totals = [sum(r.weight * v for r in rewards if (v := per[r.label][i]) is not None) for i in range(len(batch.completions))]
    return [float(t) for t in totals], per


def _checked(reward: Reward, batch: Batch, group: int) -> list[float | None]:
    try:
        values = reward.call(batch)
    except Exception as exc:  # stop signals (KeyboardInterrupt) pass through
        place = _failing_row(reward, batch, group)
        frames = _user_frames(exc, reward.user_file) if reward.user_file else ""
        raise FtuneError(f"{reward.what} raised {type(exc).__name__}: {exc}{frames}", place=place,
                         hint=None if reward.user_file else "this is a bug in ftune: please report it") from None
    n = len(batch.completions)
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise FtuneError(f"{reward.what} returned {type(values).__name__}, not a list of {n} numbers (one per completion)",
                         place=_rows(batch))
    values = list(values)
    if len(values) != n:
        raise FtuneError(f"{reward.what} returned {len(values)} values for {n} completions ({n // group} prompts x {group} "
                         "generations); it must return one number (or None) per completion, in order", place=_rows(batch))
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        try:
            number = float(value) if not isinstance(value, (str, bytes)) else None
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise FtuneError(f"{reward.what} returned {value!r} ({type(value).__name__}) for completion {i}, not a number "
                             "(or None)", place=batch.places[i])
        if not math.isfinite(number):
            raise FtuneError(f"{reward.what} returned {number} for completion {i}: a reward must be a finite number",
                             place=batch.places[i])
        out.append(number)
    return out


def _failing_row(reward: Reward, batch: Batch, group: int) -> str:
    """The first prompt whose completions alone make the function raise; else the batch's rows."""
    for start in range(0, len(batch.completions), group):
        part = slice(start, start + group)
        one = Batch(batch.prompts[part], batch.completions[part], {k: v[part] for k, v in batch.columns.items()},
                    batch.tokens[part], batch.places[part])
        try:
            reward.call(one)
        except Exception:
            return batch.places[start]
    return _rows(batch)


def _rows(batch: Batch) -> str:
    places = list(dict.fromkeys(batch.places))
    shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
    return f"the prompts of rows {shown}" if len(places) > 1 else places[0]


def _user_frames(exc: BaseException, file: Path) -> str:
    """The frames of the exception from the user's file on (ftune's and Python's own left out)."""
    frames = traceback.extract_tb(exc.__traceback__)
    target = file.resolve()
    start = next((i for i, f in enumerate(frames) if Path(f.filename).resolve() == target), None)
    if start is None:
        return ""
    libraries = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    kept = [f for f in frames[start:] if not str(Path(f.filename).resolve()).startswith(libraries) or Path(f.filename).resolve() == target]
    lines = [f"\n  at {f.filename} line {f.lineno}, in {f.name}" + (f": {f.line.strip()}" if f.line else "") for f in kept]
    return "".join(lines)


# --------------------------------------------------------------------------- built-ins


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The completion's final answer: the last `pattern` match (its first group, else all of it); without a
    pattern, the text of the last <answer>...</answer>, else the last number in the text; None when there is none."""
    if pattern is not None:
        matches = list(re.finditer(pattern, text, re.DOTALL))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if last.groups() else last.group(0)
    tags = ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same_answer(found: str | None, expected) -> bool:
    """Numbers compare as numbers (42 = 42.0 = 4.2e1, 1,000 = 1000); other text ignoring case and spacing."""
    if found is None or expected is None:
        return False
    a, b = _number(found), _number(expected)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return " ".join(found.split()).casefold() == " ".join(str(expected).split()).casefold()


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    text = str(value).strip().replace(",", "").rstrip(".")
    if not NUMBER.fullmatch(text):
        return None
    return float(text)


def _exact_answer(spec: RewardSection, recipe: Recipe) -> Callable[[Batch], list]:
    def call(batch: Batch) -> list:
        expected = batch.columns.get(spec.column) or [None] * len(batch.completions)
        return [1.0 if same_answer(extract_answer(c, spec.pattern), e) else 0.0 for c, e in zip(batch.completions, expected)]

    return call


def _format(spec: RewardSection, recipe: Recipe) -> Callable[[Batch], list]:
    regex = re.compile(spec.regex, re.DOTALL)
    return lambda batch: [1.0 if regex.search(c) else 0.0 for c in batch.completions]


def _length(spec: RewardSection, recipe: Recipe) -> Callable[[Batch], list]:
    scale = recipe.grpo.max_completion_length
    return lambda batch: [-abs(n - spec.target) / scale for n in batch.tokens]


def _json(spec: RewardSection, recipe: Recipe) -> Callable[[Batch], list]:
    def parses(text: str) -> float:
        text = text.strip()
        fenced = JSON_FENCE.match(text)
        try:
            json.loads(fenced.group(1) if fenced else text)
        except (ValueError, RecursionError):
            return 0.0
        return 1.0

    return lambda batch: [parses(c) for c in batch.completions]


BUILT_INS = {"exact_answer": _exact_answer, "format": _format, "length": _length, "json": _json}

"""Reward functions: the built-ins, the user's own (FILE.py:FUNCTION), a reward model, and the
one guarded place every one of them is called from (`score`).

Each reward scores a batch of completions with one number (or None: does not apply) each.
The user's own functions run in a worker process (ftune/guards/usercode.py), a step's batch a call.
A reward that raises, exits, hangs past rewards[i].timeout_s, returns the wrong count, NaN or
something not a number stops the run with a message naming the function and the data row (file
and line) of the prompt, and, for the user's own function, only its own traceback frames.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.guards import textio, usercode
from ftune.guards.usercode_worker import plain
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
    user_file: Path | None = None  # a user's function: its file (the function runs in that file's worker)
    what: str = ""  # how messages name it: "reward function 'correct' (rewards.py:correct)"


def function_file(reference: str, base_dir: Path) -> tuple[Path, str]:
    path, _, name = reference.rpartition(":")
    file = Path(path).expanduser()
    return (file if file.is_absolute() else base_dir / file), name


def check_rewards(recipe: Recipe, base_dir: Path, rows) -> None:
    """Before the model loads: every function file exists, imports (in its worker) and defines its function,
    every reward-model run is there, and every row has the column exact_answer reads."""
    for i, spec in enumerate(recipe.rewards):
        at = f"rewards[{i}] ({spec.label})"
        if spec.type == "function":
            file, name = function_file(spec.function, base_dir)
            if not file.is_file():
                raise FtuneError(f"{at}: the reward function's file {file} does not exist")
            try:
                code = usercode.open_file(file, file.name)
            except FtuneError as exc:  # it does not import: the error names the file and line
                raise FtuneError(f"{exc.message} ({at})", place=exc.place, hint=exc.hint) from None
            code.function(name, at)  # the module as Python ran it decides what it defines (a def inside try: too)
        elif spec.type == "reward_model":
            run_dir = Path(spec.run).expanduser()
            run_dir = run_dir if run_dir.is_absolute() else base_dir / run_dir
            if not run_dir.is_dir():
                raise FtuneError(f"{at}: the reward-model run {run_dir} does not exist", hint="train one with `ftune rm RECIPE`")
            from ftune.artifacts import ownership, runs
            from ftune.modeling.reward_model import reward_model_kind

            if (run_dir / ownership.RUN_FILE).is_file():  # found now, not after the policy has loaded
                runs.read_run(run_dir, expect="reward model", what=f"{at} (type: reward_model)")
            if reward_model_kind(run_dir) is None:
                raise FtuneError(f"{at}: {run_dir} is not a reward model (an `ftune rm` run, a score-head adapter or a "
                                 "sequence-classification model)")
        elif spec.type == "exact_answer":
            for prompts in rows:
                for columns, place in zip(prompts.columns, prompts.places):
                    if columns.get(spec.column) is None:
                        raise FtuneError(f"{at} compares the answer with column '{spec.column}', which this row does not "
                                         f"have (its columns: {', '.join(sorted(columns)) or 'none'})", place=place,
                                         hint=f"set rewards[{i}].column to the column holding the expected answer")


def load_rewards(recipe: Recipe, base_dir: Path, *, reward_model: Callable[[RewardSection, Path], Callable] | None = None) -> list[Reward]:
    """The recipe's rewards, ready to call. A user's file runs (in its worker) only because the recipe names it."""
    out = []
    for i, spec in enumerate(recipe.rewards):
        if spec.type == "function":
            file, name = function_file(spec.function, base_dir)
            what = f"reward function '{spec.label}' ({spec.function})"
            code = usercode.open_file(file, file.name)
            code.function(name, what)
            out.append(Reward(spec.label, spec.weight, _user_call(code, name, what, spec.timeout_s, f"rewards[{i}].timeout_s"), file, what))
        elif spec.type == "reward_model":
            if reward_model is None:
                raise FtuneError(f"reward '{spec.label}': reward_model rewards need a way to load an ftune rm run")
            run_dir = Path(spec.run).expanduser()
            out.append(Reward(spec.label, spec.weight, reward_model(spec, run_dir if run_dir.is_absolute() else base_dir / run_dir),
                              what=f"reward model '{spec.label}' ({spec.run})"))
        else:
            out.append(Reward(spec.label, spec.weight, BUILT_INS[spec.type](spec, recipe), what=f"reward '{spec.label}' ({spec.type})"))
    return out


def _user_call(code: usercode.UserCode, name: str, what: str, timeout: float, limit_key: str) -> Callable[[Batch], list]:
    return lambda batch: code.call(name, (batch.prompts, batch.completions), batch.columns, what=what, place=_rows(batch),
                                   timeout=timeout, limit_key=limit_key)


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
    except usercode.UserCodeFailed as exc:  # the user's function raised or exited: name the prompt it fails on
        raise FtuneError(exc.message, place=_failing_row(reward, batch, group), hint=exc.hint) from None
    except FtuneError:
        raise
    except Exception as exc:  # a built-in or a reward model: stop signals (KeyboardInterrupt) pass through
        raise FtuneError(f"{reward.what} raised {type(exc).__name__}: {exc}", place=_rows(batch),
                         hint="this is a bug in ftune: please report it") from None
    n = len(batch.completions)
    return usercode.numbers(plain(values), n, reward.what, batch.places, _rows(batch),
                            f"{n} completions ({n // group} prompts x {group} generations)")


def _failing_row(reward: Reward, batch: Batch, group: int) -> str:
    """The first prompt whose completions alone make the function raise; else the batch's rows."""
    for start in range(0, len(batch.completions), group):
        part = slice(start, start + group)
        one = Batch(batch.prompts[part], batch.completions[part], {k: v[part] for k, v in batch.columns.items()},
                    batch.tokens[part], batch.places[part])
        try:
            reward.call(one)
        except usercode.UserCodeFailed:
            return batch.places[start]
    return _rows(batch)


def _rows(batch: Batch) -> str:
    places = list(dict.fromkeys(batch.places))
    shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
    return f"the prompts of rows {shown}" if len(places) > 1 else places[0]


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
        try:  # bounded: a completion nested 100,000 deep is not JSON worth a reward, nor a crash
            textio.loads(fenced.group(1) if fenced else text, "completion")
        except FtuneError:
            return 0.0
        return 1.0

    return lambda batch: [parses(c) for c in batch.completions]


BUILT_INS = {"exact_answer": _exact_answer, "format": _format, "length": _length, "json": _json}

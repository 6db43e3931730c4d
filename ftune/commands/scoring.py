"""What commands do with a trained reward model: `ftune score`, and `ftune eval` on one.

`ftune score MODEL --data FILE`: every row of FILE gets its reward, read as training read it.
A row is a pair (any form `ftune rm` trains on: prompt/chosen/rejected, chosen/rejected
conversations, hh-rlhf dialogues), a prompt with a completion, a conversation (messages,
sharegpt, alpaca), or plain text. The output is FILE's rows as JSON lines with `reward`
(or `reward_chosen`, `reward_rejected` and `reward_margin` for a pair) added, written
atomically, with OUT.score.json beside it saying what made it; ftune replaces only an output
it wrote.

`ftune eval RM...`: the pairwise accuracy, mean margin, and the rewards' mean and spread of
reward models on the same pairs: the run's own held-out split (as `ftune rm` split it), a
recipe's, or every pair of a data file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ftune.artifacts import ownership, runs
from ftune.artifacts.file_targets import check_file_target
from ftune.data.formats import BadRow, Chat, Raw, convert, detect_format, kind
from ftune.data.sources import read_source
from ftune.errors import FtuneError
from ftune.guards import textio
from ftune.modeling import reward_model
from ftune.recipe import DataSection, DataSource, Recipe, load_recipe
from ftune.train import reward_training

SIDECAR = ".score.json"  # OUT.score.json: what wrote OUT from what; it is also how ftune knows OUT is its own


# --------------------------------------------------------------------------- ftune score


def score_file(model: Path, data: Path, out: Path | None = None, *, overwrite: bool = False, trust_remote_code: bool = False,
               say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Score every row of `data` with the reward model `model`: the output written, and what OUT.score.json records."""
    model, data = Path(model).expanduser(), Path(data).expanduser()
    if reward_model.reward_model_kind(model) is None:
        reward_model.load(model)  # its refusal says what a reward model is
    out = Path(out).expanduser() if out is not None else data.with_name(data.stem + ".scored.jsonl")
    _check_output(out, data, model, overwrite=overwrite)
    rows, _ = read_source(str(data), base_dir=Path.cwd())
    if not rows:
        raise FtuneError("the data file has no rows", place=str(data))
    judged = [_judged(row.data, row.place) for row in rows]  # every row is checked before the model loads
    say(f"loading {model} ({reward_model.reward_model_kind(model)})")
    scorer = reward_model.load(model, trust_remote_code=trust_remote_code)
    sequences = [_ids(scorer, sample, row.place) for row, (samples, _) in zip(rows, judged) for sample in samples]
    say(f"scoring {len(sequences)} sequences of {len(rows)} rows")
    rewards = iter(scorer.score_ids(sequences))
    singles, margins, unscored = [], [], []
    with ownership.atomic_file(out) as handle:
        for row, (_, paired) in zip(rows, judged):
            # A model can score NaN or infinity (a broken head, an overflow): JSON cannot hold it, so the
            # row's reward is written as an explicit null, counted, and left out of every mean.
            if paired:
                chosen, rejected = textio.finite_or_none(next(rewards)), textio.finite_or_none(next(rewards))
                margin = chosen - rejected if chosen is not None and rejected is not None else None
                added = {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": textio.finite_or_none(margin)}
                if added["reward_margin"] is not None:
                    margins.append(margin)
            else:
                added = {"reward": textio.finite_or_none(next(rewards))}
                if added["reward"] is not None:
                    singles.append(added["reward"])
            if None in added.values():
                unscored.append(row.place)
            handle.write(textio.dumps({**row.data, **added}, place=row.place, ensure_ascii=False) + "\n")
    summary = {"written_by": "ftune", "command": "score", "output": out.name, "model": str(model), "data": str(data),
               "rows": len(rows), "pairs": len(margins), "mean_reward": _mean(singles),
               "pairwise_accuracy": _mean([float(m > 0) for m in margins]), "mean_margin": _mean(margins),
               "not_finite": len(unscored), "first_not_finite": unscored[0] if unscored else None,
               "versions": runs.package_versions()}
    ownership.write_json(_sidecar(out), summary)
    return out, summary


def _judged(row, place: str) -> tuple[list, bool]:
    """The sequences one row asks to score, built as training builds them, and whether they are a
    pair (chosen, then rejected)."""
    try:
        if not isinstance(row, dict):
            raise BadRow(f"a row must be an object with named fields, not {kind(row)}")
        fmt = detect_format(row)
        if fmt == "preference":
            pair = convert(row, "preference")
            return [Chat(pair.prompt + pair.chosen), Chat(pair.prompt + pair.rejected)], True
        if fmt in ("prompt_completion", "kto"):  # the prompt and completion read as KTO reads them, its label aside
            single = convert({**row, "label": True}, "kto")
            return [Chat(single.prompt + single.chosen)], False
        return [convert(row, fmt)], False
    except BadRow as exc:
        raise FtuneError(str(exc), place=place,
                         hint="a row is a pair (prompt/chosen/rejected), a prompt with a completion, a conversation or a text") from None


def _ids(scorer: reward_model.RewardModel, sample, place: str) -> list[int]:
    """Token ids of a conversation (the last answer judged) or a text, as training encodes them."""
    formatter = scorer.formatter
    if isinstance(sample, Raw):
        return formatter.encode(sample)[0]
    result = formatter.encode_each([Chat(formatter.with_system(sample.messages), sample.tools)], last_turn_only=True, places=[place])[0]
    if isinstance(result, BadRow):
        raise FtuneError(str(result), place=place)
    return result[0][0]


def _check_output(out: Path, data: Path, model: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that is the data, inside the model, a directory, or a
    file `ftune score` did not write (the shared rule: ownership.check_file_target); its sidecar too."""
    inputs = [("the data file being scored", data), ("the reward model", model)]
    target = check_file_target(out, kind="scores", ours=_ours, overwrite=overwrite, inputs=inputs, option="--out")
    # The sidecar is replaced with the output it describes: only when it is that output's own.
    check_file_target(_sidecar(target), kind="scores", ours=lambda _path: _ours(target), overwrite=True, inputs=inputs, option="--out")


def _ours(out: Path) -> bool:
    meta = ownership.read_json_object(_sidecar(out))
    return meta is not None and meta.get("written_by") == "ftune" and meta.get("command") == "score" and meta.get("output") == out.name


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + SIDECAR)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- ftune eval


def evaluate_reward_models(specs: list[str], *, recipe_path: Path | None, overrides: list[str], data: Path | None,
                           max_length: int, max_samples: int | None, trust_remote_code: bool, say: Callable[[str], None]) -> dict:
    """Pairwise figures of every reward model in `specs` on the same held-out pairs (see the module docstring)."""
    others = [s for s in specs if reward_model.reward_model_kind(Path(s)) is None]
    if others:
        raise FtuneError(f"{others[0]} is not a reward model: reward models and language models are not scored on the same "
                         "figures", hint="evaluate them in separate `ftune eval` commands")
    recipe, base_dir, source = _pairs_recipe(Path(specs[0]), recipe_path, overrides, data, max_length)
    whole = data is not None  # a data file is scored whole; a recipe, on its held-out split
    results: dict = {"reward_models": True, "data": None, "models": [], "generations": [], "lm_eval": {},
                     "versions": runs.package_versions()}
    for spec in specs:
        say(f"loading {spec} ({reward_model.reward_model_kind(Path(spec))})")
        scorer = reward_model.load(Path(spec), trust_remote_code=trust_remote_code)
        pairs = _held_out_pairs(scorer, recipe, base_dir, source, max_samples, whole=whole)
        if results["data"] is None:
            results["data"] = {"source": source, "pairs": len(pairs)}
            say(f"eval data: {source}: {len(pairs)} pairs")
        rewards = scorer.score_ids([pairs.sequences.sample(i)[0].tolist() for i in range(len(pairs.sequences))])
        chosen, rejected = _tensor(rewards[0::2]), _tensor(rewards[1::2])
        margins = _tensor(pairs.margins.tolist()) if pairs.margins is not None else None
        center = recipe.rm.center_coefficient if recipe.rm is not None else 0.0
        figures = reward_training.held_out_figures(chosen, rejected, margins, center, prefix="")
        results["models"].append({"model": spec, "kind": reward_model.reward_model_kind(Path(spec)), **figures})
        del scorer
    return results


def _pairs_recipe(first: Path, recipe_path: Path | None, overrides: list[str], data: Path | None,
                  max_length: int) -> tuple[Recipe, Path, str]:
    """The recipe whose held-out pairs are scored, the folder its paths are relative to, and how to name them."""
    if recipe_path is not None and data is not None:
        raise FtuneError("pass --recipe or --data, not both")
    if data is not None:
        if overrides:
            raise FtuneError("--set changes a recipe key, and no recipe is read here", hint="pass it with --recipe, or drop it")
        section = DataSection(train=[DataSource(path=str(Path(data).expanduser().resolve()), format="preference")],
                              eval_fraction=0.0, max_length=max_length)
        return Recipe(stage="rm", base_model={"name": str(first)}, data=section, rm={}, output={"dir": "."}), Path.cwd(), str(data)
    if recipe_path is not None:
        recipe, base_dir, source = load_recipe(recipe_path, overrides), Path(recipe_path).parent.resolve(), str(recipe_path)
    elif (first / ownership.RUN_FILE).is_file() and (first / runs.RECIPE_FILE).is_file():
        run = runs.read_run(first, expect="reward model")
        recipe, source = load_recipe(first / runs.RECIPE_FILE, overrides), str(first / runs.RECIPE_FILE)
        if run.recipe_dir is None or not run.recipe_dir.is_dir():
            raise FtuneError(f"the recipe saved in {first} reads its data relative to the folder the recipe was in, which "
                             "is not here", hint="pass --recipe with the recipe it was trained from, or --data FILE")
        base_dir = run.recipe_dir
    else:
        raise FtuneError("nothing to evaluate the reward model on", hint="pass --data FILE with preference pairs, or --recipe")
    if recipe.stage not in ("rm", "dpo"):
        raise FtuneError(f"a {recipe.stage} recipe holds no preference pairs to score", place=source,
                         hint="pass an rm or dpo recipe, or --data FILE with pairs")
    return recipe, base_dir, f"{source} (held-out split)"


def _held_out_pairs(scorer: reward_model.RewardModel, recipe: Recipe, base_dir: Path, source: str, max_samples: int | None, *,
                    whole: bool):
    """The recipe's held-out pairs (`whole`: every pair), tokenized with this model's own formatter."""
    from ftune.data.pairs import encode_pairs
    from ftune.data.pipeline import DataReport, load_samples

    train, held_out, report, _ = load_samples(recipe.data, base_dir=base_dir, seed=recipe.training.seed, allowed={"preference"})
    rows = train if whole else held_out
    if recipe.stage == "rm":
        pairs = reward_training.encode(scorer.formatter, rows, recipe, report)
    else:
        pairs = encode_pairs(scorer.formatter, rows.samples, method="dpo", max_length=recipe.data.max_length,
                             max_prompt_length=recipe.preference.max_prompt_length, report=DataReport())
    if max_samples:
        pairs = pairs.head(max_samples)
    if not len(pairs):
        raise FtuneError("no preference pairs to score", place=source, hint="set data.eval or data.eval_fraction, or pass --data")
    return pairs


def _tensor(values: list[float]):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def print_results(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"held-out pairs: {results['data']['source']}")
    for column in ("model", "pairwise accuracy", "mean margin", "reward mean", "reward std", "loss", "pairs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results["models"]:
        table.add_row(r["model"], f"{r['reward_accuracy']:.1%}", f"{r['reward_margin']:+.3f}", f"{r['reward_mean']:+.3f}",
                      f"{r['reward_std']:.3f}", f"{r['loss']:.4f}", str(r["pairs"]))
    console.print(table)

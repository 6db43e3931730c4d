"""`ftune eval MODEL...`: held-out loss and perplexity, and answers side by side.

Every model is scored on the same tokens. The eval data is tokenized once: with a recipe,
exactly as `ftune sft` held it out (same split, template, truncation and cache); with a
data file, with the first transformers model's tokenizer and chat template. Transformers
models compute the loss through the same `evaluate` that writes a run's eval_loss, so a
run scores here what it logged; GGUF files run the same token ids through llama.cpp with
logits kept for every position, and the loss is taken at the same answer positions.

Models are loaded one at a time and freed before the next.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ftune.artifacts.file_targets import check_file_target
from ftune.artifacts.ownership import read_json_object, write_json
from ftune.artifacts.runs import RECIPE_FILE, package_versions, read_run, recipe_inputs
from ftune.commands import chat
from ftune.commands.lm_eval_tasks import LmEvalTasks
from ftune.data.packing import Encoded, collate
from ftune.data.rendering import IGNORE
from ftune.errors import FtuneError
from ftune.guards import textio
from ftune.modeling import models
from ftune.recipe import Recipe, load_recipe

GREEDY = chat.Sampling(max_new_tokens=64, temperature=0.0)


def run_eval(
    specs: list[str],
    *,
    recipe_path: Path | None = None,
    overrides: list[str] = (),
    data: Path | None = None,
    max_length: int = 2048,
    max_samples: int | None = None,
    prompts: list[str] = (),
    sampling: chat.Sampling = GREEDY,
    lm_eval_tasks: list[str] = (),
    lm_eval_include: list[Path] = (),
    lm_eval_limit: int | None = None,
    trust_remote_code: bool = False,
    out: Path | None = None,
    prompts_file: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Score every model in `specs`; returns (and writes to `out`) the results as a dict.

    With neither a recipe nor a data file, nor prompts or lm-eval tasks, a run among the
    models is scored on its own recipe's held-out split. Python shipped with a model runs only
    with `trust_remote_code` (the command line) or the user's own recipe asking for it.
    """
    if not specs:
        raise FtuneError("name at least one model to evaluate")
    if recipe_path is not None and data is not None:
        raise FtuneError("pass --recipe or --data, not both")
    for option, value in (("--max-samples", max_samples), ("--lm-eval-limit", lm_eval_limit), ("--max-length", max_length)):
        if value is not None and value < 1:
            raise FtuneError(f"{option} {value}: must be at least 1")
    if out is not None:
        inputs = [("the model", Path(spec)) for spec in specs if Path(spec).exists()]
        inputs += recipe_inputs(load_recipe(Path(recipe_path), overrides), Path(recipe_path)) if recipe_path is not None else []
        inputs += [("the data file", Path(data))] if data is not None else []
        inputs += [("the prompts file", Path(prompts_file))] if prompts_file is not None else []
        check_out(Path(out), inputs)
    if lm_eval_include and not lm_eval_tasks:
        raise FtuneError("--lm-eval-include adds task folders for --lm-eval-tasks, and no task is named",
                         hint="name the tasks, groups or tags to run with --lm-eval-tasks NAME[,NAME...]")
    from ftune.modeling.reward_model import reward_model_kind

    if any(reward_model_kind(Path(spec)) for spec in specs):  # a reward model scores pairs, not answers (scoring.py)
        from ftune.commands.scoring import evaluate_reward_models

        if prompts or lm_eval_tasks:
            raise FtuneError("a reward model writes no answers and runs no lm-eval tasks", hint="drop --prompt/--lm-eval-tasks")
        results = evaluate_reward_models(list(specs), recipe_path=recipe_path, overrides=list(overrides), data=data, max_length=max_length,
                                         max_samples=max_samples, trust_remote_code=trust_remote_code, say=say)
        if out is not None:
            write_results(out, results)
        return results
    user_recipe = load_recipe(Path(recipe_path), overrides) if recipe_path is not None else None
    trust = trust_remote_code or bool(user_recipe is not None and user_recipe.base_model.trust_remote_code)
    # Every name is checked before any model loads: the models, then the lm-eval tasks.
    targets = [dataclasses.replace(chat.resolve(spec), trust_remote_code=trust) for spec in specs]
    harness = LmEvalTasks.check(list(lm_eval_tasks), list(lm_eval_include)) if lm_eval_tasks else None

    held_out: HeldOut | None = None
    if user_recipe is not None:
        held_out = HeldOut(user_recipe, Path(recipe_path).parent.resolve(), Path(recipe_path))
    elif data is None and not prompts and harness is None:
        held_out = own_recipe(targets, overrides)
    elif overrides:
        raise FtuneError("--set changes a recipe key, and no recipe is read here", hint="pass it with --recipe, or drop it")
    recipe, eval_set, tokenizer, source = None, None, None, None
    if held_out is not None or data is not None:
        recipe, eval_set, tokenizer, source = eval_data(targets, held_out, data, max_length, max_samples, trust)
        say(f"eval data: {source}: {len(eval_set)} samples, {eval_set.trained_tokens():,} answer tokens")

    results: dict = {"data": None, "models": [], "generations": [], "lm_eval": {}, "sampling": dataclasses.asdict(sampling),
                     "versions": package_versions()}
    if eval_set is not None:
        results["data"] = {"source": source, "samples": len(eval_set), "answer_tokens": eval_set.trained_tokens()}
    answers: dict[str, list[str]] = {}
    for target in targets:
        say(f"loading {target.spec} ({target.kind})")
        started = time.perf_counter()
        longest = int(eval_set.lengths().max()) if eval_set is not None and len(eval_set) else 0
        loaded = chat.load(target, logits=eval_set is not None, context=max(longest, 1024))
        try:
            row = {"model": target.spec, "kind": target.kind}
            if eval_set is not None:
                row |= score(loaded, eval_set, recipe, tokenizer)
            answers[target.spec] = [chat.answer(loaded, [{"role": "user", "content": p}], sampling) for p in prompts]
            if harness is not None:
                results["lm_eval"][target.spec] = harness.run(loaded, lm_eval_limit, say)
            for note in getattr(loaded, "notes", []):
                say(f"  note: {note}")
                row.setdefault("notes", []).append(note)
            row["seconds"] = round(time.perf_counter() - started, 1)
            results["models"].append(row)
        finally:
            loaded.close()
    results["generations"] = [{"prompt": p, "answers": {spec: a[i] for spec, a in answers.items()}} for i, p in enumerate(prompts)]
    if out is not None:
        write_results(out, results)
    return results


# `ftune eval --out FILE`: the results JSON says who wrote it, which is what lets a later eval replace it.
WRITTEN_BY = {"written_by": "ftune", "command": "eval"}
# Results written before they said so: exactly these keys.
_OLD_KEYS = ({"data", "models", "generations", "lm_eval", "sampling", "versions"}, {"data", "models", "versions"})


def check_out(out: Path, inputs: list[tuple[str, Path]]) -> Path:
    """Refuse, before any model loads, an --out that is an input or a file another command (or the user) wrote.
    An earlier `ftune eval` output is replaced, as it always was (eval has no --overwrite)."""
    return check_file_target(out, kind="eval-results", ours=_ours, overwrite=True, inputs=inputs, option="--out")


def _ours(path: Path) -> bool:
    data = read_json_object(path)
    if data is None:
        return False
    return all(data.get(k) == v for k, v in WRITTEN_BY.items()) or set(data) in _OLD_KEYS


def write_results(out: Path, results: dict) -> None:
    results, nulls = textio.nulled(results)  # a diverged model's loss or perplexity: null, and said
    if nulls:
        sys.stderr.write(textio.nulls_note(nulls) + f" in {out}\n")
    write_json(Path(out), {**WRITTEN_BY, **results})


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """A recipe whose held-out split is scored, the folder its data paths are relative to, and how to name it."""

    recipe: Recipe
    base_dir: Path
    path: Path  # the recipe file, named in messages
    tokenizer: Path | None = None  # a run's own tokenizer (saved with its adapter), else the recipe's base model's


def own_recipe(targets: list[chat.Target], overrides: list[str]) -> HeldOut:
    """The held-out split of the first run among the models, from the recipe saved in it."""
    runs = [t for t in targets if t.kind == "run" and (Path(t.spec).expanduser() / RECIPE_FILE).is_file()]
    if not runs:
        raise FtuneError("nothing to evaluate",
                         hint="pass --recipe or --data for held-out loss (a run directory uses its own recipe), "
                              "--prompt for answers side by side, or --lm-eval-tasks")
    run_dir = Path(runs[0].spec).expanduser()
    # A run directory may come from anyone: its recipe's trust_remote_code is switched off, and
    # trust comes from the command line alone.
    recipe = load_recipe(run_dir / RECIPE_FILE, overrides)
    recipe = recipe.model_copy(update={"base_model": recipe.base_model.model_copy(update={"trust_remote_code": False})})
    if recipe.stage != "sft":
        raise FtuneError(f"{run_dir} is a {recipe.stage} run: its held-out data is preference pairs, and `ftune eval` scores "
                         "the loss of answers", place=str(run_dir / RECIPE_FILE),
                         hint="pass --data FILE with answer rows, or --recipe with the SFT stage's recipe")
    return HeldOut(recipe, recipe_dir(run_dir, recipe), run_dir / RECIPE_FILE, tokenizer=runs[0].tokenizer)


def recipe_dir(run_dir: Path, recipe: Recipe) -> Path:
    """The folder the run's recipe was in: its relative data paths start there.

    run.json records it; a run written before it did is matched by where its output.dir
    leads from each folder above it. A guess is never made: a wrong folder could hold
    other files of the same names.
    """
    recorded = read_run(run_dir).get("recipe_dir")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    here = run_dir.resolve()
    output = Path(recipe.output.dir).expanduser()
    if not output.is_absolute():
        for folder in here.parents:
            target = (folder / output).resolve()
            if here in (target, target.with_name(target.name + "-smoke")):
                return folder
    paths = [Path(s.path).expanduser() for s in (*recipe.data.train, *recipe.data.eval)]
    if all(p.is_absolute() for p in paths):
        return run_dir
    where = f"recorded as {recorded}, which does not exist here" if isinstance(recorded, str) else "not recorded in run.json"
    raise FtuneError(f"the recipe saved in {run_dir} reads its data relative to the folder the recipe was in, {where}",
                     hint="pass --recipe with the recipe it was trained from, or --data FILE")


def eval_data(targets: list[chat.Target], held_out: HeldOut | None, data: Path | None, max_length: int,
              max_samples: int | None, trust: bool):
    """(recipe, eval set, tokenizer, description): a recipe's held-out split, or a data file as a whole."""
    from ftune.data.pipeline import prepare_sft
    from ftune.data.rendering import formatter_for

    if held_out is not None:
        recipe, base_dir, source = held_out.recipe, held_out.base_dir, f"{held_out.path} (held-out split)"
        tokenizer_dir = str(held_out.tokenizer) if held_out.tokenizer is not None else models.resolve_model_path(
            recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
    else:
        reference = next((t for t in targets if t.kind != "gguf"), None)
        if reference is None:
            raise FtuneError("a data file is tokenized with a transformers model's tokenizer, and every model here is a GGUF file",
                             hint="add the model the GGUF was exported from, or pass --recipe")
        base_dir = Path.cwd()
        tokenizer_dir = str(reference.tokenizer)
        # The data file as a recipe's training data: read, converted and tokenized as `ftune sft` would.
        recipe = Recipe.model_validate({
            "stage": "sft", "base_model": {"name": tokenizer_dir},
            "data": {"train": [{"path": str(Path(data).resolve())}], "eval_fraction": 0.0, "max_length": max_length,
                     "chat_template": reference.chat_template, "system_prompt": reference.system_prompt},
            "output": {"dir": "."},
        })
        source = str(data)
    models.quiet_libraries()
    tokenizer = models.load_tokenizer(tokenizer_dir, trust_remote_code=trust)
    formatter = formatter_for(tokenizer, recipe.data, base_dir=base_dir)
    train, evaluation, _report = prepare_sft(recipe, tokenizer, formatter, base_dir=base_dir, cache_root=models.cache_dir() / "data")
    eval_set = evaluation if held_out is not None else train
    limit = max_samples or recipe.evaluation.max_eval_samples
    if limit:
        eval_set = eval_set.head(limit)
    if not len(eval_set):
        raise FtuneError("the recipe holds out no eval data", place=str(held_out.path) if held_out else str(data),
                         hint="set data.eval or data.eval_fraction")
    return recipe, eval_set, tokenizer, source


def score(loaded, eval_set: Encoded, recipe: Recipe, tokenizer) -> dict:
    """eval_loss (mean over answer tokens), eval_perplexity and eval_tokens of one model."""
    if isinstance(loaded, chat.GGUFModel):
        result = gguf_loss(loaded, eval_set, tokenizer)
    else:
        from ftune.train import training

        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise FtuneError(f"{loaded.target.spec} uses a different tokenizer from the eval data's; "
                             "losses over different tokens cannot be compared", hint="evaluate it with its own --recipe or --data run")
        scorer = training.TokenLogProbs(loaded.model)
        result = training.sft_eval(scorer, eval_set, recipe=recipe, pad_id=tokenizer.pad_token_id, device=loaded.device)
        loaded.model.eval()  # evaluate leaves the model in training mode, as the training loop wants it
    return result


def gguf_loss(loaded: chat.GGUFModel, eval_set: Encoded, tokenizer, *, each: Callable | None = None) -> dict:
    """The loss over the same answer tokens, from llama.cpp's logits at every position.

    `each(ids, logits, keep)` sees every scored sample's logits and answer-position mask: the
    quantization report compares them with another file's on the same tokens (gguf/report.py).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    llm = loaded.llm
    if int(eval_set.ids.max()) >= llm.n_vocab():
        raise FtuneError(f"{loaded.target.spec} has a vocabulary of {llm.n_vocab()} tokens; the eval data uses ids up to "
                         f"{int(eval_set.ids.max())}, so it was tokenized for another model")
    ids0, _ = eval_set.sample(0)
    text = tokenizer.decode(ids0.tolist(), skip_special_tokens=False)
    if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != ids0.tolist():
        loaded.notes.append("llama.cpp tokenizes the eval text differently; the loss is over the reference tokenizer's tokens")
    total, count = 0.0, 0
    for i in range(len(eval_set)):
        ids, _ = eval_set.sample(i)
        targets = collate(eval_set, [[i]], tokenizer.pad_token_id, packed=False)["targets"][0]
        keep = targets != IGNORE
        if not bool(keep.any()):
            continue
        llm.reset()
        llm.eval(ids.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
        if each is not None:
            each(ids.tolist(), logits, keep)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


# --------------------------------------------------------------------------- showing it


def print_results(results: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    if results.get("reward_models"):
        from ftune.commands.scoring import print_results as print_pairwise

        return print_pairwise(results, console)
    if results["data"]:
        table = Table(title=f"held-out loss on {results['data']['source']}")
        for column in ("model", "kind", "eval loss", "perplexity", "answer tokens"):
            table.add_column(column, justify="left" if column in ("model", "kind") else "right")
        best = min(r["eval_loss"] for r in results["models"])
        for r in results["models"]:
            style = "bold green" if r["eval_loss"] == best and len(results["models"]) > 1 else None
            table.add_row(Text(label(r["model"])), r["kind"], f"{r['eval_loss']:.4f}", f"{r['eval_perplexity']:.2f}",
                          f"{r['eval_tokens']:,}", style=style)
        console.print(table)
    for item in results["generations"]:
        table = Table(title=Text(f"» {item['prompt']}"), show_lines=True, title_justify="left", expand=True)
        table.add_column("model", style="bold", ratio=1, overflow="fold")
        table.add_column("answer", ratio=3)
        for spec, text in item["answers"].items():
            table.add_row(Text(label(spec)), Text(text))
        console.print(table)
    for spec, tasks in results["lm_eval"].items():
        for task, result in tasks.items():
            scores = ", ".join(f"{k} {'n/a' if v is None else format(v, '.4f')}" for k, v in result["metrics"].items())
            counted = f" ({result['samples']} samples)" if result.get("samples") is not None else ""
            console.print(f"lm-eval {label(spec)} {task}{counted}: {scores or 'no scores'}", highlight=False, markup=False, soft_wrap=True)


def label(spec: str) -> str:
    """A model's name for a table: long paths keep their last two parts (the JSON keeps them whole)."""
    parts = Path(spec).parts
    return spec if len(spec) <= 40 or len(parts) <= 2 else str(Path("…", *parts[-2:]))

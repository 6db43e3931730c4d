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
import importlib.util
import math
import time
from collections.abc import Callable
from pathlib import Path

from ftune import chat, models
from ftune.data.chat import IGNORE
from ftune.data.packing import Encoded, collate
from ftune.errors import FtuneError
from ftune.recipe import Recipe, load_recipe
from ftune.runs import package_versions, write_json

LM_EVAL_INSTALL = "pip install 'lm-eval[hf]'"
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
    lm_eval_limit: int | None = None,
    out: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Score every model in `specs`; returns (and writes to `out`) the results as a dict."""
    if not specs:
        raise FtuneError("name at least one model to evaluate")
    if recipe_path is not None and data is not None:
        raise FtuneError("pass --recipe or --data, not both")
    if lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise FtuneError("--lm-eval-tasks needs lm-evaluation-harness, which is not installed", hint=f"install it with: {LM_EVAL_INSTALL}")
    if recipe_path is None and data is None and not prompts and not lm_eval_tasks:
        raise FtuneError("nothing to evaluate", hint="pass --recipe or --data for held-out loss, and/or --prompt for answers side by side")
    targets = [chat.resolve(spec) for spec in specs]  # every name checked before any model loads

    recipe, eval_set, tokenizer = None, None, None
    if recipe_path is not None or data is not None:
        recipe, eval_set, tokenizer, source = eval_data(targets, recipe_path, overrides, data, max_length, max_samples)
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
            if lm_eval_tasks:
                results["lm_eval"][target.spec] = lm_eval_scores(loaded, list(lm_eval_tasks), lm_eval_limit, say)
            for note in getattr(loaded, "notes", []):
                say(f"  note: {note}")
                row.setdefault("notes", []).append(note)
            row["seconds"] = round(time.perf_counter() - started, 1)
            results["models"].append(row)
        finally:
            loaded.close()
    results["generations"] = [{"prompt": p, "answers": {spec: a[i] for spec, a in answers.items()}} for i, p in enumerate(prompts)]
    if out is not None:
        write_json(Path(out), results)
    return results


def eval_data(targets: list[chat.Target], recipe_path, overrides, data, max_length: int, max_samples: int | None):
    """(recipe, eval set, tokenizer, description): the recipe's held-out split, or a data file as a whole."""
    from ftune.data.chat import make_formatter
    from ftune.data.pipeline import prepare_sft

    if recipe_path is not None:
        recipe_path = Path(recipe_path)
        recipe = load_recipe(recipe_path, overrides)
        base_dir = recipe_path.parent.resolve()
        tokenizer_dir = models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
        source = f"{recipe_path} (held-out split)"
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
    tokenizer = models.load_tokenizer(tokenizer_dir, trust_remote_code=recipe.base_model.trust_remote_code)
    formatter = make_formatter(tokenizer, chat_template=recipe.data.chat_template, system_prompt=recipe.data.system_prompt,
                               train_on=recipe.data.train_on)
    train, held_out, _report = prepare_sft(recipe, tokenizer, formatter, base_dir=base_dir, cache_root=models.cache_dir() / "data")
    eval_set = held_out if recipe_path is not None else train
    limit = max_samples or recipe.evaluation.max_eval_samples
    if limit:
        eval_set = eval_set.head(limit)
    if not len(eval_set):
        raise FtuneError("the recipe holds out no eval data", place=str(recipe_path), hint="set data.eval or data.eval_fraction")
    return recipe, eval_set, tokenizer, source


def score(loaded, eval_set: Encoded, recipe, tokenizer) -> dict:
    """eval_loss (mean over answer tokens), eval_perplexity and eval_tokens of one model."""
    if isinstance(loaded, chat.GGUFModel):
        result = gguf_loss(loaded, eval_set, tokenizer)
    else:
        from ftune import training
        from ftune.stages.sft import evaluate

        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise FtuneError(f"{loaded.target.spec} uses a different tokenizer from the eval data's; "
                             "losses over different tokens cannot be compared", hint="evaluate it with its own --recipe or --data run")
        scorer = training.TokenLogProbs(loaded.model)
        result = evaluate(scorer, eval_set, recipe=recipe, pad_id=tokenizer.pad_token_id, device=loaded.device)
        loaded.model.eval()  # evaluate leaves the model in training mode, as the training loop wants it
    return result


def gguf_loss(loaded: chat.GGUFModel, eval_set: Encoded, tokenizer) -> dict:
    """The loss over the same answer tokens, from llama.cpp's logits at every position."""
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
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def lm_eval_scores(loaded, tasks: list[str], limit: int | None, say: Callable[[str], None]) -> dict:
    """lm-evaluation-harness results for a transformers model (GGUF files are skipped)."""
    if isinstance(loaded, chat.GGUFModel):
        say(f"  lm-eval: skipped for {loaded.target.spec} (it evaluates transformers models)")
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    output = simple_evaluate(model=lm, tasks=tasks, limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in output["results"].items()}


# --------------------------------------------------------------------------- showing it


def print_results(results: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

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
        for task, metrics in tasks.items():
            console.print(f"lm-eval {spec} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), highlight=False, markup=False)


def label(spec: str) -> str:
    """A model's name for a table: long paths keep their last two parts (the JSON keeps them whole)."""
    parts = Path(spec).parts
    return spec if len(spec) <= 40 or len(parts) <= 2 else str(Path("…", *parts[-2:]))

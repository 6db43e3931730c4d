"""What every training stage writes into its run directory.

The adapter (or model) with its tokenizer and a generation config that stops at the
end-of-turn token; run.json; the run card with sample answers; a few held-out texts for
merge and export parity checks. Deciding what to do with the directory is runs.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ftune.artifacts import runs
from ftune.artifacts.ownership import RUN_FILE, atomic_dir, atomic_file, write_json
from ftune.artifacts.runs import ADAPTER_DIR, INITIAL_ADAPTER_DIR, MODEL_DIR, package_versions
from ftune.guards import bounds, textio
from ftune.modeling import adapters
from ftune.recipe import Recipe


def save_initial_adapter(model, run_dir: Path, recipe: Recipe) -> None:
    """Keep a PiSSA/OLoRA adapter as initialised: saving the trained one needs it (see save_trained)."""
    if recipe.adapter.init in ("pissa", "olora") and not (run_dir / INITIAL_ADAPTER_DIR).is_dir():
        with atomic_dir(run_dir / INITIAL_ADAPTER_DIR, kind="adapter") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)


def save_trained(model, tokenizer, formatter, run_dir: Path, recipe: Recipe) -> None:
    """The adapter (or full model) with the tokenizer; generation stops at the end-of-turn token."""
    target = run_dir / (MODEL_DIR if recipe.adapter.method == "none" else ADAPTER_DIR)
    # PiSSA and OLoRA change the base weights at initialisation; saved against the initial
    # adapter, the result is a plain LoRA that works on the original base.
    initial = run_dir / INITIAL_ADAPTER_DIR
    conversion = {"path_initial_model_for_weight_conversion": str(initial)} if initial.is_dir() else {}
    with atomic_dir(target, kind="adapter" if target.name == ADAPTER_DIR else "trained-model", overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **conversion)
        if formatter.saved_template:  # the template trained with travels with the tokenizer: merge, GGUF, servers
            tokenizer.chat_template = formatter.saved_template
        tokenizer.save_pretrained(tmp)
        if recipe.stage != "rm":  # a reward model scores text; it generates none
            generation = generation_config(model, tokenizer, formatter)
            generation.save_pretrained(tmp)


def generation_config(model, tokenizer, formatter):
    """Stop at the template's end-of-turn token even when the base config only knows EOS."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = GenerationConfig.from_model_config(inner.config) if inner.generation_config is None else inner.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [e for e in eos if e is not None]
    for token in (formatter.end_of_turn_id, tokenizer.eos_token_id):
        if token is not None and token not in eos:
            eos.append(token)
    config.eos_token_id = eos if len(eos) > 1 else eos[0]
    config.pad_token_id = tokenizer.pad_token_id
    return config


@torch.no_grad()
def generate_samples(model, tokenizer, formatter, recipe: Recipe, device, stop=None) -> list[tuple[str, str]]:
    """Greedy answers to the recipe's evaluation prompts, for the run card; fewer when `stop()` says so."""
    if not recipe.evaluation.prompts:
        return []
    model.eval()
    config = generation_config(model, tokenizer, formatter)
    answers = []
    for prompt in recipe.evaluation.prompts:
        if stop is not None and stop():
            break
        messages = formatter.with_system(({"role": "user", "content": prompt},))
        text = formatter.render(messages, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=formatter.prepend_bos, return_tensors="pt").to(device)
        longest = bounds.new_tokens(model, recipe.evaluation.max_new_tokens, ids["input_ids"].shape[1])
        out = model.generate(**ids, max_new_tokens=longest, do_sample=False,
                             eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        answers.append((prompt, tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
    return answers


def write_eval_prompts(run_dir: Path, tokenizer, samples) -> None:
    """A few held-out prompts as text (up to where the first answer starts), for merge and
    export parity checks: their logits are compared, and greedy continuations are answers.
    `samples` are (ids, labels) of held-out samples (every stage's eval set gives some)."""
    from ftune.data.rendering import IGNORE

    with atomic_file(run_dir / runs.EVAL_PROMPTS_FILE) as handle:
        for ids, labels in samples:
            first = next((t for t, label in enumerate(labels) if label != IGNORE), len(ids))
            handle.write(textio.dumps({"text": tokenizer.decode(ids[:first].tolist())}) + "\n")


def write_run_json(run_dir: Path, recipe: Recipe, model_path: str, dtype, *, status: str, step: int, summary: dict | None = None,
                   recipe_dir: Path | None = None) -> None:
    base = recipe.base_model
    summary, nulls = textio.nulled(summary or {})  # a diverged metric is written as null, and said
    if nulls:
        sys.stderr.write(textio.nulls_note(nulls) + f" in {run_dir / RUN_FILE}\n")
    write_json(run_dir / RUN_FILE, {
        "ftune_version": package_versions().get("ftune", "unknown"),
        "stage": recipe.stage,
        "status": status,
        # recipe.yaml keeps data paths as the recipe wrote them, relative to its folder: `ftune eval RUN` reads them from here.
        "recipe_dir": str(recipe_dir) if recipe_dir is not None else None,
        "base_model": {"name": base.name, "path": model_path, "revision": base.revision, "trust_remote_code": base.trust_remote_code},
        "adapter": json.loads(recipe.adapter.model_dump_json()),
        "quantization": json.loads(recipe.quantization.model_dump_json()),
        "dtype": str(dtype).removeprefix("torch."),
        "global_step": step,
        "summary": summary,
        "versions": package_versions(),
    })


def write_run_card(run_dir: Path, recipe: Recipe, report, summary: dict, samples: list[tuple[str, str]],
                   title: str | None = None) -> None:
    lines = [
        f"# {run_dir.name}", "",
        f"ftune {recipe.stage} of `{recipe.base_model.name}` with {adapters.describe(recipe.adapter)}"
        + (" on a 4-bit NF4 base (QLoRA)" if recipe.quantization.load_in_4bit else "") + ".",
        "", f"trust_remote_code: {recipe.base_model.trust_remote_code}", "",
        "## Results", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary.items()],
        "", "## Data", "",
        *[f"- `{s['path']}`: {s['used']} of {s['rows']} rows ({s['format']}), {s['skipped']} skipped" for s in report.sources],
        f"- too long: {report.truncated} truncated, {report.dropped_too_long} dropped",
    ]
    if samples:
        lines += ["", f"## {title or 'Sample answers (greedy)'}", ""]
        for prompt, answer in samples:
            lines += [f"**{prompt}**", "", f"> {answer}", ""]
    if recipe.stage == "rm":  # a reward model loads as a sequence-classification model, and scores
        from ftune.modeling.reward_model import use_lines

        lines += use_lines(run_dir)
    else:
        lines += [
            "", "## Use", "", "```python",
            "from peft import AutoPeftModelForCausalLM",
            f"model = AutoPeftModelForCausalLM.from_pretrained('{run_dir / ADAPTER_DIR}')",
            "```", "",
            "Not mergeable: its virtual tokens are not weights, so it is served with peft as above (or `ftune chat`)."
            if recipe.adapter.method in adapters.VIRTUAL_TOKEN_METHODS else
            f"Merge: `ftune merge {run_dir} --out merged/`; GGUF: `ftune export-gguf {run_dir} --out model.gguf --type q4_k_m`.", "",
        ]
    with atomic_file(run_dir / runs.README_FILE) as handle:
        handle.write("\n".join(lines))


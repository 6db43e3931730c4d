"""What every training stage writes: the run directory, its decisions and its artifacts.

Deciding between a fresh run, a resume and refusing; the adapter (or model) with its
tokenizer and a generation config that stops at the end-of-turn token; run.json; the run
card with sample answers; a few held-out texts for merge and export parity checks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ftune import training
from ftune.errors import FtuneError
from ftune.progress import console
from ftune.recipe import recipe_to_yaml
from ftune.runs import ADAPTER_DIR, MODEL_DIR, RUN_FILE, atomic_dir, atomic_file, package_versions, read_run, write_json


class Interrupted(FtuneError):
    exit_code = 130

    def __init__(self, stage: str, step: int, checkpoint: Path, recipe_path: Path, overrides):
        sets = "".join(f" --set {o}" for o in overrides)
        super().__init__(
            f"stopped at step {step}; checkpoint saved to {checkpoint}",
            hint=f"resume with: ftune {stage} {recipe_path}{sets} --resume",
        )


def output_dir(directory: str, base_dir: Path, smoke: bool) -> Path:
    path = Path(directory).expanduser()
    path = path if path.is_absolute() else (base_dir / path)
    path = Path(path.resolve())
    return path.with_name(path.name + "-smoke") if smoke else path


INITIAL_ADAPTER_DIR = "initial_adapter"


def save_initial_adapter(model, run_dir: Path, recipe) -> None:
    """Keep a PiSSA/OLoRA adapter as initialised: saving the trained one needs it (see save_trained)."""
    if recipe.adapter.init in ("pissa", "olora") and not (run_dir / INITIAL_ADAPTER_DIR).is_dir():
        with atomic_dir(run_dir / INITIAL_ADAPTER_DIR) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)


@dataclass(frozen=True)
class RunPlan:
    """What to do with the run directory, decided before anything is written."""

    resume_from: Path | None
    wipe: bool


def plan_for(run_dir: Path, recipe, *, resume: bool, overwrite: bool) -> RunPlan:
    """Under `accelerate launch` the launcher has decided already: resume if it left a checkpoint."""
    from ftune import distributed

    if distributed.is_launched():
        return RunPlan(training.latest_checkpoint(run_dir), wipe=False)
    return plan_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite)


def start_run_dir(run_dir: Path, plan: RunPlan) -> None:
    """Act on the plan once the inputs are known to be good: nothing is touched before."""
    if plan.wipe:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A checkpoint being written when the process was killed: never complete, never used.
    for partial in (run_dir / "checkpoints").glob(".*.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


class LaunchFailed(FtuneError):
    def __init__(self, stage: str, code: int):
        if code == 130:
            super().__init__(f"the distributed {stage} run was interrupted; resume it with the command above")
        else:
            super().__init__(f"the distributed {stage} run failed (exit code {code}); see the processes' messages above")
        self.exit_code = code


def launch_distributed(stage: str, recipe, recipe_path: Path, overrides, run_dir: Path, base_dir: Path, *,
                       smoke: bool, resume: bool, overwrite: bool) -> Path:
    """Decide fresh run or resume once, then run the stage in `num_processes` processes."""
    from ftune import distributed, models

    start_run_dir(run_dir, plan_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite or smoke))
    dist = recipe.distributed
    layer_class = None
    if dist.backend == "fsdp":
        model_path = models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
        layer_class = distributed.decoder_layer_class(model_path, recipe.base_model.trust_remote_code)
    config = distributed.accelerate_config(dist, cuda=torch.cuda.is_available(), layer_class=layer_class,
                                           gradient_accumulation_steps=recipe.training.gradient_accumulation_steps)
    argv = [item for o in overrides for item in ("--set", o)] + (["--smoke"] if smoke else [])
    console.print(f"launching {dist.num_processes} processes ({dist.backend}) with accelerate; config: {run_dir / distributed.CONFIG_FILE}")
    code = distributed.launch(stage, recipe_path, argv, run_dir, config)
    if code != 0:
        # Ctrl-C reaches torch's launcher too, which may exit 1 from its own signal handler
        # after the processes checkpointed and stopped cleanly: the run says what happened.
        try:
            if read_run(run_dir).get("status") == "interrupted":
                code = 130
        except FtuneError:  # no readable run.json: the processes never got that far
            pass
        raise LaunchFailed(stage, code)
    return run_dir


def plan_run_dir(run_dir: Path, recipe, *, resume: bool, overwrite: bool) -> RunPlan:
    """Decide between a fresh run, a resume, and refusing. An existing run is never silently replaced."""
    meta = run_dir / RUN_FILE
    status = json.loads(meta.read_text()).get("status") if meta.is_file() else None
    checkpoint = training.latest_checkpoint(run_dir) if run_dir.exists() else None
    if overwrite and not resume:
        return RunPlan(None, wipe=True)
    if status == "completed":
        raise FtuneError(f"{run_dir} already holds a completed run", hint="pass --overwrite to replace it, or set output.dir")
    if checkpoint is not None:
        saved = (run_dir / "recipe.yaml").read_text(encoding="utf-8") if (run_dir / "recipe.yaml").is_file() else None
        if saved is not None and saved != recipe_to_yaml(recipe):
            raise FtuneError(
                f"{run_dir} holds an interrupted run of a different recipe",
                hint="resume with the same recipe and --set options, or pass --overwrite to start again",
            )
        if not resume:
            console.print(f"found an interrupted run in {run_dir}; resuming from {checkpoint.name}")
        return RunPlan(checkpoint, wipe=False)
    if resume:
        raise FtuneError(f"nothing to resume in {run_dir}: no checkpoint found")
    if run_dir.exists() and any(p for p in run_dir.iterdir() if p.name != "accelerate_config.yaml"):
        raise FtuneError(f"{run_dir} exists and is not an ftune run to resume", hint="pass --overwrite, or set output.dir")
    return RunPlan(None, wipe=False)


def save_trained(model, tokenizer, formatter, run_dir: Path, recipe) -> None:
    """The adapter (or full model) with the tokenizer; generation stops at the end-of-turn token."""
    target = run_dir / (MODEL_DIR if recipe.adapter.method == "none" else ADAPTER_DIR)
    # PiSSA and OLoRA change the base weights at initialisation; saved against the initial
    # adapter, the result is a plain LoRA that works on the original base.
    initial = run_dir / INITIAL_ADAPTER_DIR
    conversion = {"path_initial_model_for_weight_conversion": str(initial)} if initial.is_dir() else {}
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **conversion)
        tokenizer.save_pretrained(tmp)
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
def generate_samples(model, tokenizer, formatter, recipe, device) -> list[tuple[str, str]]:
    """Greedy answers to the recipe's evaluation prompts, for the run card."""
    if not recipe.evaluation.prompts:
        return []
    model.eval()
    config = generation_config(model, tokenizer, formatter)
    answers = []
    for prompt in recipe.evaluation.prompts:
        messages = formatter.with_system(({"role": "user", "content": prompt},))
        text = formatter.render(messages, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=formatter.prepend_bos, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=recipe.evaluation.max_new_tokens, do_sample=False,
                             eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        answers.append((prompt, tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
    return answers


def write_eval_prompts(run_dir: Path, tokenizer, eval_set, limit: int = 8) -> None:
    """A few held-out prompts as text (up to where the first answer starts), for merge and
    export parity checks: their logits are compared, and greedy continuations are answers."""
    from ftune.data.chat import IGNORE

    with atomic_file(run_dir / "eval_prompts.jsonl") as handle:
        for i in range(min(limit, len(eval_set))):
            ids, labels = eval_set.sample(i)
            first = next((t for t, label in enumerate(labels) if label != IGNORE), len(ids))
            handle.write(json.dumps({"text": tokenizer.decode(ids[:first].tolist())}) + "\n")


def write_run_json(run_dir: Path, recipe, model_path: str, dtype, *, status: str, step: int, summary: dict | None = None) -> None:
    base = recipe.base_model
    write_json(run_dir / RUN_FILE, {
        "ftune_version": package_versions().get("ftune", "unknown"),
        "stage": recipe.stage,
        "status": status,
        "base_model": {"name": base.name, "path": model_path, "revision": base.revision, "trust_remote_code": base.trust_remote_code},
        "adapter": json.loads(recipe.adapter.model_dump_json()),
        "quantization": json.loads(recipe.quantization.model_dump_json()),
        "dtype": str(dtype).removeprefix("torch."),
        "global_step": step,
        "summary": summary or {},
        "versions": package_versions(),
    })


def write_run_card(run_dir: Path, recipe, report, summary: dict, samples: list[tuple[str, str]]) -> None:
    lines = [
        f"# {run_dir.name}", "",
        f"ftune {recipe.stage} of `{recipe.base_model.name}` with {recipe.adapter.method}"
        + (f" (r={recipe.adapter.r}, alpha={recipe.adapter.alpha}, targets: {recipe.adapter.target_modules})" if recipe.adapter.method != "none" else "")
        + (" on a 4-bit NF4 base (QLoRA)" if recipe.quantization.load_in_4bit else "") + ".",
        "", f"trust_remote_code: {recipe.base_model.trust_remote_code}", "",
        "## Results", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary.items()],
        "", "## Data", "",
        *[f"- `{s['path']}`: {s['used']} of {s['rows']} rows ({s['format']}), {s['skipped']} skipped" for s in report.sources],
        f"- too long: {report.truncated} truncated, {report.dropped_too_long} dropped",
    ]
    if samples:
        lines += ["", "## Sample answers (greedy)", ""]
        for prompt, answer in samples:
            lines += [f"**{prompt}**", "", f"> {answer}", ""]
    lines += [
        "", "## Use", "", "```python",
        "from peft import AutoPeftModelForCausalLM",
        f"model = AutoPeftModelForCausalLM.from_pretrained('{run_dir / ADAPTER_DIR}')",
        "```", "", f"Merge: `ftune merge {run_dir} --out merged/`; GGUF: `ftune export-gguf {run_dir} --out model.gguf --type q4_k_m`.", "",
    ]
    with atomic_file(run_dir / "README.md") as handle:
        handle.write("\n".join(lines))


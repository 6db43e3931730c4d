"""The `ftune` commands that use a model: eval, chat, label and score (registered by cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftune.cli.options import SetOpt, fail
from ftune.errors import FtuneError

ModelsArg = Annotated[list[str], typer.Argument(
    help="Models: a run directory, adapter directory, merged or other model directory, hub id, 'demo', or a .gguf file.",
    show_default=False)]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt to answer (repeatable).", show_default=False)]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="A file of prompts: one per line, or JSON lines with 'prompt'.", show_default=False)]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the most likely tokens up to this probability.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling.", show_default=False)]


def eval_(
    models: ModelsArg,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Score on this recipe's held-out data, split as `ftune sft` splits it (default for a run directory with nothing else asked: its own recipe).", show_default=False)] = None,
    set_: SetOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Score on every row of this data file (any format recipes read).", show_default=False)] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="With --data: truncate samples to this many tokens.")] = 2048,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Score only the first N samples.", show_default=False)] = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    max_new_tokens: MaxNewOpt = 64,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    lm_eval_tasks: Annotated[Optional[str], typer.Option("--lm-eval-tasks", help="Comma-separated lm-evaluation-harness tasks, groups or tags, or task YAML files (needs ftune[lm-eval]).", show_default=False)] = None,
    lm_eval_include: Annotated[Optional[list[Path]], typer.Option("--lm-eval-include", metavar="DIR", help="A folder of your own lm-eval task YAML files (tasks and groups); repeatable.", show_default=False)] = None,
    lm_eval_limit: Annotated[Optional[int], typer.Option("--lm-eval-limit", help="Examples per lm-eval task.", show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with a model (never taken from a run directory's files).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the results as JSON here.", show_default=False)] = None,
) -> None:
    """Held-out loss and perplexity of models on the same tokens, and their answers side by side."""
    from rich.console import Console

    from ftune.commands.chat import Sampling, read_prompts
    from ftune.commands.evaluate import print_results, run_eval

    try:
        questions = list(prompt or []) + (read_prompts(prompts) if prompts else [])
        tasks = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
        results = run_eval(
            models, recipe_path=recipe, overrides=set_ or [], data=data, max_length=max_length, max_samples=max_samples,
            prompts=questions, sampling=Sampling(max_new_tokens, temperature, top_p, seed),
            lm_eval_tasks=tasks, lm_eval_include=list(lm_eval_include or []), lm_eval_limit=lm_eval_limit,
            trust_remote_code=trust_remote_code, out=out, prompts_file=prompts, say=lambda text: typer.echo(text, err=True),
        )
    except FtuneError as exc:
        fail(exc)
    print_results(results, Console())
    if out is not None:
        typer.echo(f"wrote {out}", err=True)


def chat(
    model: Annotated[str, typer.Argument(help="A run, adapter, merged or other model directory, hub id, 'demo', or a .gguf file.", show_default=False)],
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (default: the one the run trained with, if any).", show_default=False)] = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.9,
    seed: SeedOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="With --prompt/--prompts: print JSON lines {prompt, answer}.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the model (never taken from a run directory's files).")] = False,
) -> None:
    """Chat in the terminal (/system TEXT, /reset, /quit); with --prompt or --prompts, answer and exit."""
    from ftune.commands import chat as talk

    try:
        questions = list(prompt or []) + (talk.read_prompts(prompts) if prompts else [])
        target = talk.resolve(model, trust_remote_code=trust_remote_code)
        typer.echo(f"loading {model} ({target.kind})", err=True)
        loaded = talk.load(target)
        sampling = talk.Sampling(max_new_tokens, temperature, top_p, seed)
        if questions:
            talk.answer_prompts(loaded, questions, sampling, system=system, as_json=json_)
        else:
            talk.interactive(loaded, sampling, system=system)
    except FtuneError as exc:
        fail(exc)


def label(
    model: Annotated[str, typer.Argument(help="The model whose answers to label: run, adapter, merged or other model directory, hub id, 'demo', or .gguf.", show_default=False)],
    prompts: PromptsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Session and output directory (default: PROMPTS-labels); a session there is continued.", show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", help="Answers sampled per prompt (default 4).", show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest answer, in tokens (default 256).", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature (default 0.7).", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling (default 0.9).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Prompt k is sampled with seed SEED+k (default 0).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the session in --out (found automatically too).")] = False,
    judge: Annotated[Optional[str], typer.Option("--judge", help="Label with a function: path.py:function(prompt, answers) returning a label per answer or the best's index.", show_default=False)] = None,
    judge_timeout: Annotated[Optional[float], typer.Option("--judge-timeout", help="Most seconds one --judge call may take (default 60); a slower one is stopped and stops the command, naming the prompt's line.", show_default=False)] = None,
    decisions: Annotated[Optional[Path], typer.Option("--decisions", help="Apply decisions from a JSON (lines) file: {line or prompt, labels | best | skip, notes}.", show_default=False)] = None,
    generate_only: Annotated[bool, typer.Option("--generate-only", help="Sample and store every prompt's answers, decide nothing (for --decisions made elsewhere).")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the model (never taken from a run directory's files).")] = False,
) -> None:
    """Label sampled answers good or bad (or pick the best), saved as DPO pairs and KTO examples for `ftune dpo`."""
    from ftune.commands import label as labelling

    options = {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    try:
        labelling.run(model, prompts=prompts, out=out, options=options, resume=resume, judge=judge, decisions=decisions,
                      generate_only=generate_only, trust_remote_code=trust_remote_code, judge_timeout=judge_timeout)
    except FtuneError as exc:
        fail(exc)


def score(
    model: Annotated[Path, typer.Argument(help="A reward model: an `ftune rm` run directory, its adapter, or a model merged from one.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Rows to score: pairs (prompt/chosen/rejected and the other forms `ftune rm` reads), prompt/completion, conversations or text.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The JSONL file to write (default: DATA's name + .scored.jsonl, beside it).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier `ftune score` output.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the base model (never taken from a run directory's files).")] = False,
) -> None:
    """Score rows or pairs with a reward model: each row gets its reward (pairs: both and their margin), for filtering and best-of-n."""
    from ftune.commands.scoring import score_file

    try:
        written, summary = score_file(model, data, out, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                      say=lambda text: typer.echo(text, err=True))
    except FtuneError as exc:
        fail(exc)
    figures = [f"{summary['rows']} rows"]
    if summary["not_finite"]:
        figures.append(f"{summary['not_finite']} not scored: the model gave NaN or infinity (written as null; "
                       f"first: {summary['first_not_finite']})")
    if summary["pairs"]:
        figures.append(f"{summary['pairs']} pairs: pairwise accuracy {summary['pairwise_accuracy']:.1%}, mean margin {summary['mean_margin']:+.3f}")
    if summary["mean_reward"] is not None:
        figures.append(f"mean reward {summary['mean_reward']:+.3f}")
    typer.echo(f"wrote {written}: " + "; ".join(figures))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
    app.command()(chat)
    app.command()(label)
    app.command()(score)

"""The `ftune` command line: one short function per command; heavy imports stay inside them.
The commands that use a model (eval, chat, label, score) are in model_commands.py.

`ftune --help` and `ftune validate` import neither torch nor transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftune.cli import model_commands
from ftune.guards import signals, textio
from ftune.cli.options import (
    MachineRankOpt,
    MainProcessIpOpt,
    MainProcessPortOpt,
    NumMachinesOpt,
    NumProcessesOpt,
    OverwriteRunOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    fail,
    say_error,
    with_distributed,
)
from ftune.errors import FtuneError

app = typer.Typer(
    name="ftune",
    help="Fine-tune LLMs from YAML recipes: SFT, DPO, reward models and GRPO with LoRA, QLoRA and DoRA; merge; export GGUF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)



@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.", show_default=False)],
    set_: SetOpt = None,
) -> None:
    """Check recipes: every problem at once, with its line and a 'did you mean'."""
    from ftune.recipe import load_recipe

    failed = False
    for path in recipes:
        try:
            recipe = load_recipe(path, set_ or [])
        except FtuneError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed = True
            continue
        typer.echo(f"{path}: ok (stage: {recipe.stage}, base model: {recipe.base_model.name})")
    if failed:
        raise typer.Exit(2)


@app.command()
def schema(
    json_: Annotated[bool, typer.Option("--json", help="Print the JSON Schema instead of the field list.")] = False,
) -> None:
    """Print every recipe key with its type, default and documentation."""
    from ftune.recipe import schema_fields, schema_json

    if json_:
        typer.echo(schema_json())
        return
    for key, type_name, default, doc in schema_fields():
        typer.echo(f"{key}  ({type_name}; default: {default or '-'})")
        if doc:
            typer.echo(f"    {doc}")



# The training commands: each runs its stage (ftune/stages/NAME.py), imported only when it runs.


def _train(run, recipe: Path, set_: list[str] | None, *, smoke: bool, resume: bool, overwrite: bool, **launch) -> None:
    """A stage's run(), with --set and the launch options (--num-processes, ...) as recipe overrides."""
    try:
        run(recipe, with_distributed(set_, **launch), smoke=smoke, resume=resume, overwrite=overwrite)
    except FtuneError as exc:
        fail(exc)


@app.command()
def sft(
    recipe: RecipeArg,
    set_: SetOpt = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Same recipe for 3 steps on 16 samples (more when one optimizer step needs more), into OUTPUT-smoke: what a CI job runs.")] = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    num_processes: NumProcessesOpt = None,
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainProcessIpOpt = None,
    main_process_port: MainProcessPortOpt = None,
) -> None:
    """Supervised fine-tuning (LoRA, QLoRA, DoRA or full) from a recipe."""
    from ftune.stages import sft

    _train(sft.run, recipe, set_, smoke=smoke, resume=resume, overwrite=overwrite, num_processes=num_processes,
           num_machines=num_machines, machine_rank=machine_rank, main_process_ip=main_process_ip, main_process_port=main_process_port)


@app.command()
def dpo(
    recipe: RecipeArg,
    set_: SetOpt = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Same recipe for 3 steps on 8 pairs (more when one optimizer step needs more), into OUTPUT-smoke; continues init_from's own smoke run when there is one.")] = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    num_processes: NumProcessesOpt = None,
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainProcessIpOpt = None,
    main_process_port: MainProcessPortOpt = None,
) -> None:
    """Preference tuning (DPO, IPO, SimPO, CPO, ORPO, KTO), usually continuing an SFT run."""
    from ftune.stages import dpo

    _train(dpo.run, recipe, set_, smoke=smoke, resume=resume, overwrite=overwrite, num_processes=num_processes,
           num_machines=num_machines, machine_rank=machine_rank, main_process_ip=main_process_ip, main_process_port=main_process_port)


@app.command()
def rm(
    recipe: RecipeArg,
    set_: SetOpt = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Same recipe on 8 pairs for 3 steps, into OUTPUT-smoke.")] = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    num_processes: NumProcessesOpt = None,
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainProcessIpOpt = None,
    main_process_port: MainProcessPortOpt = None,
) -> None:
    """A reward model from preference pairs (Bradley-Terry), for ftune score, best-of-n and GRPO."""
    from ftune.stages import rm

    _train(rm.run, recipe, set_, smoke=smoke, resume=resume, overwrite=overwrite, num_processes=num_processes,
           num_machines=num_machines, machine_rank=machine_rank, main_process_ip=main_process_ip, main_process_port=main_process_port)


@app.command()
def grpo(
    recipe: RecipeArg,
    set_: SetOpt = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Same recipe on 4 prompts (or one step's worth) for 3 steps, into OUTPUT-smoke.")] = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteRunOpt = False,
    num_processes: NumProcessesOpt = None,
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainProcessIpOpt = None,
    main_process_port: MainProcessPortOpt = None,
) -> None:
    """Online RL with verifiable rewards (GRPO, Dr GRPO, DAPO, GSPO): sample, score, reinforce."""
    from ftune.stages import grpo

    _train(grpo.run, recipe, set_, smoke=smoke, resume=resume, overwrite=overwrite, num_processes=num_processes,
           num_machines=num_machines, machine_rank=machine_rank, main_process_ip=main_process_ip, main_process_port=main_process_port)


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(help="An ftune run directory, or a PEFT adapter directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged Hugging Face model.", show_default=False)],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model to merge onto, instead of the one the run or adapter names.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bf16, fp16 or fp32 (default: the base's dtype).", show_default=False)] = None,
    onto: Annotated[str, typer.Option("--onto", help="For QLoRA adapters. quantized: round the base through 4 bits as in training, then merge; "
        "the merged model reproduces what the adapter was trained against. original: merge onto the full-precision "
        "weights; keeps full precision but shifts outputs slightly from the trained model (the parity report measures it).")] = "quantized",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the parity check against the unmerged adapter.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory (only one ftune wrote).")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped with the base model (never taken from a run directory's files).")] = False,
) -> None:
    """Merge an adapter into its base model and prove the merged model behaves like the adapter."""
    from ftune.merge import merge_to_dir

    try:
        merge_to_dir(run, out, base=base, dtype=dtype, onto=onto, verify=not no_verify, overwrite=overwrite,
                     trust_remote_code=trust_remote_code, echo=typer.echo)
    except FtuneError as exc:
        fail(exc)








from ftune.gguf import quant_types  # light: the type table for --help, no numpy or gguf


@app.command(
    "export-gguf",
    help="Export a model as one GGUF file for llama.cpp, Ollama and LM Studio, and prove it matches the source.\n\n"
    "MODEL is a merged model directory, any Hugging Face model directory or hub id, an ftune run directory "
    "(merged on the fly), or 'demo'. Next to FILE.gguf come FILE.gguf.parity.json (the proof) and an Ollama Modelfile.\n\n"
    "Several types (--type q4_k_m,q5_k_m,q6_k,q8_0) give one file per type, FILE.q4_k_m.gguf and so on; --report then "
    "measures each on held-out data (size, bits/weight, perplexity, KL and top-1 agreement against the lossless source, "
    "tokens/s) into FILE.report.json and FILE.report.png, and picks the smallest within --ppl-budget.\n\n"
    "\b\nTypes (pick q5_k_m if it fits, else q4_k_m):\n" + quant_types.types_help(),
)
def export_gguf(
    model: Annotated[str, typer.Argument(help="Model directory, hub id, run directory, or 'demo'.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write.", show_default=False)],
    type_: Annotated[str, typer.Option("--type", "-t", help="Output type, from the table above; several as a comma list.")] = quant_types.DEFAULT_TYPE,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the parity check (it loads the source model in float32).")] = False,
    report: Annotated[bool, typer.Option("--report", help="Measure every type on held-out data and pick one (FILE.report.json, FILE.report.png).")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="With --report: held-out data in any format ftune reads (default: a run's own held-out split).", show_default=False)] = None,
    ppl_budget: Annotated[Optional[str], typer.Option("--ppl-budget", help="With --report: perplexity the pick may add over the lossless source, e.g. 5% (the default) or 0.05.", show_default=False)] = None,
) -> None:
    from ftune.gguf import export as stage
    from ftune.gguf.report import request_from_options

    try:
        request = request_from_options(report, data, ppl_budget)
        stage.run_types(model, out, type_, overwrite=overwrite, verify=not no_verify, report=request, echo=typer.echo)
    except FtuneError as exc:
        fail(exc)


@app.command()
def inspect(
    recipe: RecipeArg,
    set_: SetOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Training samples to show with trained and masked tokens coloured.")] = 2,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", help="GPU memory in GiB to check the recipe against.")] = 24.0,
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of the report.")] = False,
) -> None:
    """See what training will see: rows, skipped rows, token lengths, loss share, packing, steps, memory."""
    from rich.console import Console

    from ftune.commands.inspection import inspect_recipe, print_inspection

    try:
        result = inspect_recipe(recipe, set_ or [])
    except FtuneError as exc:
        fail(exc)
    if json_:
        typer.echo(textio.dumps(result.numbers(), indent=2))
    else:
        print_inspection(result, Console(), samples=samples, gpu_gib=gpu_memory)


@app.command("data")
def data_(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory to write (default: RECIPE-STEM-curated beside the recipe).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the report and write nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier `ftune data` output (never a directory ftune did not write).")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Remove exact duplicates; sets data.dedup.exact.")] = False,
    near: Annotated[Optional[float], typer.Option("--near", help="Remove near duplicates sharing this share of word 5-grams, e.g. 0.8; sets data.dedup.near.", show_default=False)] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="Remove samples shorter than this; sets data.filters.min_tokens.", show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Remove samples longer than this; sets data.filters.max_tokens.", show_default=False)] = None,
    empty: Annotated[bool, typer.Option("--empty", help="Remove empty answers; sets data.filters.empty_answers.")] = False,
    refusals: Annotated[bool, typer.Option("--refusals", help="Remove refusal answers; sets data.filters.refusals.")] = False,
    language: Annotated[Optional[list[str]], typer.Option("--language", help="Keep only rows in this language, e.g. en (repeatable); sets data.filters.languages.", show_default=False)] = None,
) -> None:
    """Clean the recipe's data: duplicates, token lengths, empty or refusal answers, language; each removed row listed.

    Writes one cleaned JSONL file per source (kept rows as read, in file order), removed.jsonl (place, reason,
    duplicate_of) and report.json into --out.
    """
    from rich.console import Console

    from ftune.commands.curate import curate, print_curation

    flags = {"data.dedup.exact": exact or None, "data.dedup.near": near, "data.filters.min_tokens": min_tokens,
             "data.filters.max_tokens": max_tokens, "data.filters.empty_answers": empty or None,
             "data.filters.refusals": refusals or None, "data.filters.languages": f"[{', '.join(language)}]" if language else None}
    overrides = [*(set_ or []), *(f"{key}={'true' if value is True else value}" for key, value in flags.items() if value is not None)]
    try:
        result = curate(recipe, overrides, out=out, dry_run=dry_run, overwrite=overwrite)
    except FtuneError as exc:
        fail(exc)
    print_curation(result, Console())


model_commands.register(app)


def main() -> None:
    """Entry point: user-caused failures become one clear message and a non-zero exit."""
    from ftune.guards.oserrors import as_ftune_error

    try:
        with signals.policy():  # SIGTERM stops every command as Ctrl-C does, every cleanup included
            app()
    except SystemExit as exc:
        stop = signals.unexplained(exc)
        if stop is not None:  # typer ends a stop with a silent exit 130: say what stopped and what was kept
            typer.echo(signals.message(stop, sys.argv[1:]), err=True)
        raise
    except FtuneError as exc:
        say_error(exc)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A read-only or full disk, a file where a folder goes, an unusable FTUNE_CACHE, raised anywhere
        # in a command (click re-raises every OSError but a broken pipe): one line naming the path.
        error = as_ftune_error(exc)
        if error is None:
            raise
        say_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt as stop:
        typer.echo(signals.message(stop, sys.argv[1:]), err=True)
        sys.exit(signals.EXIT_CODE)
    finally:  # the user's code (reward functions, judges) ran in workers: none outlives the command
        from ftune.guards import usercode

        usercode.close_all()

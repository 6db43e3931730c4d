"""What several `ftune` commands share: the recipe argument, --set, the training commands' options, and how a failure is reported."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftune.errors import FtuneError

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable); KEY=null removes a key that cannot be null (its default applies), e.g. --set adapter.r=null when switching to ia3.", show_default=False),
]


# The options every training command (sft, dpo, rm, grpo) takes besides its own --smoke.
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in output.dir (found automatically too).")]
OverwriteRunOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an earlier ftune run in output.dir (never a directory ftune did not write).")]
NumProcessesOpt = Annotated[Optional[int], typer.Option("--num-processes", help="Processes (GPUs) in all; sets distributed.num_processes.", show_default=False)]
NumMachinesOpt = Annotated[Optional[int], typer.Option("--num-machines", help="Machines in the run; sets distributed.num_machines.", show_default=False)]
MachineRankOpt = Annotated[Optional[int], typer.Option("--machine-rank", help="This machine's rank; sets distributed.machine_rank.", show_default=False)]
MainProcessIpOpt = Annotated[Optional[str], typer.Option("--main-process-ip", help="Rank-0 machine's address; sets distributed.main_process_ip.", show_default=False)]
MainProcessPortOpt = Annotated[Optional[int], typer.Option("--main-process-port", help="Rank-0 machine's port; sets distributed.main_process_port.", show_default=False)]


def with_distributed(overrides: list[str] | None, *, num_processes: int | None, num_machines: int | None, machine_rank: int | None,
                     main_process_ip: str | None, main_process_port: int | None) -> list[str]:
    """The command line's distributed options, as recipe overrides (validated like the recipe)."""
    values = {"num_processes": num_processes, "num_machines": num_machines, "machine_rank": machine_rank,
              "main_process_ip": main_process_ip, "main_process_port": main_process_port}
    return [*(overrides or []), *(f"distributed.{key}={value}" for key, value in values.items() if value is not None)]


def fail(exc: FtuneError) -> None:
    say_error(exc)
    raise typer.Exit(exc.exit_code)


def say_error(exc: FtuneError) -> None:
    import os

    # Under `accelerate launch` every process fails the same way: only rank 0 says so.
    if os.environ.get("FTUNE_LAUNCHED") != "1" or os.environ.get("RANK", "0") == "0":
        typer.echo(f"error: {exc}", err=True)

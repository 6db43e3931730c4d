"""What several `ftune` commands share: the recipe argument, --set, and how a failure is reported."""

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


def fail(exc: FtuneError) -> None:
    say_error(exc)
    raise typer.Exit(exc.exit_code)


def say_error(exc: FtuneError) -> None:
    import os

    # Under `accelerate launch` every process fails the same way: only rank 0 says so.
    if os.environ.get("FTUNE_LAUNCHED") != "1" or os.environ.get("RANK", "0") == "0":
        typer.echo(f"error: {exc}", err=True)

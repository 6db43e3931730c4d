"""The `ftune` command line: one short function per command; heavy imports stay inside them.

`ftune --help` and `ftune validate` import neither torch nor transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftune.errors import FtuneError

app = typer.Typer(
    name="ftune",
    help="Fine-tune LLMs from YAML recipes: SFT and DPO with LoRA, QLoRA and DoRA; merge; export GGUF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable).", show_default=False),
]


def _fail(exc: FtuneError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


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


def main() -> None:  # pragma: no cover - entry point for `python -m ftune`
    try:
        app()
    except FtuneError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)

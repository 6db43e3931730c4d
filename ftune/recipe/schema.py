"""What a recipe looks like: the resolved YAML saved with a run, the JSON Schema and `ftune schema`'s field list."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from pydantic import BaseModel

from ftune.guards import textio
from ftune.recipe.loading import _inner_model
from ftune.recipe.model import Recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default spelled out), as saved in each run directory."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False, allow_unicode=True)


def schema_json() -> str:
    return textio.dumps(Recipe.model_json_schema(), indent=2)


def schema_fields() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) for every field, in recipe order."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            inner = _inner_model(field.annotation)
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "" if inner else textio.dumps(field.default_factory())
            else:
                default = textio.dumps(field.default)
            rows.append((key, _type_name(field.annotation), default, field.description or ""))
            if inner is not None:
                walk(inner, key + ("[]." if "list[" in str(field.annotation) else "."))

    walk(Recipe, "")
    return rows


def _type_name(annotation: Any) -> str:
    text = re.sub(r"ftune\.recipe\.\w+\.", "", str(annotation).replace("typing.", ""))
    text = text.replace("<class '", "").replace("'>", "")
    return text

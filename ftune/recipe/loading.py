"""Reading a recipe: the file, safe YAML, --set overrides, and validation errors placed at their line."""

from __future__ import annotations

import codecs
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ftune.errors import RecipeError
from ftune.guards import safe_yaml
from ftune.recipe.model import Recipe
from ftune.recipe.sections import MAX_RECIPE_BYTES, CrossFieldError


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported at once with its line."""
    path = Path(path)
    return parse_recipe(read_recipe_text(path), str(path), overrides, base_dir=path.parent)


def read_recipe_text(path: Path) -> str:
    """The recipe file as text: UTF-8 (an editor's byte-order mark is dropped), at most 1 MiB."""
    source = str(path)
    if path.is_dir():
        raise RecipeError([f"{path} is a directory, not a recipe file"], source)
    if path.exists() and not path.is_file():  # opening a FIFO would wait for a writer forever
        raise RecipeError([f"{path} is not a regular file (a pipe, socket or device), not a recipe file"], source)
    if not path.is_file():
        raise RecipeError([f"no such recipe file: {path}"], source)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe file: {exc.strerror or exc}"], source) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError([f"the file is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a small YAML text file "
                           "(is this the right file?)"], source)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise RecipeError(["line 1: the file is UTF-16 (or UTF-32) text; save the recipe as UTF-8"], source)
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise RecipeError([f"line {line}: the file holds NUL bytes: it is a binary file, not a YAML recipe"], source)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = raw.rfind(b"\n", 0, exc.start) + 1
        line, column = raw.count(b"\n", 0, exc.start) + 1, len(raw[start: exc.start].decode("utf-8", "replace")) + 1
        raise RecipeError([f"line {line}, column {column}: byte 0x{raw[exc.start]:02x} is not UTF-8 text; "
                           "save the recipe as UTF-8"], source) from None


def parse_recipe(text: str, source: str, overrides: list[str] = (), *, base_dir: Path | None = None) -> Recipe:
    """Validate recipe text. With `base_dir` (the recipe's folder), paths are checked against the disk too."""
    try:
        data, root = safe_yaml.load(text)
    except safe_yaml.YamlRefused as exc:
        raise RecipeError([f"line {p.line}, column {p.column}: {p.message}" for p in exc.problems], source) from None
    except yaml.YAMLError as exc:
        raise RecipeError([_yaml_problem(exc, text)], source) from None
    if data is None:
        raise RecipeError(["line 1: the recipe is empty; a recipe is a mapping of sections (stage:, base_model:, data:, ...)"], source)
    if not isinstance(data, dict):
        raise RecipeError(["line 1: a recipe is a mapping of sections (stage:, base_model:, data:, ...)"], source)
    marks = _key_marks(root)
    if overrides:
        data = _unshared(data)  # an override of one alias's value must not change the others
    override_paths: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for item in overrides:
        try:
            key_path, value = _apply_override(data, item)
            override_paths[key_path] = item
        except ValueError as exc:
            problems.append(f"--set {_clip(item)}: {_clip(str(exc))}")
    if problems:
        raise RecipeError(problems, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelled required key shows up twice (unknown + missing): keep the "did you mean".
        suggested = {(*e["loc"][:-1], _suggest_key(e["loc"])) for e in errors if e["type"] == "extra_forbidden"}
        errors = [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in suggested)]
        problems = [line for err in errors for line in _describe(err, marks, override_paths)]
        raise RecipeError(sorted(dict.fromkeys(problems), key=_line_order), source) from None
    if base_dir is not None:
        problem = output_dir_problem(recipe.output.dir, base_dir)
        if problem:
            raise RecipeError([_place(("output", "dir"), marks, override_paths) + f"output.dir: {problem}"], source)
    return recipe


def output_dir_problem(directory: str, base_dir: Path) -> str | None:
    """Why `directory` (relative to `base_dir`) cannot become a run directory as the disk stands, or None.

    Only what is there today: a file, a broken link, a file where a parent folder should be.
    Which existing directories ftune may replace is decided where runs are started.
    """
    try:
        path = Path(directory).expanduser()
    except RuntimeError:  # ~name for a user that does not exist
        return f"cannot expand '{directory}': no such user's home directory"
    path = path if path.is_absolute() else Path(base_dir).absolute() / path
    if path.is_symlink() and not path.exists():
        return f"{path} is a symbolic link to something that does not exist"
    if path.exists():
        return None if path.is_dir() else f"{path} is an existing file, not a directory"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, so the directory {path} cannot be made"
    return None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: no mark, only a position
        at = exc.position
        line, column = text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1
        return f"line {line}, column {column}: invalid YAML: character U+{exc.character:04X} is not allowed in a YAML file"
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "line 1: "
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"{where}invalid YAML: {context + ', ' if context else ''}{problem}"


def _unshared(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _line_order(problem: str) -> tuple[int, int]:
    if problem.startswith("line "):
        digits = problem[5:].split(",")[0].split(":")[0]
        return (1, int(digits) if digits.isdigit() else 0)
    return (0, 0)  # --set problems first: they are what the user just typed


def _suggest_key(loc: tuple) -> str | None:
    found = difflib.get_close_matches(str(loc[-1]), _known_keys(tuple(loc[:-1])), n=1, cutoff=0.6)
    return found[0] if found else None


def _apply_override(data: dict, item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise ValueError("expected key.path=value")
    key, raw = item.split("=", 1)
    parts = tuple(p for p in key.strip().split("."))
    if not all(parts):
        raise ValueError("empty key in the path")
    try:
        value = safe_yaml.load(raw)[0] if raw.strip() else None
    except safe_yaml.YamlRefused as exc:
        raise ValueError(str(exc)) from None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"{'.'.join(parts[: i + 1])} is not an index of the list there")
            node = node[int(part)]
            continue
        if not isinstance(node.get(part, {}), (dict, list)):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"{key} is not an index of the list there")
        node[int(last)] = value
    elif value is None and not _accepts_null(parts):
        # A key that cannot be null has no value to set to null: null drops it from the recipe, so
        # its default applies (the one way to remove a key, e.g. adapter.r when switching to ia3).
        node.pop(last, None)
    else:
        node[last] = value
    return parts, value


def _accepts_null(parts: tuple[str, ...]) -> bool:
    """Whether the recipe key at `parts` (list indices as digits) takes null as a value (training.max_grad_norm: null)."""
    loc = tuple(int(p) if p.isdigit() else p for p in parts)
    model = _model_at(loc[:-1])
    field = model.model_fields.get(parts[-1]) if model is not None else None
    if field is None:
        return True  # not a key of the schema: validation names it
    return field.annotation is type(None) or type(None) in getattr(field.annotation, "__args__", ())


def _key_marks(root: yaml.Node | None) -> dict[tuple, tuple[int, int]]:
    """Map each key path (and list index) to the line and column where it starts, 1-based."""
    marks: dict[tuple, tuple[int, int]] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                sub = (*path, key_node.value)
                marks[sub] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = (*path, i)
                marks[sub] = (item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, sub)

    if root is not None:
        walk(root, ())
    return marks


def _describe(err: dict, marks: dict, override_paths: dict) -> list[str]:
    """The problems one validation error stands for, one line each (a cross-field check finds several)."""
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error" and isinstance(ctx.get("error"), CrossFieldError):
        lines = []
        for key_path, message in ctx["error"].problems:
            loc = tuple(key_path.split(".")) if isinstance(key_path, str) else key_path
            lines.append(_place(loc, marks, override_paths) + f"{'.'.join(str(p) for p in loc)}: {message}")
        return lines
    return [_describe_one(err, marks, override_paths)]


def _describe_one(err: dict, marks: dict, override_paths: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "list[", "function-"))))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    key_path = ".".join(str(p) for p in loc) or "(top level)"
    place = _place(loc, marks, override_paths)
    if kind == "extra_forbidden":
        suggestion = _suggest_key(loc)
        hint = f"; did you mean '{suggestion}'?" if suggestion else f"; known keys here: {', '.join(_known_keys(loc[:-1]))}"
        return f"{place}{key_path}: unknown key '{loc[-1]}'{hint}"
    if kind == "missing":
        doc = _field_doc(loc)
        return f"{place}{key_path}: required key is missing" + (f" ({doc})" if doc else "")
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected", "")
        options = [o.strip().strip("'\"") for o in expected.replace(" or ", ", ").split(",") if o.strip()]
        got = err.get("input")
        suggestion = difflib.get_close_matches(str(got), options, n=1, cutoff=0.5) if isinstance(got, str) else []
        hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
        return f"{place}{key_path}: {_clip(repr(got))} is not one of {', '.join(options)}{hint}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {_clip(repr(got))})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{place}{key_path}: {message[0].lower() + message[1:]}{shown}"


def _clip(text: str, limit: int = 400) -> str:
    """A value as an error line shows it: a 100 KB --set value or a 5,000-deep flow mapping would bury the message."""
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def _place(loc: tuple, marks: dict, override_paths: dict) -> str:
    for n in range(len(loc), 0, -1):
        prefix = tuple(str(p) if not isinstance(p, int) else p for p in loc[:n])
        as_strings = tuple(str(p) for p in loc[:n])
        if as_strings in override_paths:
            return f"--set {_clip(override_paths[as_strings])}: "
        if prefix in marks:
            line, column = marks[prefix][:2]
            return f"line {line}, column {column}: "
    return "line 1: "


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _known_keys(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _field_doc(loc: tuple) -> str | None:
    model = _model_at(loc[:-1])
    if model is None or loc[-1] not in model.model_fields:
        return None
    return model.model_fields[loc[-1]].description

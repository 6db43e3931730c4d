"""Every file a command writes (scores, eval results, a GGUF and its sidecars) goes through
`check_file_target` before any work: ftune replaces only a file the same command wrote.

The directory rule is ownership.py's; a file cannot hold a marker, so each command proves its
own files (a sidecar naming the file, metadata inside it, its first line) and passes that proof in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ftune.artifacts.kinds import KINDS, command, describe
from ftune.artifacts.ownership import read_json_object, refuse_file_on_path, refuse_inside
from ftune.errors import FtuneError


def check_file_target(path: Path, *, kind: str, ours: Callable[[Path], bool], overwrite: bool,
                      inputs: Sequence[tuple[str, Path]] = (), option: str = "--out", foreign: str | None = None) -> Path:
    """May a command write its file of `kind` at `path`? Returns the resolved path, or raises.

    Every file output goes through here. It may when nothing is there, or, with `overwrite`,
    when `ours(path)` proves the same command wrote it (its sidecar, its metadata, its first
    line); never over one of the command's inputs (the recipe, a data file, a model's files),
    never inside an input folder or another artifact (a run, a merged model), never a directory.
    `foreign` words the refusal of a file that is not the command's own (default: who did not write it).
    """
    final = Path(path).expanduser().resolve()  # a symlink: the rule applies to the file that would change
    writer = command(kind)
    refuse_file_on_path(final, option=option)
    refuse_inside(final, kind=kind, option=option)
    for what, item in inputs:
        for place in {Path(item).expanduser().resolve(), Path(os.path.abspath(item))}:  # a symlinked input: its target and the link
            if place == final:
                raise FtuneError(f"{final} is {what}", place=option, hint=f"name a new file for {option}")
            if place.is_dir() and place in final.parents:
                raise FtuneError(f"{final} is inside {what} {place}", place=option, hint=f"write {option} outside it")
    if final.is_dir():
        raise FtuneError(f"{final} is a directory", place=option, hint=f"{option} names the file to write")
    if final.exists():
        if not ours(final):
            found = file_kind(final)
            what = f" (it is {describe(found)})" if found else ""
            raise FtuneError(f"{final} already exists and {foreign or f'{writer} did not write it'}{what}; {writer} replaces only its own outputs",
                             place=option, hint=f"choose another path for {option}")
        if not overwrite:
            raise FtuneError(f"{final} already exists", place=option,
                             hint=f"pass --overwrite to replace it (an earlier `{writer}` output), or choose another path for {option}")
    return final


def file_kind(path: Path) -> str | None:
    """What ftune file `path` looks like, for a refusal's wording only (never as proof)."""
    path = Path(path)
    score = read_json_object(path.with_name(path.name + ".score.json"))
    if score is not None and score.get("written_by") == "ftune":
        return "scores"
    if read_json_object(path.with_name(path.name + ".parity.json")) is not None:
        return "gguf"
    data = read_json_object(path) if path.suffix == ".json" else None
    if data is not None and data.get("written_by") == "ftune":
        kind = data.get("kind") or {"eval": "eval-results", "score": "scores"}.get(data.get("command"))
        return kind if kind in KINDS else "unknown"
    return None

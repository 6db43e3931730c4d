"""ftune deletes or replaces only what ftune wrote: the rule, and the atomic writes built on it.

A directory is ftune's when it holds a run.json that ftune wrote (a run), the output marker
that `atomic_dir` puts in every directory it produces (adapters, checkpoints, merged models,
caches), or when it sits inside a run (its adapter, a checkpoint). Nothing else is ever
replaced, whatever the flags say; and never, even when ftune's, the filesystem root, a home
directory, the current directory, or a directory holding the command's own inputs (the
recipe, its data, the run being merged). Symlinks are resolved first, so the rule applies to
the directory that would really change.

Replacing is narrower still: a command replaces only an earlier output of its own kind (kinds.py),
proven by the kind recorded in the marker (or, for a file, by the command's own proof, see
`check_file_target`), and never produces anything inside another artifact (a run's adapter
is no place for curated data, a merged model no place for scores).

Final artifacts are built beside their destination and renamed into place; a replaced one is
renamed aside first and deleted last, so a crash leaves the previous state or the new one,
never a half-written artifact that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from itertools import takewhile
from pathlib import Path

from ftune.artifacts.kinds import KINDS, RUN_PARTS, command, describe
from ftune.artifacts.lock import LOCK_FILE
from ftune.errors import FtuneError
from ftune.guards import signals, textio

RUN_FILE = "run.json"
OUTPUT_MARKER = ".ftune-output.json"
# Written into a run directory before the run starts (by the launcher, by the lock): not content.
LAUNCH_FILES = ("accelerate_config.yaml", LOCK_FILE)
ASIDE = ".replaced-"  # `.NAME.replaced-TIME-PID`: a replaced directory, deleted once its successor is in place


def is_run(path: Path) -> bool:
    """An ftune run directory: its run.json is one ftune wrote (every one names ftune_version)."""
    data = read_json_object(Path(path) / RUN_FILE)
    return data is not None and "ftune_version" in data


def is_output(path: Path) -> bool:
    data = read_json_object(Path(path) / OUTPUT_MARKER)
    if data is not None and data.get("written_by") == "ftune":
        return True
    # A model merged before outputs carried the marker: its merge.json says who wrote it.
    merged = read_json_object(Path(path) / "merge.json")
    return merged is not None and merged.get("stage") == "merge" and "ftune_version" in merged


def output_kind(path: Path) -> str | None:
    """The kind of artifact ftune wrote at directory `path` (kinds.py), or None when ftune did not write it.

    A marker from before markers named their kind is read by what the directory holds; one
    that says nothing recognisable is "unknown", which nothing replaces.
    """
    path = Path(path)
    if is_run(path):
        return "run"
    marker = read_json_object(path / OUTPUT_MARKER)
    if marker is not None and marker.get("written_by") == "ftune":
        kind = marker.get("kind")
        return kind if isinstance(kind, str) and kind in KINDS else _legacy_kind(path, marker)
    merged = read_json_object(path / "merge.json")
    if merged is not None and merged.get("stage") == "merge" and "ftune_version" in merged:
        return "merged-model"
    session = read_json_object(path / "label-session.json")
    if session is not None and session.get("format") == "ftune-label-session":
        return "label-session"
    return None


def _legacy_kind(path: Path, marker: dict) -> str:
    if marker.get("what") == "tokenized data cache":
        return "data-cache"
    if (path / "merge.json").is_file():
        return "merged-model"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "trainable.safetensors").is_file():
        return "checkpoint"
    if (path / "removed.jsonl").is_file() and (path / "report.json").is_file():
        return "curated-data"
    if (path / "config.json").is_file():
        return "trained-model" if is_run(path.parent) else "model-cache"
    return "unknown"


def container(path: Path) -> tuple[Path, str] | None:
    """The nearest folder above `path` that is an ftune artifact, with its kind (None: there is none)."""
    for parent in _absolute(path).parents:
        kind = output_kind(parent)
        if kind is not None:
            return parent, kind
    return None


def what_is(path: Path, kind: str) -> str:
    """A kind, described for a refusal; a run's parts name the stage that wrote the run."""
    run = Path(path) if kind == "run" else Path(path).parent if kind in ("adapter", "trained-model") else Path(path).parent.parent
    meta = read_json_object(run / RUN_FILE) if kind == "run" or kind in RUN_PARTS else None
    stage = meta.get("stage") if meta else None
    return describe(kind, stage if isinstance(stage, str) else None)


def refuse_file_on_path(path: Path, *, option: str, place: str | None = None) -> None:
    """A file where one of the output's folders goes: named now, not as a mkdir error later."""
    final = _absolute(path)
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FtuneError(f"{parent} is a file, so {final} cannot be created in it", place=place or option,
                                 hint=f"choose another path for {option}, or move the file away")
            return


def refuse_inside(path: Path, *, kind: str, option: str, place: str | None = None) -> None:
    """Nothing but a run's own parts is produced inside another artifact (a run, a merged model,
    curated data, a cache): whatever is written there would be taken for part of it."""
    found = container(path)
    if found is None:
        return
    folder, found_kind = found
    if found_kind == "run" and kind in RUN_PARTS:
        return
    raise FtuneError(f"{_absolute(path)} is inside {folder}, {what_is(folder, found_kind)}; {command(kind)} writes nothing inside "
                     "another command's output", place=place or option, hint=f"choose a path outside {folder} for {option}")


def refuse_other_kind(path: Path, *, kind: str, option: str, place: str | None = None) -> None:
    """Refuse a directory holding ftune's output of another kind than `kind`."""
    found = output_kind(path)
    if found is not None and found != kind:
        writer = command(kind)
        raise FtuneError(f"{_absolute(path)} is {what_is(path, found)}, not an earlier `{writer}` output; {writer} replaces only "
                         "its own outputs", place=place or option, hint=f"choose a new directory for {option}")


def owned(path: Path) -> bool:
    """A directory ftune made as a whole: a run or a marked output."""
    return is_run(path) or is_output(path)


def is_ftune_dir(path: Path) -> bool:
    """ftune's: a run, a marked output, or a directory inside a run (adapter/, checkpoints/step-N/)."""
    path = Path(path)
    return owned(path) or is_run(path.parent) or is_run(path.parent.parent)


def contents(path: Path) -> list[str]:
    """What a directory holds besides the files ftune puts there before a run starts."""
    try:
        return sorted(p.name for p in Path(path).iterdir() if p.name not in LAUNCH_FILES)
    except (FileNotFoundError, NotADirectoryError):
        return []


def refuse_protected(path: Path, *, inputs: Sequence[tuple[str, Path]] = (), option: str, place: str | None = None,
                     cwd_ok: bool = False) -> None:
    """Refuse a directory ftune never writes a run or an output into, whoever wrote it.

    `inputs` are (what, path) pairs the command reads; `option` names the setting that chose
    the directory (and `place` where it was set, when that says more); `cwd_ok` lets a run use
    the current directory when it is already ftune's or empty (an output is never renamed
    from under it).
    """
    target = _absolute(path)

    def refuse(why: str) -> None:
        raise FtuneError(f"{target} {why}", place=place or option, hint=f"choose a new directory of its own for {option}")

    if target == Path(target.anchor):
        refuse("is the filesystem root")
    for home in _homes():
        if target == home:
            refuse("is your home directory")
        if target in home.parents:
            refuse(f"contains your home directory {home}")
    for what, item in inputs:
        for place in {_absolute(item), Path(os.path.abspath(item))}:  # a symlinked input: its target and the link
            if place == target:
                refuse(f"is {what}")
            if target in place.parents:
                refuse(f"is the folder of {what} {place}" if place.parent == target else f"contains {what} {place}")
    with contextlib.suppress(OSError):  # a deleted current directory has no path to compare
        if not cwd_ok and target == Path.cwd().resolve():
            refuse("is the current directory")


def refuse_foreign(path: Path, *, option: str, place: str | None = None) -> None:
    """The refusal for a non-empty directory ftune did not write: it suggests another place, not
    a flag that would delete the user's files."""
    names = contents(path)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise FtuneError(f"{path} holds files ftune did not write ({shown})", place=place or option,
                     hint=f"ftune replaces only what it wrote; choose a new or empty directory for {option}")


def check_target(path: Path, *, kind: str, overwrite: bool, inputs: Sequence[tuple[str, Path]] = (),
                 option: str = "the output") -> Path:
    """May `atomic_dir` produce a directory of `kind` at `path`? Returns the resolved path, or raises.

    It may when nothing is there, or, with `overwrite`, when an ftune output of the same kind
    (or an empty directory) is; never inside another artifact, nor a protected directory (see above).
    """
    final = _absolute(path)
    refuse_file_on_path(final, option=option)
    if final.is_dir():
        refuse_other_kind(final, kind=kind, option=option)  # what is there names itself first: "a run's adapter (...)"
    refuse_inside(final, kind=kind, option=option)
    if not final.exists():
        return final
    refuse_protected(final, inputs=inputs, option=option)
    if not final.is_dir():
        raise FtuneError(f"{final} is a file, not a directory", place=option, hint=f"choose another path for {option}")
    refuse_other_kind(final, kind=kind, option=option)
    if contents(final) and output_kind(final) is None:
        refuse_foreign(final, option=option)
    if not overwrite:
        raise FtuneError(f"{final} already exists", place=option, hint=f"choose another path for {option}, or pass --overwrite to replace it")
    return final


@contextlib.contextmanager
def atomic_dir(final: Path, *, kind: str, overwrite: bool = False, inputs: Sequence[tuple[str, Path]] = (),
               option: str = "the output") -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it replaces `final` in one rename.

    `check_target` decides first whether `final` may be produced at all; the result carries
    the output marker with its kind, which is what lets a later --overwrite of the same kind replace it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")  # a bug in ftune, not the user's doing
    final = Path(final)
    _finish_replacement(_absolute(final))
    final = check_target(final, kind=kind, overwrite=overwrite, inputs=inputs, option=option)
    created = make_parents(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except BaseException as exc:
        remove_empty(created)
        _raise_with_path(exc, final)
    try:
        yield tmp
        from ftune import __version__

        write_json(tmp / OUTPUT_MARKER, {"written_by": "ftune", "kind": kind, "ftune_version": __version__})
        _fsync_tree(tmp)
        with signals.deferred():  # a stop between the two renames would leave no output at all
            old = set_aside(final) if final.exists() else None
            os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        with signals.deferred():  # a second Ctrl-C must not leave the half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            remove_empty(created)
        _raise_with_path(exc, final)


def set_aside(path: Path) -> Path:
    """Rename `path` to a recognisable sibling (same filesystem, so one rename) and return it."""
    aside = path.with_name(f".{path.name}{ASIDE}{time.time_ns():020d}-{os.getpid()}")
    os.rename(path, aside)
    return aside


def _finish_replacement(final: Path) -> None:
    """A replacement killed between its renames left `final` set aside: put it back, or delete
    it when the new one made it into place."""
    if not final.parent.is_dir():
        return
    asides = sorted(p for p in final.parent.glob(f".{final.name}{ASIDE}*") if p.is_dir() and is_ftune_dir(p))
    if not asides:
        return
    if not final.exists():
        os.rename(asides.pop(), final)
    if is_ftune_dir(final):
        for old in asides:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    """Open a temporary file next to `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    created = make_parents(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    except BaseException as exc:
        remove_empty(created)
        _raise_with_path(exc, final)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; outputs get the usual mode
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        with signals.deferred(), contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            remove_empty(created)
        _raise_with_path(exc, final)


@contextlib.contextmanager
def parents_made(final: Path) -> Iterator[None]:
    """The folders `final` goes in, made for the block; those it made go again (when empty) if the block fails."""
    created = make_parents(final)
    try:
        yield
    except BaseException:
        remove_empty(created)
        raise


def make_parents(final: Path) -> list[Path]:
    """Create the folders `final` goes in; returns those that were missing, deepest first, so that
    a failed write removes them again and leaves the disk as it was."""
    parent = Path(final).parent
    missing = [p for p in takewhile(lambda p: not p.exists(), [parent, *parent.parents])]
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _raise_with_path(exc: BaseException, final: Path):
    """Re-raise; an OSError that names no path (a write, an fsync) names the output it was for,
    which is what the user's message needs (ftune.guards.oserrors)."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        raise OSError(exc.errno, exc.strerror, str(final)) from exc
    raise exc


def write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as handle:
        textio.dump(data, handle, place=str(path), indent=2, sort_keys=False)  # NaN or infinity: refused, never written
        handle.write("\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                try:
                    os.fsync(handle.fileno())
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def _homes() -> set[Path]:
    """$HOME and the account's home from the password database (they differ under sudo, in containers)."""
    homes = {Path(os.path.expanduser("~")).resolve()}
    with contextlib.suppress(ImportError, KeyError, OSError):
        import pwd

        homes.add(Path(pwd.getpwuid(os.getuid()).pw_dir).resolve())
    return {h for h in homes if h != Path(h.anchor)}  # a home of '/' (some service accounts) is the root rule's


def read_json_object(path: Path) -> dict | None:
    """A small JSON object file, or None: ftune's own markers are a few hundred bytes."""
    try:
        if path.stat().st_size > 16 * 2**20:
            return None
        data = textio.loads(path.read_bytes(), str(path))  # depth-bounded: a marker is read back, not trusted
    except (OSError, FtuneError):
        return None
    return data if isinstance(data, dict) else None

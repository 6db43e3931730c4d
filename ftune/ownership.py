"""ftune deletes or replaces only what ftune wrote: the rule, and the atomic writes built on it.

A directory is ftune's when it holds a run.json that ftune wrote (a run), the output marker
that `atomic_dir` puts in every directory it produces (adapters, checkpoints, merged models,
caches), or when it sits inside a run (its adapter, a checkpoint). Nothing else is ever
replaced, whatever the flags say; and never, even when ftune's, the filesystem root, a home
directory, the current directory, or a directory holding the command's own inputs (the
recipe, its data, the run being merged). Symlinks are resolved first, so the rule applies to
the directory that would really change.

Final artifacts are built beside their destination and renamed into place; a replaced one is
renamed aside first and deleted last, so a crash leaves the previous state or the new one,
never a half-written artifact that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ftune.errors import FtuneError
from ftune.lock import LOCK_FILE

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


def check_target(path: Path, *, overwrite: bool, inputs: Sequence[tuple[str, Path]] = (), option: str = "the output") -> Path:
    """May `atomic_dir` produce a directory at `path`? Returns the resolved path, or raises.

    It may when nothing is there, or, with `overwrite`, when an ftune output (or an empty
    directory) is; never a run directory itself, nor a protected directory (see above).
    """
    final = _absolute(path)
    if not final.exists():
        return final
    refuse_protected(final, inputs=inputs, option=option)
    if not final.is_dir():
        raise FtuneError(f"{final} is a file, not a directory", place=option, hint=f"choose another path for {option}")
    if contents(final) and not is_ftune_dir(final):
        refuse_foreign(final, option=option)
    if is_run(final):
        raise FtuneError(f"{final} is an ftune run directory; an output never replaces a run", place=option,
                         hint=f"choose another path for {option}, e.g. a folder beside the run")
    if not overwrite:
        raise FtuneError(f"{final} already exists", place=option, hint=f"choose another path for {option}, or pass --overwrite to replace it")
    return final


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False, inputs: Sequence[tuple[str, Path]] = (),
               option: str = "the output") -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it replaces `final` in one rename.

    `check_target` decides first whether `final` may be produced at all; the result carries
    the output marker, which is what lets a later --overwrite replace it.
    """
    final = Path(final)
    _finish_replacement(_absolute(final))
    final = check_target(final, overwrite=overwrite, inputs=inputs, option=option)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        from ftune import __version__

        write_json(tmp / OUTPUT_MARKER, {"written_by": "ftune", "ftune_version": __version__})
        _fsync_tree(tmp)
        if final.exists():
            old = set_aside(final)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files owner-only; outputs get the usual mode
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

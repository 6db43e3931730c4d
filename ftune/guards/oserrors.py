"""A file-system error on one of ftune's writes, as one line naming the path and what to do.

ftune's writes go through many libraries (safetensors, datasets, matplotlib, the tokenizer's
save), so the errors are not caught where they happen: `cli.main` turns every OSError whose
errno is below into an FtuneError with `as_ftune_error`, whichever command and process raised
it. An OSError with another errno (a network failure, a bug) keeps its traceback.
"""

from __future__ import annotations

import errno

from ftune.errors import FtuneError

_PERMISSION = "ftune may not write there: choose a folder you can write to (an output option, output.dir, or FTUNE_CACHE for the cache)"
_SPACE = "free some space and run the same command again (an interrupted training run resumes from its last checkpoint)"

HINTS: dict[int, str] = {
    errno.EACCES: _PERMISSION,
    errno.EPERM: _PERMISSION,
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EFBIG: "the file is larger than this file system allows: choose a folder on another disk",
    errno.ENOTDIR: "a part of that path is a file where a folder should be: move the file away, or choose another path",
    errno.EISDIR: "that path is a folder where a file should be: choose another path",
    errno.EEXIST: "something is already at that path: choose another path",
    errno.ENOTEMPTY: "a folder there is not empty: choose another path",
    errno.ENAMETOOLONG: "the path, or a name in it, is too long for the file system: choose a shorter one",
    errno.ELOOP: "the path goes through a loop of symbolic links: fix the links, or choose another path",
    errno.EXDEV: "ftune renames its outputs into place, which cannot cross file systems: choose a path on one disk",
    errno.EMLINK: "the folder holds as many entries as the file system allows: choose another folder",
    errno.ENXIO: "that path is a device or socket, not a file: choose another path",
    errno.ETXTBSY: "that file is in use by a running program: choose another path",
}

# A write that fails this way fails before anything is renamed into place: ftune's artifacts
# are written beside their destination and renamed only when complete.
NOTHING_REPLACED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def as_ftune_error(exc: OSError) -> FtuneError | None:
    """The one-line error for `exc`, or None when its errno is not a file-system problem a user can fix."""
    hint = HINTS.get(exc.errno)  # type: ignore[arg-type]
    if hint is None:
        return None
    reason = exc.strerror or errno.errorcode.get(exc.errno, "error")  # type: ignore[arg-type]
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    where = f"{paths}: " if paths else ""
    name = errno.errorcode.get(exc.errno, "")  # type: ignore[arg-type]
    tail = "; nothing was replaced: finished artifacts are renamed into place only when complete" if exc.errno in NOTHING_REPLACED else ""
    return FtuneError(f"{where}{reason}{f' ({name})' if name else ''}{tail}", hint=hint)

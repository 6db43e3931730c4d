"""The run lock: one process writes a run directory at a time.

The lock is a file in the run directory naming its holder (pid, host, start time, command),
held with flock so the kernel frees it however the holder ends: an exception, a signal, even
SIGKILL. A lock file left by a process that is gone is stale: the next run takes it over and
says so. Under `accelerate launch` the launcher holds the lock for the processes it starts;
they find it through FTUNE_RUN_LOCK and take none themselves.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from ftune.errors import FtuneError
from ftune.guards import textio

LOCK_FILE = "run.lock"
HOLDER_ENV = "FTUNE_RUN_LOCK"  # "PID:PATH" of the launcher's lock, inherited by its processes
LAUNCHED_ENV = "FTUNE_LAUNCHED"  # set by ftune's launcher (train/distributed.py) for the processes it starts


def is_launched() -> bool:
    """Whether this process is one of those `accelerate launch` started for ftune: its launcher holds the lock."""
    return os.environ.get(LAUNCHED_ENV) == "1"


class RunLocked(FtuneError):
    """Another process holds the run directory."""

    def __init__(self, run_dir: Path, holder: dict):
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        since = f" since {holder['started']}" if holder.get("started") else ""
        command = f" ({holder['command']})" if holder.get("command") else ""
        super().__init__(
            f"{run_dir} is in use by process {pid} on {host}{since}{command}",
            place=str(Path(run_dir) / LOCK_FILE),
            hint=f"one run directory takes one run at a time: wait for process {pid} to finish, or stop it "
            "(a stopped run saves a checkpoint and resumes), or set another output.dir",
        )


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock; a second holder is refused with the pid."""

    def __init__(self, run_dir: Path, *, say: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.resolve() / LOCK_FILE
        self.say = say or (lambda text: print(text, file=sys.stderr))
        self._fd: int | None = None
        self.inherited = False  # held by the launcher of this process

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        if self._held_by_launcher():
            self.inherited = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(20):
            # O_NOFOLLOW: a run.lock that is a link is nobody's lock; following it would truncate,
            # rewrite and finally unlink whatever it names. The open fails (ELOOP) and the error names the path.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                if not _try_lock(fd, self.path):
                    raise RunLocked(self.run_dir, _read(self.path) or {})
                if _same_file(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        else:
            raise FtuneError(f"cannot take the lock {self.path}: it keeps being replaced")
        previous = _parse(os.pread(fd, 1 << 16, 0))
        if previous and previous.get("pid") != os.getpid():
            self.say(f"note: took over the lock of process {previous.get('pid')} on {previous.get('host')}"
                     f" (started {previous.get('started', '?')}), which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (textio.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as exc:  # a full disk: the lock is not taken, and the error names the file (ftune.guards.oserrors)
            with contextlib.suppress(OSError):
                if _same_file(fd, self.path):  # only the file this process created and locked, as release() does
                    os.unlink(self.path)
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._fd = fd
        os.environ[HOLDER_ENV] = f"{os.getpid()}:{self.path}"
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.environ.get(HOLDER_ENV) == f"{os.getpid()}:{self.path}":
            del os.environ[HOLDER_ENV]
        with contextlib.suppress(OSError):
            if _same_file(fd, self.path):  # the run may have been put back from aside, with a file of its own
                os.unlink(self.path)
        os.close(fd)  # frees the flock; a waiting acquirer then finds the file gone and retries

    def _held_by_launcher(self) -> bool:
        if not is_launched():
            return False
        pid, _, path = os.environ.get(HOLDER_ENV, "").partition(":")
        if path:
            holder = _read(self.path) or {}
            return path == str(self.path) and str(holder.get("pid")) == pid
        # Launched by hand (no ftune launcher): the main process takes the lock for all of them.
        return os.environ.get("RANK", "0") != "0"


def lock_holder(run_dir: Path) -> dict | None:
    """Who holds `run_dir`'s lock now: their pid, host and start time; None when nobody does
    (no lock file, or a stale one left by a process that is gone)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, path):
            return None
        return _read(path) or {}
    finally:
        os.close(fd)  # also frees the probe's own lock


def _try_lock(fd: int, path: Path) -> bool:
    """Take an exclusive lock without waiting; False when a live process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: judge by the recorded pid
        return not _alive(_read(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return not _alive(_read(path))  # a filesystem without flock (some network mounts)


def _alive(holder: dict | None) -> bool:
    if not holder or not isinstance(holder.get("pid"), int) or holder["pid"] == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    return pid_alive(holder["pid"])


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(path: Path) -> dict | None:
    try:
        with open(path, "rb") as handle:
            return _parse(handle.read(1 << 16))
    except OSError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        data = textio.loads(raw, "lock file")  # depth-bounded: a lock file is read back, not trusted
    except FtuneError:
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")

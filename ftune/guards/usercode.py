"""The user's own Python (reward functions, label judges, any later hook), run where it cannot take ftune with it.

A user's file is imported, and its functions called, in a worker process of its own (a fresh
interpreter: usercode_worker.py), one long-lived worker per file per command, a batch per call.
Whatever the user's code does ends as one of: a value (checked here), or an FtuneError naming the
function and the data row: an exception (with the user's own frames), sys.exit, a worker that
died (os._exit, a crash, a kill), or a call that ran past its time limit (the worker is killed).
A fork inside the user's code never answers twice: the forked child leaves silently.

While a call runs, ftune waits on the worker's socket, not in the user's code: a stop signal
(SIGINT, SIGTERM) is handled as ftune's handler says, then the call is abandoned at once (the
worker killed) by raising `Stopped`, a KeyboardInterrupt. Every worker is killed with its process
group when the command ends (`close_all`, called by the CLI's entry point), and dies with ftune.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import hashlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ftune.errors import FtuneError
from ftune.guards.signals import Interrupt
from ftune.guards.usercode_worker import Opaque

DEFAULT_TIMEOUT_S = 60.0  # per call: generous for a batch of completions, short of a hung run
LOAD_TIMEOUT_S = 300.0  # importing the user's file (it may import large libraries of its own)
FLOAT32_MAX = 3.4028234663852886e38  # rewards become float32 tensors: a larger value would turn into infinity
POLL_S = 0.1  # how often a wait looks at the clock and the worker

_open: dict[Path, UserCode] = {}


class Stopped(Interrupt):
    """A stop signal arrived while user code ran: the call was abandoned (its worker killed)."""


class UserCode:
    """One user file imported in its own worker process; `call` runs one of its functions there."""

    def __init__(self, file: Path, what: str):
        self.file, self.what = file, what  # what: how messages name the file ("the judge", "rewards.py")
        self.process: subprocess.Popen | None = None
        self.conn = None
        self.names: dict[str, bool] = {}  # every name the module defines: callable or not
        self.own: list[str] = []  # the functions it defines itself (for "did you mean")
        self.stamp = _stamp(file)  # the file as imported
        self._start()

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        module_name = "ftune_user_" + hashlib.sha256(str(self.file.resolve()).encode()).hexdigest()[:12]
        flags = ["-P"] if sys.version_info >= (3, 11) else []  # the current folder is not put first on the import path
        try:
            printed = sys.__stderr__.fileno() if sys.__stderr__ is not None else subprocess.DEVNULL
        except (OSError, ValueError):
            printed = subprocess.DEVNULL
        try:  # the user's prints go to ftune's stderr; its own process group: a fork of the user's is killed with it
            self.process = subprocess.Popen(
                [sys.executable, *flags, "-m", "ftune.guards.usercode_worker", str(theirs.fileno()), str(self.file), module_name],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=printed, start_new_session=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        _open[self.file.resolve()] = self
        reply = self._wait(f"loading {self.file}", None, LOAD_TIMEOUT_S, None)
        if reply[0] == "syntax":
            self.close()
            raise FtuneError(f"invalid Python: {reply[1]}", place=f"{self.file} line {reply[2]}")
        if reply[0] != "ok":
            self.close()
            raise FtuneError(f"loading {self.what} {_ending(reply)}", place=str(self.file))
        self.names, self.own = reply[1], reply[2]

    def function(self, name: str, what: str) -> None:
        """Refuse a name the module does not define as something callable, with the closest it does."""
        if self.names.get(name):
            return
        if name in self.names:
            raise FtuneError(f"{what}: {self.file}'s '{name}' is not a function")
        close = difflib.get_close_matches(name, self.own, n=1)
        raise FtuneError(f"{what}: {self.file} defines no function '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""),
                         hint=f"functions there: {', '.join(self.own)}" if self.own and not close else None)

    def call(self, name: str, args: tuple, kwargs: dict, *, what: str, place: str, timeout: float, limit_key: str):
        """The function's plain result (builtins; usercode_worker.Opaque for the rest), or an FtuneError
        naming `what` and `place`. A call that raised or called sys.exit leaves the worker ready for more."""
        if self.process is None:
            self._start()
        try:
            self.conn.send((name, args, kwargs))
        except (OSError, ValueError):
            pass  # a dead worker: the wait says so
        reply = self._wait(what, place, timeout, limit_key)
        if reply[0] == "ok":
            return reply[1]
        raise UserCodeFailed(f"{what} {_ending(reply)}", place=place, hint=None)

    def _wait(self, what: str, place: str | None, timeout: float, limit_key: str | None):
        deadline = time.monotonic() + timeout
        with _stop_at_once(self):
            while True:
                if self.conn.poll(POLL_S):
                    try:
                        return self.conn.recv()
                    except (EOFError, OSError):
                        pass  # the socket closed: the worker died (its exit status comes a moment later)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=5)
                    code = self.process.returncode
                    self.close()
                    raise FtuneError(f"{what} ended its worker process ({_exit_text(code)}) instead of returning", place=place,
                                     hint="os._exit, a crash or a kill inside the user's code ends the process it runs in")
                if self.process.poll() is not None:
                    code = self.process.returncode
                    self.close()
                    raise FtuneError(f"{what} ended its worker process ({_exit_text(code)}) instead of returning", place=place)
                if time.monotonic() > deadline:
                    self.close()
                    raise FtuneError(f"{what} did not return within {timeout:g} s; it was stopped", place=place,
                                     hint=f"make it faster, or allow it longer with {limit_key}" if limit_key else None)

    def close(self) -> None:
        """Kill the worker and anything the user's code started in its process group."""
        process, self.process = self.process, None
        _open.pop(self.file.resolve(), None) if _open.get(self.file.resolve()) is self else None
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None
        if process is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            process.wait(timeout=10)


class UserCodeFailed(FtuneError):
    """The user's function raised or called sys.exit; the worker is still there (a smaller call may be tried)."""


def open_file(file: Path, what: str) -> UserCode:
    """The file's worker, started (and the file imported) on first use; one per file for the whole command."""
    found = _open.get(file.resolve())
    if found is not None and found.process is not None and found.stamp == _stamp(file):
        return found
    if found is not None:  # the file changed since (a second command in one process): import it afresh
        found.close()
    return UserCode(file, what)


def _stamp(file: Path) -> tuple:
    with contextlib.suppress(OSError):
        info = file.stat()
        return info.st_mtime_ns, info.st_size
    return ()


def close_all() -> None:
    for code in list(_open.values()):
        code.close()
    _open.clear()


atexit.register(close_all)


@contextlib.contextmanager
def _stop_at_once(code: UserCode):
    """SIGINT/SIGTERM while waiting: ftune's own handler runs (it records the stop), then the call is abandoned.
    Only the main thread handles signals; elsewhere the wait is as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum, frame):
        before = previous[signum]
        if before == signal.SIG_IGN:
            return
        try:
            if callable(before):
                before(signum, frame)
        finally:  # whatever that handler raised (or not): the worker goes
            code.close()
        raise Stopped(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _ending(reply: tuple) -> str:
    """How a call that gave no value ended, in words (its frames on the lines after)."""
    if reply[0] == "exit":
        return f"called sys.exit({reply[1]!r}) instead of returning{reply[2]}"
    if reply[0] == "syntax":
        return f"has invalid Python: {reply[1]} (line {reply[2]})"
    return f"raised {reply[1]}{reply[2]}"


def _exit_text(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


# --------------------------------------------------------------------------- results


def number(value, what: str, place: str, *, index: int | None = None, allow_none: bool = True) -> float | None:
    """One returned value as a float a float32 tensor can hold, or an FtuneError naming it.

    None passes when `allow_none` (a reward that does not apply); True and False count as 1 and 0
    (a check's result is a natural reward); strings, NaN, infinities and magnitudes beyond
    float32 (3.4e38) are refused, huge integers (10**400) included."""
    at = f" for completion {index}" if index is not None else ""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int):
        if abs(value) > FLOAT32_MAX:
            digits = int(value.bit_length() * math.log10(2)) + 1
            raise FtuneError(f"{what} returned an integer of about {digits} digits{at}: a reward must lie within "
                             f"float32's range (±3.4e38)", place=place)
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FtuneError(f"{what} returned {value}{at}: a reward must be a finite number", place=place)
        if abs(value) > FLOAT32_MAX:
            raise FtuneError(f"{what} returned {value:g}{at}, beyond float32's range (±3.4e38): it would become infinite "
                             "in training", place=place)
        return value
    kind = value.kind if isinstance(value, Opaque) else type(value).__name__
    shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
    raise FtuneError(f"{what} returned {shown} ({kind}){at}, not a number" + (" (or None)" if allow_none else ""), place=place)


def numbers(values, count: int, what: str, places: list[str], whole: str, counted: str) -> list[float | None]:
    """A function's result for `count` items: one number (or None) each, in order. `whole` names all the
    items' rows; `counted` says what the count is ("8 completions (2 prompts x 4 generations)")."""
    if not isinstance(values, (list, tuple)):
        kind = values.kind if isinstance(values, Opaque) else type(values).__name__
        raise FtuneError(f"{what} returned {kind}, not a list of {count} numbers (one per item)", place=whole)
    if len(values) != count:
        raise FtuneError(f"{what} returned {len(values)} values for {counted}; it must return one number (or None) per "
                         "completion, in order", place=whole)
    return [number(v, what, places[i], index=i) for i, v in enumerate(values)]

"""One stop-signal policy for every command: Ctrl-C (SIGINT) and SIGTERM both stop the command
by raising `Interrupt`, a KeyboardInterrupt, wherever it is.

A KeyboardInterrupt is what every `finally` and every `except BaseException` cleanup already
expects (temporary outputs removed, sessions saved, the terminal restored), and no library's
`except Exception` swallows it. Python's default SIGTERM action kills the process on the spot
instead: no cleanup runs, `.partial-` folders stay, nothing is said. Commands with their own
idea of a stop (the training loop saves a checkpoint on the first signal, see ftune/train/stopping.py;
`ftune label` saves its session) install their handlers over this one and restore it after.

A leaf module (it imports only ftune.errors), so every layer may use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, TypeVar

from ftune.errors import FtuneError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # both signals, as the training stages have always exited on a stop
T = TypeVar("T")


class Interrupt(KeyboardInterrupt):
    """A stop signal, raised in the main thread; `signal_name` says which."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raise(signum, frame) -> None:
    raise Interrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def policy() -> Iterator[None]:
    """Both signals raise `Interrupt` inside the block (the command line's entry point runs every command in it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def message(stop: KeyboardInterrupt, argv: list[str]) -> str:
    """The one line a stopped command ends with (`argv` without the program name)."""
    name = stop.signal_name if isinstance(stop, Interrupt) else "interrupted"
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    return (f"error: {name}: ftune {command} stopped; nothing half-written was kept "
            "(an output is renamed into place only once it is complete)")


def is_sigterm(exc: BaseException) -> bool:
    """A stop asked for by SIGTERM (a service manager, `kill`): never just 'stop this answer'."""
    return isinstance(exc, Interrupt) and exc.signal_name == "SIGTERM"


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold stop signals for a few lines that must finish (renaming a finished output into place,
    removing a temporary one); a signal that came meanwhile is delivered right after, to whatever
    handler was in place (so a second Ctrl-C during cleanup still stops, once the cleanup is done)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def interruptible(call: Callable[..., T], *args) -> T:
    """`call(*args)`, a long call into C (llama.cpp's quantizer: minutes for a large model), made in a
    helper thread. Python handles a signal only in the main thread, between bytecodes: the main
    thread waiting here (an interruptible wait) stops at once, where waiting inside the C call would
    stop only when it returns. The abandoned call runs on in the background until the process
    ends; what it writes is a temporary file that the stop removes."""
    if threading.current_thread() is not threading.main_thread():
        return call(*args)
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as exc:  # raised again in the caller's thread
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name=getattr(call, "__name__", "call"), daemon=True)
    worker.start()
    worker.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def unexplained(exc: BaseException) -> KeyboardInterrupt | None:
    """The stop behind `exc` (the SystemExit a command ended with), unless a message about it was
    already printed: a stop turned into an FtuneError (a run's "stopped at step N") says so itself."""
    seen: BaseException | None = exc
    for _ in range(32):  # exception chains are short; a bound all the same
        if seen is None or isinstance(seen, FtuneError):
            return None
        if isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None

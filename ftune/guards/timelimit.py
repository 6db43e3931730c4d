"""A time bound on pure-Python work in this process (rendering a chat template): `within(seconds)`.

The bound is a SIGALRM timer whose handler raises `TimeUp` in the main thread, between two
bytecodes of whatever runs there; Jinja renders in pure Python, so a template looping for
minutes is stopped where it is. Every process has its own main thread (the tokenization
workers too), so the bound holds in each. Off the main thread, or without SIGALRM, the work
runs unbounded. `TimeUp` is a BaseException so that no `except Exception` in a library on
the way swallows it. A timer set by someone else is restored, less the time used, afterwards.

A leaf module: it imports nothing of ftune.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

_active = False  # bounds do not nest: the outer one holds


class TimeUp(BaseException):
    """The bounded work ran past its time."""


def _raise(signum, frame) -> None:
    raise TimeUp()


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Run the block for at most `seconds`; past it, `TimeUp` is raised inside the block."""
    global _active
    if _active or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise)
    started = time.monotonic()
    left, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    _active = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _active = False
        signal.signal(signal.SIGALRM, previous)
        if left > 0:  # someone else's timer: what remained of it, less what this took
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - started), 1e-3), interval)

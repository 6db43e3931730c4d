"""The process a user's Python file runs in (reward functions, judges): see usercode.py for the parent's side.

Started as `python -m ftune.guards.usercode_worker FD`, a fresh interpreter (never a fork of a process
holding torch and CUDA), it talks to ftune over the socket FD only, so whatever the user's code
prints (sent to stderr) cannot corrupt the protocol or ftune's own stdout. It imports nothing of
ftune but this module. Every way the user's code can end a call becomes one reply: a value made
plain (builtins only, so the parent never unpickles the user's own classes), an exception with
the user's own frames, or sys.exit's code. A process forked by the user's code never replies:
it leaves with os._exit as soon as control comes back to this module.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 4  # a result nested deeper than this is shown, not passed on (no reward or judge needs more)


@dataclass(frozen=True)
class Opaque:
    """A returned value that is no number, string, list or tuple: its type and repr, for the error message."""

    kind: str
    text: str

    def __repr__(self) -> str:
        return self.text


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even by SIGKILL (elsewhere the closed socket ends it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before that took hold
        os._exit(0)


def plain(value, depth: int = 0):
    """`value` as builtins only: numbers (numpy's and torch's scalars included) as int or float, lists and tuples
    element by element, anything else an Opaque. A bool stays a bool: the parent decides what it means."""
    if value is None or isinstance(value, (bool, str, int, float, Opaque)):  # an Opaque: already plain (the parent
        return value                                                        # runs a worker's reply through here again)
    if hasattr(value, "__index__") and not hasattr(value, "__len__"):  # numpy's integers
        try:
            return int(value.__index__())
        except Exception:
            pass
    if hasattr(value, "__float__") and not isinstance(value, (bytes, bytearray)):  # numpy's floats, 0-d tensors
        try:
            return float(value)
        except Exception:
            pass
    if depth < MAX_DEPTH and isinstance(value, (list, tuple)):
        return type(value)(plain(v, depth + 1) for v in value) if type(value) in (list, tuple) else [plain(v, depth + 1) for v in value]
    if depth < MAX_DEPTH and not isinstance(value, (bytes, bytearray, dict, set)) and hasattr(value, "__len__") and hasattr(value, "__iter__"):
        try:  # a numpy array, a tensor: a list of its elements
            return [plain(v, depth + 1) for v in value]
        except Exception:
            pass
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return Opaque(type(value).__name__, text if len(text) <= 120 else text[:117] + "...")


def user_frames(exc: BaseException, file: Path) -> str:
    """The frames of the exception from the user's file on (ftune's and Python's own left out), a line each."""
    frames = traceback.extract_tb(exc.__traceback__)
    target = file.resolve()
    start = next((i for i, f in enumerate(frames) if Path(f.filename).resolve() == target), None)
    if start is None:
        return ""
    libraries = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    kept = [f for f in frames[start:] if not str(Path(f.filename).resolve()).startswith(libraries) or Path(f.filename).resolve() == target]
    return "".join(f"\n  at {f.filename} line {f.lineno}, in {f.name}" + (f": {f.line.strip()}" if f.line else "") for f in kept)


def described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _run(me: int, file: Path, work) -> tuple:
    """One piece of the user's code, as a reply. Back in a forked child of the user's: leave without one."""
    try:
        reply = ("ok", work())
    except SystemExit as exc:
        reply = ("exit", exc.code if isinstance(exc.code, (int, type(None))) else str(exc.code), user_frames(exc, file))
    except SyntaxError as exc:
        reply = ("syntax", exc.msg, exc.lineno)
    except BaseException as exc:  # KeyboardInterrupt raised by the user's code too: the parent decides about stopping
        reply = ("raised", described(exc), user_frames(exc, file))
    if os.getpid() != me:
        os._exit(0)
    return reply


def _load(me: int, file: Path, module_name: str) -> tuple:
    def load():
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {file} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling in the user's module look themselves up here
        spec.loader.exec_module(module)
        return module

    reply = _run(me, file, load)
    if reply[0] != "ok":
        return reply, None
    module = reply[1]
    # every name the module defines, however (in a try:, by import, by assignment): whether it is callable
    names = {name: callable(value) for name, value in vars(module).items() if not name.startswith("__")}
    own = [name for name, value in vars(module).items() if callable(value) and getattr(value, "__module__", None) == module_name]
    return ("ok", names, own), module


def main() -> None:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group: the parent decides
    die_with_parent()
    conn = Connection(int(sys.argv[1]))
    sys.stdout = sys.stderr  # the user's prints: never on ftune's stdout
    me = os.getpid()
    file = Path(sys.argv[2])
    reply, module = _load(me, file, sys.argv[3])
    conn.send(reply)
    if module is None:
        return
    while True:
        try:
            name, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the parent is done
        function = getattr(module, name)
        reply = _run(me, file, lambda: plain(function(*args, **kwargs)))
        try:
            conn.send(reply)
        except Exception as exc:  # a reply that cannot be sent (a huge result)
            conn.send(("raised", f"its result could not be sent back to ftune ({described(exc)})", ""))


if __name__ == "__main__":  # run as ftune.guards.usercode_worker, not __main__: the parent unpickles its Opaque by that name
    from ftune.guards.usercode_worker import main as worker_main

    worker_main()

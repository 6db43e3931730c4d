"""`ftune` (the installed command) and `python -m ftune`: the process's first ftune code.

It imports nothing heavy, so a stop signal is answered from the first instant: until the command
line has loaded (typer, rich and ftune's own modules take a few tenths of a second) Ctrl-C or
SIGTERM ends the process at once with one line and exit 130, as a stopped command does; nothing
has been written by then. From there on ftune/cli/app.py's `main` applies every command's policy.
"""

from __future__ import annotations

import os
import signal
import threading

STARTING = "error: {name}: ftune stopped while starting; nothing was written\n"


def main() -> None:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        from ftune.cli.app import main as run_command

        run_command()
        return
    previous = {sig: signal.signal(sig, _stop_while_starting) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from ftune.cli.app import main as run_command

        run_command()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_while_starting(signum, frame) -> None:
    os.write(2, STARTING.format(name=signal.Signals(signum).name).encode())
    os._exit(130)


if __name__ == "__main__":
    main()

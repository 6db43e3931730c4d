"""`python -m ftune ...` on a pseudo-terminal, for the tests of interactive commands (chat, label)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path


def _own_terminal() -> None:
    """In the child: a session whose controlling terminal is the pty, so Ctrl-C there sends SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`python -m ftune ...` on a pseudo-terminal, read until an expected text appears."""

    def __init__(self, args: list[str], cwd: Path):
        self.fd, child = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "COLUMNS": "120"}
        self.process = subprocess.Popen([sys.executable, "-m", "ftune", *args], stdin=child, stdout=child, stderr=child,
                                        env=env, cwd=cwd, close_fds=True, preexec_fn=_own_terminal)
        os.close(child)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in:\n{self.seen}")
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r", "")
                except OSError:  # the child closed the terminal
                    if self.process.poll() is not None:
                        raise AssertionError(f"no {text!r} before the process ended:\n{self.seen}") from None
        at = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:at], self.seen[at:]
        return before

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def press(self, keys: str, until: str) -> str:
        self.send(keys)
        return self.read_until(until)

    def close(self) -> tuple[int, str]:
        code = self.process.wait(timeout=120)
        rest = ""
        while select.select([self.fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            rest += chunk.decode("utf-8", "replace").replace("\r", "")
        os.close(self.fd)
        return code, self.seen + rest

"""How a training run stops early: stop signals (SIGINT, SIGTERM) wherever the command is, or divergence.

Until the run directory is written there is nothing to keep: a signal stops the command at
once, from inside data preparation or model loading (`Stopped`, exit 130). From then on a
signal only raises a flag, which the training loop reads where it can stop cleanly: between
optimizer steps, between evaluation batches, between sample answers. A second signal stops
at once wherever the process is; the loop still marks the run interrupted.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from ftune.errors import FtuneError
from ftune.recipe import Recipe
from ftune.train.progress import console

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(FtuneError):
    """Stopped before training made anything worth keeping: nothing is left behind."""

    exit_code = 130

    def __init__(self, signal_name: str | None, stage: str):
        super().__init__(f"{signal_name or 'interrupted'}: ftune {stage} stopped before its first training step; no run was written")


class Interrupted(FtuneError):
    exit_code = 130

    def __init__(self, stage: str, step: int, checkpoint: Path | None, recipe_path: Path, overrides, *, smoke: bool = False):
        sets = "".join(f" --set {o}" for o in overrides) + (" --smoke" if smoke else "")
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(f"stopped at step {step}; {saved}",
                         hint=f"resume with: ftune {stage} {recipe_path}{sets} --resume" if checkpoint else None)


class Diverged(FtuneError):
    """A loss or gradient norm that turned NaN or infinite: the run fails at that step, nothing poisoned is saved."""

    def __init__(self, step: int, what: str, checkpoint: Path | None, recipe: Recipe):
        kept = (f"the last good checkpoint stays in {checkpoint}" if checkpoint
                else "no checkpoint was saved before it (training.save_steps keeps some)")
        super().__init__(f"step {step}: the {what} is not a finite number (NaN or infinity); training stopped before "
                         f"applying this step, and the run is marked failed; {kept}",
                         hint=f"lower training.learning_rate (now {recipe.training.learning_rate:g}), keep "
                         f"training.max_grad_norm set (now {recipe.training.max_grad_norm}), or check the data, then run again")


class _StopNow(KeyboardInterrupt):
    """Raised from the handler: a KeyboardInterrupt, so no library's `except Exception` swallows it."""


class StopRequest:
    """SIGINT/SIGTERM handlers for one command; truthy once a stop was asked for.

    `defer()` switches from stopping at once to setting the flag (call it once the run
    directory is written); `agreed(ctx)` is the flag as every process of a run sees it.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.deferred = False
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def defer(self) -> None:
        self.deferred = True
        if self.signal_name is not None:  # asked for while setting up, and swallowed by a library
            raise _StopNow()

    def _handle(self, signum, frame) -> None:
        first = self.signal_name is None
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if not first or not self.deferred:
            raise _StopNow()
        console.print(f"\n[yellow]{self.signal_name}[/]: stopping at the next safe point, saving a checkpoint "
                      "(press Ctrl-C again to stop at once)")

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def agreed(self, ctx) -> bool:
        """True on every process when any of them was asked to stop (all stop at the same point)."""
        if ctx is None or ctx.world == 1:
            return bool(self)
        return ctx.sum(1 if self else 0) > 0


@contextlib.contextmanager
def ignoring_signals():
    """SIGINT/SIGTERM ignored for the few lines that record how a run ended: the command is stopping already."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

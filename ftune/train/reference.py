"""The reference model's log-probabilities (DPO, IPO, KTO), scored as training reaches each pair.

The reference is the model as training starts: the SFT model when `init_from` names an SFT
run, else the base. No second model is held. How the reference is computed mid-run:

- a fresh LoRA/DoRA adapter (default or gaussian init), VeRA or IA3 adapter adds nothing until
  trained, so the reference is the model with its adapter switched off: no memory at all;
- any other starting adapter (an SFT run's, PiSSA/OLoRA/LoftQ, which move base weights into
  it, prompt or prefix tuning's virtual tokens) is kept as a frozen copy of its starting weights and swapped in for each reference
  pass: adapter memory only;
- full fine-tuning has no adapter to switch or copy (a copy would be a second model), and
  DeepSpeed ZeRO-3 holds no whole parameters outside a forward: there the pairs the run will
  use are scored before its first step, while the model still is the reference.

Each pair is scored once, the first time the run reaches it, and kept for later epochs; the
scores so far go into every checkpoint, so a resumed run uses the very same numbers, and a
pair the run never reaches is never scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from ftune.data.pairs import PairSet
from ftune.errors import FtuneError
from ftune.modeling.adapters import starts_as_identity
from ftune.recipe import Recipe
from ftune.train.preference import sequence_logps


class ReferenceLogps:
    """Summed reference log-probs per sequence of the train and eval pairs, filled in on demand."""

    def __init__(self, scorer, sets: dict[str, PairSet], recipe: Recipe, *, scope: Callable | None, pad_id: int, device):
        """`scope` (from `start_scope`) runs the model as training started; None: score up front."""
        self.scorer, self.sets, self.scope = scorer, sets, scope
        self.args = dict(max_length=recipe.data.max_length, pad_id=pad_id, device=device)
        self.values = {name: torch.zeros(len(data.sequences), dtype=torch.float32) for name, data in sets.items()}
        self.known = {name: torch.zeros(len(data), dtype=torch.bool) for name, data in sets.items()}
        self.sealed = False

    @property
    def up_front(self) -> bool:
        return self.scope is None

    def seal(self) -> None:
        """Up front only: every pair the run needs is scored (or restored); the model moves on now."""
        self.sealed = True

    def ensure(self, name: str, pairs: Iterable[int], batch_pairs: int, stop: Callable[[], bool] | None = None) -> None:
        """Score the pairs not scored yet, `batch_pairs` at a time (the micro-batch size); stop early
        when `stop()` says so (only long up-front passes give one)."""
        missing = [p for p in pairs if not self.known[name][p]]
        if not missing:
            return
        if self.up_front and self.sealed:  # the model is no longer the reference: scoring now would be wrong
            raise FtuneError(f"the reference log-probs of {len(missing)} {name} pairs are missing from the checkpoint",
                             hint="start the run again with --overwrite")
        training = self.scorer.training  # evaluation calls this in eval mode, a training step in train mode
        self.scorer.eval()
        try:
            with torch.no_grad(), (self.scope() if self.scope is not None else contextlib.nullcontext()):
                for start in range(0, len(missing), batch_pairs):
                    if stop is not None and stop():
                        return
                    chunk = missing[start: start + batch_pairs]
                    sequences = [i for p in chunk for i in (2 * p, 2 * p + 1)]
                    logps, _ = sequence_logps(self.scorer, self.sets[name].sequences, sequences, **self.args)
                    self.values[name][sequences] = logps.float().cpu()
                    self.known[name][chunk] = True
        finally:
            self.scorer.train(training)

    def of(self, name: str, pairs: list[int]) -> torch.Tensor:
        """The reference log-probs of `pairs`, [first, second] per pair (every one scored already)."""
        return self.values[name][[i for p in pairs for i in (2 * p, 2 * p + 1)]]

    def scored(self, name: str) -> int:
        return int(self.known[name].sum())

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"{n}_logps": v for n, v in self.values.items()}, **{f"{n}_known": k for n, k in self.known.items()}}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.values:
            if f"{name}_logps" in state and state[f"{name}_logps"].shape == self.values[name].shape:
                self.values[name] = state[f"{name}_logps"].clone()
                self.known[name] = state[f"{name}_known"].clone()
        self.sealed = True


def start_scope(model, recipe: Recipe, *, continued: bool, zero3: bool = False) -> Callable[[], contextlib.AbstractContextManager] | None:
    """A context in which `model` computes as it did when training started, or None where only
    the model before its first step can (full fine-tuning; DeepSpeed ZeRO-3 with a starting adapter).
    `continued`: the adapter came from an earlier run (init_from)."""
    if recipe.adapter.method == "none":
        return None
    if not continued and starts_as_identity(recipe.adapter):  # adds nothing until trained
        return model.disable_adapter
    return None if zero3 else frozen_start(model)


def frozen_start(model) -> Callable[[], contextlib.AbstractContextManager]:
    """A context in which the trainable weights are the ones training started from."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]

    def swap() -> None:
        for param, other in zip(params, start):
            current = param.detach().clone()
            param.data.copy_(other)
            other.copy_(current)

    @contextlib.contextmanager
    def scope():
        swap()
        try:
            yield
        finally:
            swap()

    return scope

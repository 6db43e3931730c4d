"""GRPO's run-long state, one per process (`GrpoState`): the sampling RNG, the steps taken, the
flat-step warning's streak, the run card's sampled completions, and the rollout steps still train
on; what updates it after each sampling (`record_rollout`); and how it saves and loads itself.

In a checkpoint (ftune/train/checkpoints.py) its tensors go to stage-rankN.safetensors: `rng`,
and, mid-batch (grpo.iterations > 1), the rollout's `rollout.ids` (flat), `rollout.advantages`,
`rollout.keep`, `rollout.old` (flat, the completions of `old_index`) and `rollout.ref` (flat);
the rest goes to stage-rankN.json. Both are read back and checked, not trusted: anything that
does not fit is refused as a damaged checkpoint. Checkpoints of an earlier ftune, which packed
the JSON part into uint8 tensors, are not read (refused the same way, with a note).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ftune.errors import FtuneError
from ftune.recipe import GrpoSection
from ftune.stages.rl.rollout import Rollout
from ftune.train.checkpoints import DAMAGED
from ftune.train.progress import console

# Warn once this share of a step's groups got one reward for all their completions, this many steps running.
WARN_SHARE, WARN_STEPS = 0.75, 5
CARD_COMPLETIONS = 4  # sampled completions the run card shows, for the first and the last step

Card = list[tuple[str, str]]  # (prompt, its completions and their rewards) for the run card


@dataclass
class GrpoState:
    rng: torch.Generator  # the sampling RNG: its own generator, so nothing else that draws numbers can shift it
    used: int = 0  # optimizer steps taken
    flat_streak: int = 0  # steps running whose share of flat groups reached WARN_SHARE
    warned: bool = False  # the flat-step warning was printed (once a run)
    card_first: Card = field(default_factory=list)  # the first step's sampled completions
    card_last: Card = field(default_factory=list)  # ... and the latest step's
    rollout: Rollout | None = None  # the latest batch of completions

    @classmethod
    def start(cls, seed: int) -> GrpoState:
        return cls(torch.Generator().manual_seed(seed))

    def to_checkpoint(self, *, with_rollout: bool) -> dict:
        """Tensors and JSON-able values; the rollout too when steps are still to train on it."""
        saved = {"rng": self.rng.get_state(), "used": self.used, "flat_streak": self.flat_streak, "warned": self.warned,
                 "card_first": [list(c) for c in self.card_first], "card_last": [list(c) for c in self.card_last]}
        if with_rollout and self.rollout is not None:
            saved.update(_rollout_to_checkpoint(self.rollout))
        return saved

    @classmethod
    def from_checkpoint(cls, saved: dict, *, prompts: int) -> GrpoState:
        """The state `to_checkpoint` saved, checked; `prompts`: how many training prompts the run has."""
        if isinstance(saved.get("card"), torch.Tensor):
            raise _damaged("it was written by an earlier ftune, whose layout this one does not read")
        rng = torch.Generator()
        try:
            rng.set_state(_get(saved, "rng", torch.Tensor))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise _damaged(f"'rng' is no random-number state ({str(exc)[:120]})") from None
        state = cls(rng, _get(saved, "used", int), _get(saved, "flat_streak", int), _get(saved, "warned", bool),
                    _card(saved, "card_first"), _card(saved, "card_last"))
        if "rollout" in saved:
            state.rollout = _rollout_from_checkpoint(saved, prompts)
        return state


def record_rollout(state: GrpoState, rollout: Rollout, prompt: str, *, grpo: GrpoSection, is_main: bool) -> None:
    """After sampling: the run card's completions (the first prompt's group), and the flat-step warning."""
    shown = range(min(CARD_COMPLETIONS, grpo.num_generations))
    state.card_last = [(prompt, "\n>\n> ".join(
        _card_answer(rollout.texts[i], rollout.rewards[i], {k: v[i] for k, v in rollout.per_reward.items()}) for i in shown))]
    state.card_first = state.card_first or state.card_last
    share, group = rollout.figures["zero_variance_share"], grpo.num_generations
    state.flat_streak = state.flat_streak + 1 if share >= WARN_SHARE else 0
    if state.flat_streak >= WARN_STEPS and not state.warned and is_main:
        state.warned = True
        console.print(f"[yellow]warning:[/] {share:.0%} of prompt groups got the same reward for all {group} completions, "
                      f"{state.flat_streak} steps running: they carry no learning signal (advantage 0). Sample more "
                      f"(grpo.num_generations, now {group}) or more varied completions (grpo.temperature, now "
                      f"{grpo.temperature:g}), or give partial credit (a graded reward, a format reward beside the exact "
                      "one); prompts all too easy or all too hard for the model do the same", highlight=False)


def run_card(state: GrpoState, temperature: float) -> tuple[str, Card]:
    return (f"Sampled completions and their rewards (temperature {temperature:g})",
            [(f"first step: {p}", a) for p, a in state.card_first] + [(f"last step: {p}", a) for p, a in state.card_last])


def _card_answer(completion: str, total: float, per: dict) -> str:
    parts = ", ".join(f"{k} {v:g}" if v is not None else f"{k} -" for k, v in per.items())
    text = completion.strip().replace("\n", "\n> ")
    return f"**reward {total:g}** ({parts}): {text}"


def _rollout_to_checkpoint(rollout: Rollout) -> dict:
    every, old = range(len(rollout.ids)), sorted(rollout.old)
    saved = {"rollout": {"owner": rollout.owner, "lengths": [rollout.tokens(c) for c in every], "texts": rollout.texts,
                         "rewards": rollout.rewards, "per_reward": rollout.per_reward, "figures": rollout.figures,
                         "old_index": old, "ref": rollout.ref is not None},
             "rollout.ids": torch.tensor([t for c in every for t in rollout.ids[c]], dtype=torch.long),
             "rollout.advantages": rollout.advantages, "rollout.keep": rollout.keep}
    if old:
        saved["rollout.old"] = torch.cat([rollout.old[c] for c in old])
    if rollout.ref is not None:
        saved["rollout.ref"] = torch.cat([rollout.ref[c] for c in every])
    return saved


def _rollout_from_checkpoint(saved: dict, prompts: int) -> Rollout:
    data = _get(saved, "rollout", dict)
    lengths = _numbers(data, "lengths", int)
    n = len(lengths)
    owner, texts, totals = _numbers(data, "owner", int, n), _get(data, "texts", list), _numbers(data, "rewards", (int, float), n)
    per, figures, old_index = _get(data, "per_reward", dict), _get(data, "figures", dict), _numbers(data, "old_index", int)
    if len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise _damaged(f"'texts' must be {n} texts")
    for name, values in per.items():
        if not isinstance(values, list) or len(values) != n or not all(v is None or _number(v, (int, float)) for v in values):
            raise _damaged(f"'per_reward' must hold {n} numbers (or null) for each reward, not for '{name}'")
    if any(v is not None and not _number(v, (int, float)) for v in figures.values()):
        raise _damaged("'figures' must hold numbers (or null)")
    if any(c < 0 or c >= n for c in old_index) or any(length < 0 for length in lengths) or any(p < 0 or p >= prompts for p in owner):
        raise _damaged("'old_index', 'lengths' or 'owner' does not fit the rollout and its prompts")
    ids = _tensor(saved, "rollout.ids", sum(lengths), floating=False).tolist()
    adv, keep = _tensor(saved, "rollout.advantages", n), _tensor(saved, "rollout.keep", n)
    old = _tensor(saved, "rollout.old", sum(lengths[c] for c in old_index)) if old_index else None
    ref = _tensor(saved, "rollout.ref", sum(lengths)) if _get(data, "ref", bool) else None
    at, split = 0, []
    for length in lengths:
        split.append(ids[at: at + length])
        at += length
    return Rollout(owner, split, texts, totals, per, adv, keep, figures,
                   old=dict(zip(old_index, old.split([lengths[c] for c in old_index]))) if old is not None else {},
                   ref=dict(enumerate(ref.split(lengths))) if ref is not None else None)


def _damaged(what: str) -> FtuneError:
    return FtuneError(f"the checkpoint's GRPO state does not restore: {what}", hint=DAMAGED)


def _number(value, kinds) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


def _get(saved: dict, key: str, kind):
    value = saved.get(key)
    if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        wanted = {"int": "a whole number", "bool": "true or false", "dict": "an object", "list": "a list", "Tensor": "a tensor"}
        raise _damaged(f"'{key}' must be {wanted.get(kind.__name__, kind.__name__)}, "
                       f"not {'missing' if key not in saved else type(value).__name__}")
    return value


def _numbers(data: dict, key: str, kinds, count: int | None = None) -> list:
    values = _get(data, key, list)
    if not all(_number(v, kinds) for v in values) or (count is not None and len(values) != count):
        raise _damaged(f"'{key}' must be a list of {'' if count is None else f'{count} '}numbers")
    return values


def _tensor(saved: dict, key: str, length: int, *, floating: bool = True) -> torch.Tensor:
    value = _get(saved, key, torch.Tensor)
    if value.dim() != 1 or len(value) != length or value.is_floating_point() != floating:
        raise _damaged(f"'{key}' must hold {length} {'numbers' if floating else 'token ids'}, not {value.dtype} {tuple(value.shape)}")
    return value


def _card(saved: dict, key: str) -> Card:
    card = _get(saved, key, list)
    if not all(isinstance(c, list) and len(c) == 2 and all(isinstance(t, str) for t in c) for c in card):
        raise _damaged(f"'{key}' must be a list of (prompt, answers) texts")
    return [tuple(c) for c in card]

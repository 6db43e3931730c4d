"""`ftune grpo RECIPE`: online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO), the whole story on one screen.

Start: the adapter of the SFT run `grpo.init_from` names (in --smoke, that run's smoke run when
there is one), else a fresh adapter on the base. Data: prompts, rendered with the chat template
and its generation prompt; each row's other columns go to the reward functions (data/prompts.py).
A step: its prompts (batch_size x accumulation x processes) are each sampled num_generations
times, one batched, KV-cached `generate` per micro-batch (rl/generation.py); every reward
scores every completion through one guarded call (rl/rewards.py); a completion's advantage is
its reward against its group's (rl/losses.py). Passes pack whole prompt + completion
sequences; the step's loss is the variant's mean over completions (tokens for dapo). With
grpo.iterations > 1 the same completions train that many steps, against the log-probs of their
first. Evaluation: the mean reward of greedy completions to the held-out prompts.
stages/loop.py does the rest: model, optimizer, resume, the steps, checkpoints, outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ftune.guards import textio
from ftune.modeling import adapters
from ftune.train import outputs, steps, training
from ftune.data.rendering import IGNORE
from ftune.data.prompts import PromptSet, load_prompts
from ftune.train.progress import console
from ftune.recipe import Recipe
from ftune.train.reference import frozen_start
from ftune.stages.rl import losses, rewards
from ftune.stages.rl.batches import CompletionScorer, packed_row
from ftune.stages.rl.generation import Sampling, TransformersBackend
from ftune.train import loop
from ftune.train.stage import Data, Loss, Pass, Setup, Stage, Training

SMOKE_PROMPTS = 4
# Warn once this share of a step's groups got one reward for all their completions, this many steps running.
WARN_SHARE, WARN_STEPS = 0.75, 5
CARD_COMPLETIONS = 4  # sampled completions the run card shows, for the first and the last step


def run(recipe_path: Path, overrides: list[str] = (), *, smoke: bool = False, resume: bool = False, overwrite: bool = False) -> Path:
    return loop.run_stage(STAGE, recipe_path, overrides, smoke=smoke, resume=resume, overwrite=overwrite)



def load_data(recipe: Recipe, tokenizer, formatter, base_dir: Path, smoke: bool) -> Data:
    """Prompts, and (read, not run) the rewards that will score their completions."""
    train, held_out, report = load_prompts(recipe, formatter, base_dir=base_dir)
    rewards.check_rewards(recipe, base_dir, (train, held_out))
    return Data(train, held_out, report)


def micro_batches(recipe: Recipe, train: PromptSet, *, world: int, epoch: int) -> list[list[int]]:
    """An epoch's global micro-batches of prompt indices. With grpo.iterations > 1 each optimizer
    step's micro-batches come that many times in a row: the same completions train each time."""
    batches = steps.pair_micro_batches(recipe, len(train), world=world, epoch=epoch)
    repeat, per_step = recipe.grpo.iterations, recipe.training.gradient_accumulation_steps
    if repeat == 1:
        return batches
    if world > 1:  # a short micro-batch is dropped for every process alike: drop it before repeating
        batches = [b for b in batches if len(b) == recipe.training.batch_size * world]
    whole = len(batches) - len(batches) % per_step
    return [b for s in range(0, whole, per_step) for _ in range(repeat) for b in batches[s: s + per_step]]


def start(setup: Setup) -> Training:
    recipe, grpo, ctx, tokenizer = setup.recipe, setup.recipe.grpo, setup.ctx, setup.tokenizer
    train, held_out, group = setup.data.train, setup.data.eval, grpo.num_generations
    setup.ctx.accelerator.unwrap_model(setup.scorer).temperature = grpo.temperature  # log-probs of what was sampled
    scoring = rewards.load_rewards(recipe, setup.base_dir, reward_model=lambda spec, run_dir: _reward_model(spec, run_dir, setup))
    stops = outputs.generation_config(setup.model, tokenizer, setup.formatter).eos_token_id
    backend = TransformersBackend(setup.model, pad_id=tokenizer.pad_token_id, stop_ids=stops if isinstance(stops, list) else [stops],
                                  max_length=recipe.data.max_length)
    sampling = Sampling(grpo.max_completion_length, grpo.temperature, grpo.top_p)
    # The sampling RNG: its own generator, one per process, kept in every checkpoint.
    rng = torch.Generator().manual_seed(recipe.training.seed * 7919 + ctx.rank)
    reference = None
    if grpo.beta > 0:  # the model as training started: its fresh adapter switched off, or its starting weights swapped in
        fresh = not grpo.init_from and adapters.starts_as_identity(recipe.adapter)
        reference = setup.model.disable_adapter if fresh else frozen_start(setup.model)
    now: dict = {}  # this process's batch of completions, while steps train on it
    kept = {"used": 0, "high": 0, "warned": False, "start": [], "end": []}  # steps taken; flat-step streak; card

    def tokens(c: int) -> int:
        return len(now["ids"][c])

    def row(completions: list[int]) -> dict:
        return packed_row([train.ids[now["owner"][c]] for c in completions], [now["ids"][c] for c in completions], ctx.device)

    def split(completions: list[int]) -> list[list[int]]:
        sizes = [len(train.ids[now["owner"][c]]) + tokens(c) for c in completions]
        return training.split_passes(completions, sizes, setup.budget, padded=False)

    def sample(group_: list[list[int]]) -> None:
        """Sample, score and weigh this process's completions for the step(s) ahead."""
        owner = [p for micro_batch in group_ for p in micro_batch for _ in range(group)]
        made = [c for mb in group_ for c in backend.generate([train.ids[p] for p in mb], group, sampling,
                                                             seed=int(torch.randint(2**62, (1,), generator=rng)))]
        batch = rewards.Batch([train.given[p] for p in owner], [tokenizer.decode(c.ids, skip_special_tokens=True) for c in made],
                              _columns([train.columns[p] for p in owner]), [len(c.ids) for c in made], [train.places[p] for p in owner])
        totals, per = rewards.score(scoring, batch, group)
        adv, flat = losses.advantages(torch.tensor(totals), group, grpo.scale_rewards)
        keep = torch.ones(len(made))
        if grpo.mask_truncated:
            keep *= torch.tensor([0.0 if c.truncated else 1.0 for c in made])
        if grpo.drop_zero_variance:
            keep *= (~flat).repeat_interleave(group).float()
        now.clear()
        now.update(owner=owner, ids=[c.ids for c in made], adv=adv, keep=keep, old={}, ref=None,
                   figures=_figures(ctx, batch, totals, per, flat, [c.truncated for c in made], group))
        if reference is not None:
            now["ref"] = reference_logps(list(range(len(made))))
        shown = range(min(CARD_COMPLETIONS, group))  # the first prompt's group
        kept["end"] = [(train.text(owner[0]), "\n>\n> ".join(
            _card_answer(batch.completions[i], totals[i], {k: v[i] for k, v in per.items()}) for i in shown))]
        kept["start"] = kept["start"] or kept["end"]
        warn_if_flat(now["figures"]["zero_variance_share"])

    def warn_if_flat(share: float) -> None:
        kept["high"] = kept["high"] + 1 if share >= WARN_SHARE else 0
        if kept["high"] >= WARN_STEPS and not kept["warned"] and ctx.is_main:
            kept["warned"] = True
            console.print(f"[yellow]warning:[/] {share:.0%} of prompt groups got the same reward for all {group} completions, "
                          f"{kept['high']} steps running: they carry no learning signal (advantage 0). Sample more "
                          f"(grpo.num_generations, now {group}) or more varied completions (grpo.temperature, now "
                          f"{grpo.temperature:g}), or give partial credit (a graded reward, a format reward beside the exact "
                          "one); prompts all too easy or all too hard for the model do the same", highlight=False)

    @torch.no_grad()
    def reference_logps(completions: list[int]) -> dict[int, torch.Tensor]:
        out = {}
        setup.scorer.eval()
        try:
            with reference():
                for part in split(completions):
                    logps, _ = setup.scorer(**row(part))
                    out.update(zip(part, logps.float().cpu().split([tokens(c) for c in part])))
        finally:
            setup.scorer.train()
        return out

    def before_step(group_: list[list[int]]) -> None:
        if kept["used"] % grpo.iterations == 0:  # else: the next step on the same completions
            sample(group_)
        now["slices"], at = {}, 0
        for mb in group_:
            now["slices"][tuple(mb)] = list(range(at, at + len(mb) * group))
            at += len(mb) * group
        now["first"], now["iteration"] = tuple(group_[0]), kept["used"] % grpo.iterations
        kept["used"] += 1
        # dapo's mean is over the step's tokens: as a mean over its completions, each token weighs completions / tokens
        trained = [c for c in range(len(now["ids"])) if now["keep"][c] > 0]
        now["token_scale"] = ctx.sum(len(trained)) / max(ctx.sum(sum(tokens(c) for c in trained)), 1)

    def passes(micro_batch: list[int]) -> list[Pass]:
        mine = now["slices"][tuple(micro_batch)]
        trained = [c for c in mine if now["keep"][c] > 0] or mine[:1]  # a left-out micro-batch still runs backward (on 0)
        counts = [int(now["keep"][c] > 0) for c in trained]
        if tuple(micro_batch) == now["first"] and not bool(now["keep"].any()):
            counts[0] = 1  # nothing this step trains: its loss is 0 over 1, not 0 over 0
        out, at = [], 0
        for part in split(trained):
            out.append(Pass(part, sum(counts[at: at + len(part)])))
            at += len(part)
        return out

    def loss(completions: list[int]) -> Loss:
        logps, entropy = setup.scorer(**row(completions))
        lengths = [tokens(c) for c in completions]
        first = now["iteration"] == 0  # the batch's first step: the policy is still the one that sampled
        old = None if first else torch.cat([now["old"][c] for c in completions])
        ref = torch.cat([now["ref"][c] for c in completions]) if now["ref"] is not None else None
        result = losses.policy_loss(grpo.loss, logps, lengths, now["adv"][completions], now["keep"][completions], old=old, ref=ref,
                                    eps_low=grpo.epsilon_low, eps_high=grpo.epsilon_high, beta=grpo.beta,
                                    max_length=grpo.max_completion_length, token_scale=now["token_scale"])
        if first and grpo.iterations > 1:
            now["old"].update(zip(completions, logps.detach().float().cpu().split(lengths)))
        figures = {"clip_ratio": (result.clipped, result.clip_units), "entropy": (float(entropy.sum()), float(entropy.numel()))}
        if grpo.beta > 0:
            figures["kl"] = (result.kl, result.tokens)
        return Loss(result.sum, figures)

    @torch.no_grad()
    def evaluate() -> dict | None:
        """Mean reward, overall and each reward's, of greedy completions to the held-out prompts."""
        count = min(len(held_out), recipe.evaluation.max_eval_samples or len(held_out))
        totals, per_all, chunk = [], {}, recipe.training.batch_size * group
        for start_ in range(0, count, chunk):
            if setup.stop():
                return None
            part = list(range(start_, min(start_ + chunk, count)))
            made = backend.generate([held_out.ids[p] for p in part], 1, Sampling(grpo.max_completion_length, greedy=True), seed=0)
            batch = rewards.Batch([held_out.given[p] for p in part], [tokenizer.decode(c.ids, skip_special_tokens=True) for c in made],
                                  _columns([held_out.columns[p] for p in part]), [len(c.ids) for c in made],
                                  [held_out.places[p] for p in part])
            got, per = rewards.score(scoring, batch, 1)
            totals += got
            for name, values in per.items():
                per_all.setdefault(name, []).extend(v for v in values if v is not None)
        return {"eval_reward": sum(totals) / max(len(totals), 1),
                **{f"eval_reward_{k}": sum(v) / len(v) for k, v in per_all.items() if v}}

    def state() -> dict[str, torch.Tensor]:
        """The sampling RNG, the steps taken, the run card so far, and a batch of completions steps are still to train on."""
        saved = {"rng": rng.get_state(), "used": torch.tensor([kept["used"], kept["high"], int(kept["warned"])]),
                 "card": _as_bytes({"start": kept["start"], "end": kept["end"]})}
        if kept["used"] % grpo.iterations and now:
            every = range(len(now["ids"]))
            saved.update(owner=torch.tensor(now["owner"]), lengths=torch.tensor([tokens(c) for c in every]),
                         ids=torch.tensor([t for c in every for t in now["ids"][c]]), adv=now["adv"], keep=now["keep"],
                         figures=_as_bytes(now["figures"]))
            if now["old"]:
                saved.update(old_index=torch.tensor(sorted(now["old"])), old=torch.cat([now["old"][c] for c in sorted(now["old"])]))
            if now["ref"] is not None:
                saved["ref"] = torch.cat([now["ref"][c] for c in every])
        return saved

    def restore(saved: dict[str, torch.Tensor]) -> None:
        rng.set_state(saved["rng"])
        kept["used"], kept["high"], warned = (int(v) for v in saved["used"])
        kept["warned"] = bool(warned)
        card = _from_bytes(saved["card"])
        kept["start"], kept["end"] = [tuple(c) for c in card["start"]], [tuple(c) for c in card["end"]]
        if "ids" in saved:
            lengths = saved["lengths"].tolist()
            now.update(owner=saved["owner"].tolist(), ids=[i.tolist() for i in saved["ids"].split(lengths)], adv=saved["adv"],
                       keep=saved["keep"], figures=_from_bytes(saved["figures"]), old=_split_old(saved, lengths),
                       ref=dict(enumerate(saved["ref"].split(lengths))) if "ref" in saved else None)

    def card() -> tuple[str, list[tuple[str, str]]]:
        return (f"Sampled completions and their rewards (temperature {grpo.temperature:g})",
                [(f"first step: {p}", a) for p, a in kept["start"]] + [(f"last step: {p}", a) for p, a in kept["end"]])

    return Training(passes=passes, loss=loss, evaluate=evaluate, before_step=before_step, state=state, restore=restore,
                    figures=lambda: dict(now.get("figures", {})), card=card)


def _figures(ctx, batch: rewards.Batch, totals: list[float], per: dict, flat: torch.Tensor, truncated: list[bool], group: int) -> dict:
    """The step's reward and length figures over every process. A std is the mean of the groups' own
    (what the advantages see); a reward's figures skip the completions it gave None."""
    n, groups = ctx.sum(len(totals)), ctx.sum(len(flat))
    out = {"reward": ctx.sum(sum(totals)) / n, "reward_std": ctx.sum(_group_std(totals, group)[0]) / groups}
    for name, values in per.items():
        scored = [v for v in values if v is not None]
        stds, counted = _group_std(values, group)
        count, counted = ctx.sum(len(scored)), ctx.sum(counted)
        out[f"reward_{name}"] = ctx.sum(sum(scored)) / count if count else None
        out[f"reward_{name}_std"] = ctx.sum(stds) / counted if counted else None
    longest = max(batch.tokens)
    if ctx.world > 1:
        longest = int(ctx.accelerator.gather(torch.tensor([longest], device=ctx.device)).max())
    out.update(zero_variance_share=ctx.sum(float(flat.sum())) / groups, truncated_share=ctx.sum(sum(truncated)) / n,
               completion_length=ctx.sum(sum(batch.tokens)) / n, completion_length_max=longest)
    return out


def _split_old(saved: dict, lengths: list[int]) -> dict[int, torch.Tensor]:
    if "old" not in saved:
        return {}
    index = saved["old_index"].tolist()
    return dict(zip(index, saved["old"].split([lengths[c] for c in index])))


def _group_std(values: list, group: int) -> tuple[float, int]:
    """(sum of each group's std, groups with two values or more), None values left out."""
    total, counted = 0.0, 0
    for start in range(0, len(values), group):
        scored = [v for v in values[start: start + group] if v is not None]
        if len(scored) > 1:
            total += float(torch.tensor(scored, dtype=torch.float64).std())
            counted += 1
    return total, counted


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows' columns as one list per column name (None where a row lacks it): the reward functions' keywords."""
    names = dict.fromkeys(k for r in rows for k in r)
    return {name: [r.get(name) for r in rows] for name in names}


def _card_answer(completion: str, total: float, per: dict) -> str:
    parts = ", ".join(f"{k} {v:g}" if v is not None else f"{k} -" for k, v in per.items())
    text = completion.strip().replace("\n", "\n> ")
    return f"**reward {total:g}** ({parts}): {text}"


def _as_bytes(value) -> torch.Tensor:
    return torch.tensor(list(textio.dumps(value).encode()), dtype=torch.uint8)


def _from_bytes(tensor: torch.Tensor):
    return json.loads(bytes(tensor.tolist()))


def _reward_model(spec, run_dir: Path, setup: Setup):
    """A reward model trained by `ftune rm`: its score of the prompt and the completion, as a conversation."""
    from ftune.modeling import reward_model

    model = reward_model.load(run_dir, device=setup.ctx.device, trust_remote_code=setup.recipe.base_model.trust_remote_code)

    def call(batch: rewards.Batch) -> list[float]:
        conversations = [(*_as_messages(p), {"role": "assistant", "content": c}) for p, c in zip(batch.prompts, batch.completions)]
        return list(model.score(conversations))

    return call


def _as_messages(given) -> tuple[dict, ...]:
    return ({"role": "user", "content": given},) if isinstance(given, str) else tuple(given)


def show_data(data: Data, say) -> None:
    loop.show_report("prompts", data.report, [("train / eval prompts", f"{len(data.train)} / {len(data.eval)}"),
                                              ("too long", f"{data.report.truncated} cut, {data.report.dropped_too_long} dropped")], say)


def describe(recipe: Recipe) -> str:
    g, tc = recipe.grpo, recipe.training
    prompts = tc.batch_size * tc.gradient_accumulation_steps * recipe.distributed.num_processes
    # e.g. 4 prompts a step x 8 generations = 32 completions a step, of at most 128 tokens
    return (f"{g.loss} ({g.num_generations} generations a prompt: {prompts * g.num_generations} completions a step, of at "
            f"most {g.max_completion_length} tokens; temperature {g.temperature:g}" + (f", beta {g.beta:g}" if g.beta else "")
            + (f", {g.iterations} steps a batch" if g.iterations > 1 else "") + ")")


STAGE = Stage(
    name="grpo", unit="prompts", rate="completions", smoke_size=SMOKE_PROMPTS,
    data=load_data, show_data=show_data, inputs=loop.continued_inputs("grpo.init_from"),
    head=lambda data, n, m: Data(data.train.head(n), data.eval.head(m), data.report),
    micro_batches=micro_batches,
    held_out=lambda held_out: ((np.array(ids), [IGNORE] * len(ids)) for ids in held_out.ids),
    train=start,
    describe=describe,
    scorer=CompletionScorer,
)

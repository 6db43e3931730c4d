"""`ftune inspect` for grpo, dpo and rm recipes: what the run will see and need, without training.

Each stage's own functions load the data (its `load_data`: grpo's prompts and its reward checks,
dpo's and rm's pairs) and cut epochs into steps (its micro-batches, `steps.plan_steps`), so
every figure here is the one the run will have; inspection.py does the same for sft. Only the
tokenizer and the model's config are read, never the weights (nor a reward model's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ftune.commands.inspect_parts import MASKED, TRAINED, config_source, print_memory, render_sample
from ftune.data.packing import pack
from ftune.data.rendering import IGNORE, Formatter, formatter_for
from ftune.modeling import memory, models
from ftune.recipe import Recipe
from ftune.train import pair_steps, steps, training
from ftune.train.stage import Data

REWARD_DETAIL = {"exact_answer": lambda s: f"column '{s.column}'" + (f", pattern {s.pattern}" if s.pattern else
                                                                        ", answer: last <answer>...</answer>, else last number"),
                 "format": lambda s: f"regex {s.regex}", "length": lambda s: f"target {s.target} tokens",
                 "json": lambda s: "parses as JSON", "function": lambda s: s.function, "reward_model": lambda s: f"run {s.run}"}


@dataclass(frozen=True)
class StageInspection:
    """One grpo, dpo or rm recipe as its run will see it."""

    recipe: Recipe
    show_data: Callable[[Data, Callable], None]  # the stage's own data table, as the run prints it
    formatter: Formatter
    data: Data  # what the stage's own load_data returned
    plan: steps.StepPlan
    memory: memory.MemoryEstimate
    memory_cpu: memory.MemoryEstimate  # the same recipe trained on this machine's CPU (float32, no CUDA context)
    model: memory.ModelCount

    @property
    def per_step(self) -> int:
        """Prompts (grpo) or pairs in one optimizer step."""
        tc = self.recipe.training
        return tc.batch_size * tc.gradient_accumulation_steps * self.recipe.distributed.num_processes

    @property
    def epochs(self) -> float:
        return self.plan.total_steps / self.plan.steps_per_epoch

    @property
    def held_out_scored(self) -> int:
        """Held-out items each evaluation reads (evaluation.max_eval_samples caps grpo's)."""
        cap = self.recipe.evaluation.max_eval_samples if self.recipe.stage == "grpo" else None
        return min(len(self.data.eval), cap or len(self.data.eval))

    def numbers(self) -> dict:
        """The report's figures, for --json and tests."""
        r = self.data.report
        out = {"stage": self.recipe.stage, "sources": r.sources, "skipped": r.skipped, "skipped_count": r.skipped_count,
               "truncated": r.truncated, "dropped_too_long": r.dropped_too_long,
               "steps_per_epoch": self.plan.steps_per_epoch, "total_steps": self.plan.total_steps, "epochs": self.epochs,
               "memory_gib": {line.what: line.bytes / memory.GIB for line in self.memory.lines} | {"total": self.memory.total / memory.GIB},
               "trainable_parameters": self.model.trainable, "parameters": self.model.params}
        if self.recipe.stage == "grpo":
            return out | _grpo_numbers(self)
        return out | _pair_numbers(self)


def inspect_stage(recipe: Recipe, recipe_path: Path) -> StageInspection:
    from ftune.stages import dpo, grpo, rm

    stage = {"grpo": grpo, "dpo": dpo, "rm": rm}[recipe.stage]
    micro_batches = grpo.micro_batches if recipe.stage == "grpo" else pair_steps.micro_batches
    base_dir = recipe_path.parent.resolve()
    base = recipe.base_model
    section = {"grpo": "grpo", "dpo": "preference", "rm": "rm"}[recipe.stage]
    # An SFT run to continue fixes the model, and its adapter folder the tokenizer (as the run loads them).
    if getattr(recipe, section).init_from:
        inputs = training.starting_point(recipe, base_dir, False, f"{section}.init_from")
        source, tokenizer_source = inputs.model_path, str(inputs.adapter_from)
    else:
        source = tokenizer_source = config_source(base.name, base.revision, base_dir)
    config = models.model_config(source, revision=base.revision, trust_remote_code=base.trust_remote_code)
    tokenizer = models.load_tokenizer(tokenizer_source, trust_remote_code=base.trust_remote_code)
    formatter = formatter_for(tokenizer, recipe.data, base_dir=base_dir)
    data = stage.load_data(recipe, tokenizer, formatter, base_dir, False)
    world = recipe.distributed.num_processes
    batches = micro_batches(recipe, data.train, world=world, epoch=0)
    unit = "prompts" if recipe.stage == "grpo" else "pairs"
    plan = steps.plan_steps(recipe, batches, items=len(data.train), unit=unit, world=world, source=str(recipe_path))

    count = memory.count_model(config, recipe.adapter)
    if recipe.stage == "rm":  # the score head (hidden x 1, no bias) trains in full beside the adapter
        count = replace(count, trainable=count.trainable + count.hidden)
    shares = [batch[:recipe.training.batch_size] for batch in batches]

    def estimate(device: str) -> memory.MemoryEstimate:
        tokens, labelled = (_grpo_pass if recipe.stage == "grpo" else _pair_pass)(recipe, data.train, shares, device)
        found = memory.estimate(recipe, count, tokens=tokens, labelled=labelled, device=device)
        if recipe.stage != "rm":
            return found
        # A reward model reads one score per sequence, not a vocabulary's logits per labelled token.
        head = memory.Line("loss", 0.0, "one score per sequence (the head at its last token): negligible")
        return replace(found, lines=tuple(head if line.what == "loss" else line for line in found.lines))

    return StageInspection(recipe, stage.show_data, formatter, data, plan, estimate("cuda"), estimate("cpu"), count)


def _grpo_pass(recipe: Recipe, prompts, shares: list[list[int]], device: str) -> tuple[int, int]:
    """(tokens, completion tokens) of the largest pass: a micro-batch's prompts x num_generations,
    each prompt + a full-length completion, packed into passes as the grpo stage packs them."""
    grpo, most = recipe.grpo, (0, 0)
    for share in shares:
        sizes = [len(prompts.ids[p]) + grpo.max_completion_length for p in share for _ in range(grpo.num_generations)]
        at = 0
        for part in training.split_passes(list(range(len(sizes))), sizes, training.pass_budget(recipe, device), padded=False):
            most = max(most, (sum(sizes[at: at + len(part)]), len(part) * grpo.max_completion_length))
            at += len(part)
    return most


def _pair_pass(recipe: Recipe, pairs, shares: list[list[int]], device: str) -> tuple[int, int]:
    """(token slots, labelled tokens) of the largest pass: both sequences of each pair, packed into
    rows of data.max_length and padded to the longest (data/pairs.packed_rows)."""
    lengths, labels = pairs.sequences.lengths(), pairs.sequences.labels != IGNORE
    budget = None if recipe.stage == "dpo" and recipe.preference.method == "kto" else training.pass_budget(recipe, device)
    most = (0, 0)
    for share in shares:
        sizes = [int(lengths[2 * p] + lengths[2 * p + 1]) for p in share]
        for part in training.split_passes(share, sizes, budget, padded=False):
            sequences = [i for p in part for i in (2 * p, 2 * p + 1)]
            rows = pack(lengths[sequences], recipe.data.max_length)
            width = max(sum(int(lengths[sequences[j]]) for j in row) for row in rows)
            labelled = sum(_labelled(pairs.sequences, i, labels) for i in sequences)
            most = max(most, (len(rows) * width, labelled))
    return most


def _labelled(sequences, i: int, labels: np.ndarray) -> int:
    """Loss positions of sequence i (its first token is never a target)."""
    start, end = int(sequences.offsets[i]), int(sequences.offsets[i + 1])
    return int(labels[start + 1: end].sum())


# --------------------------------------------------------------------------- figures


def _grpo_numbers(ins: StageInspection) -> dict:
    recipe, prompts, tokenizer = ins.recipe, ins.data.train, ins.formatter.tokenizer
    lengths = [len(ids) for ids in prompts.ids + ins.data.eval.ids]
    return {
        "train_prompts": len(prompts), "eval_prompts": len(ins.data.eval), "held_out_scored": ins.held_out_scored,
        "prompt_tokens": {"min": min(lengths), "median": int(np.median(lengths)), "max": max(lengths)},
        "prompt_room": recipe.data.max_length - recipe.grpo.max_completion_length,
        "prompts_per_step": ins.per_step, "num_generations": recipe.grpo.num_generations,
        "completions_per_step": ins.per_step * recipe.grpo.num_generations, "steps_per_sample": recipe.grpo.iterations,
        "rewards": [{"label": s.label, "type": s.type, "weight": s.weight, "detail": REWARD_DETAIL[s.type](s)} for s in recipe.rewards],
        "prompts": [{"place": prompts.places[i], "tokens": len(prompts.ids[i]), "columns": prompts.columns[i],
                     "text": tokenizer.decode(prompts.ids[i], skip_special_tokens=False, clean_up_tokenization_spaces=False)}
                    for i in range(min(3, len(prompts)))],
    }


def _pair_numbers(ins: StageInspection) -> dict:
    pairs = ins.data.train
    lengths, labels = pairs.sequences.lengths(), pairs.sequences.labels != IGNORE
    first = []
    for p in range(min(3, len(pairs))):
        first.append({side: {"tokens": int(lengths[2 * p + k]), "trained": _labelled(pairs.sequences, 2 * p + k, labels)}
                      for k, side in enumerate(("chosen", "rejected"))})
    return {"train_pairs": len(pairs), "eval_pairs": len(ins.data.eval), "pairs_per_step": ins.per_step,
            "sequence_tokens": {"min": int(lengths.min()), "median": int(np.median(lengths)), "max": int(lengths.max())},
            "pairs": first}


# --------------------------------------------------------------------------- showing it


def print_stage(ins: StageInspection, console, *, samples: int = 2, gpu_gib: float = 24.0) -> None:
    from rich.table import Table
    from rich.text import Text

    from ftune.train.progress import summary_table

    recipe, numbers, tc = ins.recipe, ins.numbers(), ins.recipe.training
    ins.show_data(ins.data, console.print)  # the table the run itself prints first
    world = recipe.distributed.num_processes
    unit = "prompts" if recipe.stage == "grpo" else ("examples" if recipe.stage == "dpo" and recipe.preference.method == "kto" else "pairs")
    # e.g. 2 prompts x 1 accumulation x 1 process = 2 prompts per step
    per_step = (f"{tc.batch_size} {unit} (batch_size) x {tc.gradient_accumulation_steps} accumulation x {world} "
                f"process{'es' if world > 1 else ''} = {ins.per_step} {unit}")
    steps_text = (f"{ins.plan.steps_per_epoch:,} per epoch; {ins.plan.total_steps:,} in all"
                  + (f" (max_steps) = {ins.epochs:.2f} epochs" if tc.max_steps else f" ({tc.epochs:g} epochs)"))
    if recipe.stage == "grpo":
        g = recipe.grpo
        rows = [("prompt tokens", f"min {numbers['prompt_tokens']['min']}, median {numbers['prompt_tokens']['median']}, max "
                                  f"{numbers['prompt_tokens']['max']} (room {numbers['prompt_room']}: data.max_length "
                                  f"{recipe.data.max_length} - grpo.max_completion_length {g.max_completion_length})"),
                ("sampling", f"{g.num_generations} generations a prompt, at most {g.max_completion_length} tokens, temperature "
                             f"{g.temperature:g}, top_p {g.top_p:g}" + ("; truncated ones masked" if g.mask_truncated else "")),
                ("loss", f"{g.loss}, advantages scaled by {g.scale_rewards} std" + (f", beta {g.beta:g}" if g.beta else ", no KL")),
                ("per step", f"{per_step} x {g.num_generations} generations = {numbers['completions_per_step']:,} completions"
                             + (f"; each batch trains {g.iterations} steps" if g.iterations > 1 else "")),
                ("steps", steps_text),
                ("held-out prompts", f"{ins.held_out_scored} of {len(ins.data.eval)}, greedy completions scored "
                                     + (f"at step 0, every {tc.eval_steps} steps and " if tc.eval_steps else "") + "at the end")]
    else:
        seq = numbers["sequence_tokens"]
        what = (f"{recipe.preference.method} (beta {recipe.preference.beta:g})" if recipe.stage == "dpo"
                else "reward model: Bradley-Terry on the score at each sequence's last token")
        rows = [("objective", what), ("sequence tokens", f"min {seq['min']}, median {seq['median']}, max {seq['max']}"),
                ("per step", per_step), ("steps", steps_text)]
    count = ins.model
    rows.append(("trainable parameters", f"{count.trainable:,} ({recipe.adapter.method}"
                 + (" + score head" if recipe.stage == "rm" else "") + f"; {100 * count.trainable / max(count.params, 1):.3f}% "
                 f"of the base model's {count.params:,})"))
    console.print(summary_table(f"what {recipe.stage} will see", rows))
    if recipe.stage == "grpo":
        table = Table(title="rewards (checked as the run checks them; the total is their weighted sum)")
        for column in ("#", "name", "type", "weight", "what"):
            table.add_column(column, justify="right" if column in ("#", "weight") else "left")
        for i, r in enumerate(numbers["rewards"]):
            table.add_row(str(i), Text(r["label"]), r["type"], f"{r['weight']:g}", Text(r["detail"]))  # a regex's [ is no markup
        console.print(table)

    print_memory(ins.memory, console, gpu_gib=gpu_gib)
    console.print(f"  on a CPU (float32, no CUDA context): {memory.gib(ins.memory_cpu.total)}", highlight=False)
    if not samples:
        return
    tokenizer = ins.formatter.tokenizer
    if recipe.stage == "grpo":
        console.print("\n[bold]prompts[/] as the policy sees them (chat template with its generation prompt; "
                      "[reverse]special tokens[/], ↵ newlines); completions start where each ends", highlight=False)
        prompts = ins.data.train
        for i in range(min(samples, len(prompts))):
            console.rule(f"prompt {i} ({prompts.places[i]}): {len(prompts.ids[i])} tokens")
            console.print(render_sample(prompts.ids[i], [IGNORE] * len(prompts.ids[i]), tokenizer))
            columns = ", ".join(f"{k}={v!r}" for k, v in prompts.columns[i].items()) or "none"
            console.print(f"  columns passed to the reward functions: {columns}", highlight=False, markup=False)
        return
    console.print(f"\n[bold]pairs[/]: [{TRAINED}]trained (carries loss)[/], [{MASKED}]masked[/], [reverse]special tokens[/], "
                  "↵ newlines" + ("; the reward is read at each sequence's last token" if recipe.stage == "rm" else ""),
                  highlight=False)
    pairs = ins.data.train
    kto = recipe.stage == "dpo" and pairs.kto_labels is not None
    for p in range(min(samples, len(pairs))):
        for k, side in enumerate(("example", "mismatched answer (KL estimate)") if kto else ("chosen", "rejected")):
            ids, labels = pairs.sequences.sample(2 * p + k)
            extra = f", {'desirable' if pairs.kto_labels[p] else 'undesirable'}" if kto and k == 0 else ""
            console.rule(f"pair {p} {side}{extra}: {len(ids)} tokens, {int((labels[1:] != IGNORE).sum())} trained")
            console.print(render_sample(ids, labels, tokenizer))


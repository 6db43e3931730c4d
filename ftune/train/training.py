"""What every training stage builds and computes: where the model starts, the model with its
adapter, optimizer, schedule, token log-probs, the SFT loss and held-out loss, and how a
micro-batch is split into forward/backward passes. Checkpoints are in checkpoints.py, the loop in loop.py.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ftune.data.packing import Encoded, collate, micro_batches
from ftune.data.rendering import IGNORE
from ftune.errors import FtuneError
from ftune.modeling import adapters, attention, models
from ftune.recipe import AdapterSection, Recipe, TrainingSection
from ftune.train import continuing
from ftune.train.progress import console
from ftune.train.stage import Inputs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(recipe: Recipe, model_path: str, dtype, *, adapter_from: Path | None = None):
    """The base model with its adapter attached (or fully trainable when adapter.method is none)."""
    base = recipe.base_model
    model = models.load_model(
        model_path, dtype=dtype, quantization=recipe.quantization,
        trust_remote_code=base.trust_remote_code, attn_implementation=base.attn_implementation,
    )
    model.config.use_cache = False
    if base.attn_implementation == "auto" and (recipe.stage == "dpo" or recipe.data.packing):
        attention.enable(model, recipe.data.max_length)  # packed rows: attention sample by sample
    model = memory_savers(model, recipe)
    if recipe.adapter.method == "none":
        return model
    if adapter_from is not None:
        return adapters.load(model, adapter_from, is_trainable=True)
    return adapters.attach(model, recipe.adapter, model_path)


def starting_point(recipe: Recipe, base_dir: Path, smoke: bool, continues: str | None = None) -> Inputs:
    """Where training starts: the SFT run that the recipe key `continues` ("rm.init_from") names, which
    fixes the base model and the starting adapter; without one, the recipe's base with a fresh adapter."""
    init_from = getattr(getattr(recipe, continues.split(".")[0]), continues.split(".")[1]) if continues else None
    if not init_from:
        path = models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
        return Inputs(path, None, recipe.base_model.name)
    run_dir, adapter, model_path = continuing.init_from_run(init_from, recipe, base_dir, smoke=smoke, key=continues)
    return Inputs(model_path, adapter, f"the SFT run {run_dir}")


def memory_savers(model, recipe: Recipe):
    """A 4-bit base made trainable (peft's k-bit preparation), or gradient checkpointing on, as the recipe asks."""
    from peft import prepare_model_for_kbit_training

    if recipe.quantization.load_in_4bit:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.training.gradient_checkpointing)
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def make_optimizer(training: TrainingSection, model, adapter: AdapterSection | None = None):
    groups = adapters.param_groups(model, training, adapter)  # weight decay on matrices; LoRA+'s learning rates
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    import bitsandbytes as bnb

    if training.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        console.print("[yellow]warning:[/] paged_adamw_8bit pages optimizer state through GPU memory; on CPU it runs as unpaged adamw_8bit")
        return bnb.optim.AdamW8bit(groups, lr=training.learning_rate)
    cls = bnb.optim.PagedAdamW8bit if training.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=training.learning_rate)


def make_scheduler(training: TrainingSection, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = int(math.ceil(total_steps * training.warmup_ratio))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[training.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def causal_lm_parts(model):
    """(decoder, output head, logit soft-cap) of a causal LM, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, inner.base_model_prefix, None)
    head = inner.get_output_embeddings()
    if decoder is None or head is None:
        raise FtuneError(f"{type(inner).__name__} is not a decoder-only causal LM that ftune can train")
    return decoder, head, getattr(inner.config, "final_logit_softcapping", None)


class TokenLogProbs(torch.nn.Module):
    """Log-probability of every target token, with logits computed only where a target is.

    Calling the decoder and the head separately skips the output projection on prompt and
    padding positions: on SmolLM2 (49k vocabulary, 576 hidden) that head is a third of the
    forward FLOPs. This module is also what DDP and FSDP wrap, so every forward and
    backward goes through them.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, targets, attention_mask=None):
        decoder, head, softcap = causal_lm_parts(self.model)
        if adapters.uses_virtual_tokens(self.model):  # prompt/prefix tuning: virtual tokens before each sample
            hidden, targets = adapters.virtual_token_hidden(self.model, decoder, input_ids, position_ids, targets, attention_mask)
        else:
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = targets != IGNORE
        logits = head(hidden[keep]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return -F.cross_entropy(logits, targets[keep], reduction="none")


def sft_loss_sum(scorer, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count."""
    token_logps = scorer(**batch)
    return -token_logps.sum(), token_logps.numel()


@torch.no_grad()
def sft_eval(scorer, eval_set: Encoded, *, recipe: Recipe, pad_id: int, device, stop=None) -> dict | None:
    """Held-out loss (mean over answer tokens) and perplexity; None when `stop()` asked to stop part-way.

    Every process evaluates the whole (small) eval set, so all of them run the same
    forwards, as FSDP requires, and agree on the result without communicating.
    """
    scorer.eval()
    total, count = 0.0, 0
    limit = recipe.evaluation.max_eval_samples
    data = eval_set.head(limit) if limit else eval_set
    try:
        for rows in micro_batches(data, max_length=recipe.data.max_length, batch_size=recipe.training.batch_size,
                                  packed=recipe.data.packing, seed=0, epoch=0):
            if stop is not None and stop():
                return None
            loss_sum, n = sft_loss_sum(scorer, move(collate(data, rows, pad_id, packed=recipe.data.packing), device))
            total += float(loss_sum)
            count += n
    finally:
        scorer.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def first_nonfinite(model) -> str | None:
    """The first trainable parameter holding NaN or infinity, if any: such a state is never saved."""
    for name, param in model.named_parameters():
        if param.requires_grad and param.numel() and not bool(torch.isfinite(param).all()):
            return name
    return None


def pass_budget(recipe: Recipe, device) -> int | None:
    """Most tokens per forward/backward pass (None: a whole micro-batch in one pass).

    On a CPU the default is one row of max_length tokens. Measured on the demo model with
    scripts/bench.py (alpaca rows packed to 512 tokens, 8 rows a step, 2 cores): 8 rows in one
    pass peaked at 15 GiB resident; one row per pass at 3.1 GiB, and the step got faster, not
    slower. glibc keeps the large blocks a pass frees in its heap, where they fragment, so the
    resident size grows far past the live tensors, and the matmuls already run near the CPU's
    peak on 512 tokens, so larger passes gain no arithmetic speed.
    """
    if recipe.training.tokens_per_pass is not None:
        return recipe.training.tokens_per_pass
    if recipe.distributed.backend == "deepspeed":  # it counts backward passes against its own accumulation
        return None
    return recipe.data.max_length if torch.device(device).type == "cpu" else None


def split_passes(items: list, sizes: list[int], budget: int | None, *, padded: bool = True) -> list[list]:
    """`items` in order, in groups of at most `budget` tokens, each holding at least one item.

    A group's size is its count x its largest item when it is padded to its longest (SFT
    rows), the sum of its items' sizes when they are packed (preference pairs).
    """
    if budget is None:
        return [items] if items else []
    groups: list[list] = []
    current: list = []
    widest = total = 0
    for item, size in zip(items, sizes):
        grown = (len(current) + 1) * max(widest, size) if padded else total + size
        if current and grown > budget:
            groups.append(current)
            current, widest, total = [], 0, 0
        current.append(item)
        widest, total = max(widest, size), total + size
    if current:
        groups.append(current)
    return groups


def move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

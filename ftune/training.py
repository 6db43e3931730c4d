"""Steps the SFT and DPO stages share: model setup, optimizer, schedule, loss, checkpoints.

Checkpoints hold only safetensors and JSON (no pickle): trainable weights, optimizer state
flattened to tensors, scheduler and data position as JSON, and every RNG state, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ftune import attention, models
from ftune.data.chat import IGNORE
from ftune.errors import FtuneError
from ftune.progress import console
from ftune.runs import CHECKPOINTS_DIR, atomic_dir, atomic_file


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(recipe, model_path: str, dtype, *, adapter_from: Path | None = None):
    """The base model with its adapter attached (or fully trainable when adapter.method is none)."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    base = recipe.base_model
    model = models.load_model(
        model_path, dtype=dtype, quantization=recipe.quantization,
        trust_remote_code=base.trust_remote_code, attn_implementation=base.attn_implementation,
    )
    model.config.use_cache = False
    if base.attn_implementation == "auto" and (recipe.stage == "dpo" or recipe.data.packing):
        attention.enable(model, recipe.data.max_length)  # packed rows: attention sample by sample
    if recipe.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.training.gradient_checkpointing)
    elif recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.adapter.method == "none":
        return model
    if adapter_from is not None:
        return PeftModel.from_pretrained(model, adapter_from, is_trainable=True)
    try:
        return get_peft_model(model, models.lora_config(recipe.adapter))
    except ValueError as exc:
        raise FtuneError(f"adapter.target_modules: {exc}") from None


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def make_optimizer(training, model):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    import bitsandbytes as bnb

    if training.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        console.print("[yellow]warning:[/] paged_adamw_8bit pages optimizer state through GPU memory; on CPU it runs as unpaged adamw_8bit")
        return bnb.optim.AdamW8bit(groups, lr=training.learning_rate)
    cls = bnb.optim.PagedAdamW8bit if training.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=training.learning_rate)


def make_scheduler(training, optimizer, total_steps: int):
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


def pass_budget(recipe, device) -> int | None:
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


# --------------------------------------------------------------------------- checkpoints


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, position: dict, keep: int, ctx=None) -> Path:
    """The main process writes the checkpoint; every other process adds its own RNG state to it."""
    from safetensors.torch import save

    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    if ctx is not None and ctx.world > 1:
        ctx.barrier()
        if ctx.is_main:
            _write_checkpoint(final, step, model, optimizer, scheduler, position)
        ctx.barrier()
        if not ctx.is_main:
            with atomic_file(final / f"rng-rank{ctx.rank}.safetensors", "wb") as handle:
                handle.write(save({"torch": torch.get_rng_state()}))
        ctx.barrier()
    else:
        _write_checkpoint(final, step, model, optimizer, scheduler, position)
    if ctx is None or ctx.is_main:
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(final: Path, step: int, model, optimizer, scheduler, position: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(final, overwrite=True) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        np_state = np.random.get_state()
        state = {
            "step": step,
            "position": position,
            "optimizer_layout": layout,
            "scheduler": scheduler.state_dict(),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / CHECKPOINTS_DIR).glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNGs; return the saved state (step, position)."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise FtuneError(f"checkpoint {path} does not fit this model (e.g. {missing[0]})", hint="resume with the recipe that made it")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer_layout"]))
    scheduler.load_state_dict(state["scheduler"])
    own = path / f"rng-rank{rank}.safetensors"
    rng = load_file(own if rank and own.is_file() else path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    random.setstate(_tupled(state["python_random"]))
    kind, keys, *rest = state["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in layout["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and exits.

    A second Ctrl-C stops at once, as users expect.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        console.print(f"\n[yellow]{self.signal_name}[/]: saving a checkpoint after this step (press Ctrl-C again to stop at once)")

    def __bool__(self) -> bool:
        return self.signal_name is not None

"""How much accelerator memory a recipe needs, from the model's config alone (no weights).

The model is built on the meta device (shapes, no storage) to count its parameters, the
ones bitsandbytes would quantize, and the adapter peft would add. Memory is then:

    weights + adapter + gradients + optimizer states + activations + loss

Activations are counted tensor by tensor as autograd keeps them for the backward pass of a
Llama-style decoder layer (Llama, Qwen2, Mistral, Gemma: RMSNorm, SDPA attention, gated
MLP) under transformers and peft; other architectures get the same formula as an
approximation. Per-token activation bytes were checked tensor by tensor (saved-tensor
hooks) for LoRA, DoRA, full fine-tuning, QLoRA, float32 and bfloat16, and gradient
checkpointing on SmolLM2-135M, within 1%; VeRA's and IA3's terms, and prompt and prefix tuning
(virtual tokens, attention with a mask), on a tiny Llama within 3%. tests/test_inspect.py checks the whole estimate
against the peak RSS growth of two real `ftune sft` steps of the demo model on CPU and
requires it within 15% (measured: 1.01 GiB estimated, 1.02 GiB used). On a GPU the
caching allocator typically reserves 5-15% more than the tensors need.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftune.recipe import Recipe


GIB = 2**30
BNB_BLOCK, BNB_BLOCK2 = 64, 256  # bitsandbytes 4-bit block sizes (weights; constants when double-quantized)
CUDA_CONTEXT = 0.5 * GIB  # CUDA context, cuBLAS workspace and kernels: about this on current GPUs and drivers
# On CPU, what stays resident after a training step beyond weights and optimizer: allocator
# caches of small blocks, oneDNN and autograd buffers (0.10 GiB measured on the demo model).
CPU_RUNTIME = 0.1 * GIB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Adapted linears that read the same input tensor (after the same norm).
SHARED_INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}


@dataclass(frozen=True)
class Line:
    what: str
    bytes: float
    formula: str


@dataclass(frozen=True)
class ModelCount:
    """What the estimate needs to know about a model, read from its config."""

    params: int
    quantizable: int  # parameters in the linear layers bitsandbytes would store in 4 bits
    trainable: int  # adapter parameters (all parameters for full fine-tuning)
    layers: int
    hidden: int
    kv_dim: int
    heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    # per adapted linear of one layer: (name, in_features, out_features, kind); kind is lora,
    # vera, ia3 (its output scaled) or ia3_ff (its input scaled)
    adapted: tuple[tuple[str, int, int, str], ...]
    virtual_tokens: int = 0  # prompt or prefix tuning: tokens put before every sample
    q_dim: int = 0  # query heads x head size (0: hidden size)


@dataclass(frozen=True)
class MemoryEstimate:
    lines: tuple[Line, ...]
    checkpointing: bool  # whether the recipe uses gradient checkpointing (the activations line follows it)
    other_activations: Line  # the activations line for the other setting
    device: str

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)

    @property
    def total_other(self) -> float:
        return self.total - self._activations().bytes + self.other_activations.bytes

    def _activations(self) -> Line:
        return next(line for line in self.lines if line.what.startswith("activations"))


def count_model(config, adapter) -> ModelCount:
    """Parameters and layer shapes of the model `config` describes, with `adapter` (an AdapterSection) on it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices from peft and transformers, not the user's concern
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    skipped = set(get_keys_to_not_convert(model))
    quantizable = sum(
        m.weight.numel() for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name not in skipped and name.split(".")[-1] not in skipped
    )
    layer_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"\.0\.", n)]
    gated = any(n.endswith(("gate_proj", "gate_up_proj", "w1", "w3")) for n in layer_names)
    if adapter.method == "none":
        trainable, adapted = params, ()
    else:
        from peft import get_peft_model

        from ftune.modeling.adapters import peft_config

        # peft builds the adapter on the meta device too; its initialisation does not matter for
        # counting (and text initialisation would need the tokenizer).
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, peft_config(adapter.model_copy(update={"init": "default", "init_text": None})))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        adapted = tuple(
            (name.split(".")[-1], m.in_features, m.out_features, _adapter_kind(m))
            for name, m in peft_model.named_modules()
            if _adapter_kind(m) and hasattr(m, "in_features") and re.search(r"\.0\.", name)
        )
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelCount(
        params=params, quantizable=quantizable, trainable=trainable,
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, heads=heads,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=text.vocab_size, gated_mlp=gated, adapted=adapted,
        virtual_tokens=adapter.num_virtual_tokens if adapter.method in ("prompt_tuning", "prefix_tuning") else 0,
        q_dim=heads * head_dim,
    )


def _adapter_kind(module) -> str | None:
    """What a peft layer adds to the activations autograd keeps (None: not an adapted layer)."""
    if hasattr(module, "lora_A"):
        return "lora"
    if hasattr(module, "vera_lambda_d"):
        return "vera"
    if hasattr(module, "ia3_l"):
        return "ia3_ff" if module.is_feedforward else "ia3"
    return None


def estimate(recipe: Recipe, count: ModelCount, *, tokens: int, labelled: int, device: str = "cuda") -> MemoryEstimate:
    """Peak memory of one training step of `recipe`; `tokens` and `labelled` are per micro-batch.

    device "cuda": dtype auto means bfloat16 and the CUDA context is added; "cpu": float32, no context.
    """
    lora = recipe.adapter.method != "none"
    qlora = recipe.quantization.load_in_4bit
    name = recipe.base_model.dtype if recipe.base_model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    w = DTYPE_BYTES[name]
    lines = [_weights(count, w, name, recipe.quantization)]

    trainable = count.trainable
    t = 4 if lora else w  # peft keeps adapter weights in float32 whatever the base dtype
    t_name = "float32" if lora else name
    if lora:
        lines.append(Line("adapter", trainable * 4, f"{_n(trainable)} parameters x 4 B (float32)"))
    lines.append(Line("gradients", trainable * t, f"{_n(trainable)} x {t} B ({t_name})"))
    if recipe.training.optimizer == "adamw":
        lines.append(Line("optimizer", trainable * 2 * t, f"{_n(trainable)} x 2 moments x {t} B (AdamW, {t_name})"))
    else:
        lines.append(Line("optimizer", trainable * 2, f"{_n(trainable)} x 2 moments x 1 B (8-bit AdamW)"))
    lines = _sharded(lines, getattr(recipe, "distributed", None))

    # QLoRA: peft's prepare_model_for_kbit_training upcasts the embeddings to float32, so the
    # residual stream, and every activation after it, is float32.
    b = 4 if qlora else w
    per_layer, terms = _per_token_layer(count, recipe.adapter, b, lora)
    tokens, virtual, note = _with_virtual_tokens(recipe, count, tokens, b)
    full = tokens * (count.layers * per_layer + 4 * (count.hidden + 1)) + virtual
    full_line = Line(
        "activations",
        full,
        f"{count.layers} layers x {tokens:,} tokens x {per_layer:,.0f} B per token and layer  [{terms}]{note}",
    )
    ckpt = tokens * (count.layers * count.hidden * b + per_layer) + virtual / count.layers
    ckpt_line = Line(
        "activations (gradient checkpointing)",
        ckpt,
        f"{count.layers} layers x {tokens:,} tokens x {count.hidden} hidden x {b} B (layer inputs) "
        f"+ one layer recomputed ({tokens:,} x {per_layer:,.0f} B)",
    )
    checkpointing = recipe.training.gradient_checkpointing
    lines.append(ckpt_line if checkpointing else full_line)
    # The loss computes logits only where a label is: float32 log-softmax kept for backward,
    # then its gradient and the logits' gradient while backward runs.
    lines.append(Line("loss", labelled * count.vocab * 4 * 3,
                      f"{labelled:,} labelled tokens x {count.vocab:,} vocabulary x 4 B x 3 (log-softmax, its gradient, logits' gradient)"))
    if getattr(recipe, "grpo", None) is not None:
        lines.append(_generation(recipe, count, w, lines[-2].bytes + lines[-1].bytes))
    if device == "cuda":
        lines.append(Line("CUDA context", CUDA_CONTEXT, "CUDA context, cuBLAS workspace and kernels (typical)"))
    else:
        lines.append(Line("runtime", CPU_RUNTIME, "allocator caches, oneDNN and autograd buffers (measured)"))
    return MemoryEstimate(tuple(lines), checkpointing, full_line if checkpointing else ckpt_line, device)


def _generation(recipe: Recipe, count: ModelCount, w: int, training_peak: float) -> Line:
    """GRPO samples a whole group with a KV cache before each step's forward and backward, so only
    what the cache and the sampling logits need beyond the training activations adds to the peak."""
    grpo = recipe.grpo
    sequences = recipe.training.batch_size * grpo.num_generations
    context = recipe.data.max_length  # prompt + completion
    cache = count.layers * 2 * count.kv_dim * context * sequences * w
    logits = sequences * count.vocab * 4
    extra = max(0.0, cache + logits - training_peak)
    return Line("generation (beyond activations)", extra,
                f"KV cache {count.layers} layers x 2 x {count.kv_dim} x {context:,} tokens x {sequences} sequences x {w} B "
                f"+ logits {sequences} x {count.vocab:,} x 4 B, less the {gib(training_peak)} of activations it replaces")


def _with_virtual_tokens(recipe: Recipe, count: ModelCount, tokens: int, b: int) -> tuple[int, float, str]:
    """(tokens the layers run on, bytes beyond their per-token terms, a note for the formula).

    Packing is off for these methods: every row holds one sample, with the virtual tokens in
    front (prompt tuning runs them through every layer like real tokens; prefix tuning has only
    their keys and values, in each layer's cache). Rows are padded, or the keys outnumber the
    queries, so attention runs with a mask: transformers' SDPA then copies the key and value
    heads up to the query heads over every key position, and keeps the mask, in each layer.
    """
    n = count.virtual_tokens
    if not n:
        return tokens, 0.0, ""
    length = recipe.data.max_length
    rows = -(-tokens // length)
    queries = length + n if recipe.adapter.method == "prompt_tuning" else length
    keys = length + n
    q_dim = count.q_dim or count.hidden
    # per row and layer: k and v at every query head over the keys, in place of the kv heads counted per token, and the mask
    extra = rows * count.layers * (2 * q_dim * keys * b - 2 * count.kv_dim * queries * b + queries * keys * b)
    return (rows * queries, extra, f" + {rows} rows x {count.layers} layers x (k, v at {q_dim} x {keys} keys; mask "
            f"{queries} x {keys}) x {b} B, with {n} virtual tokens per row")


def _sharded(lines: list[Line], dist) -> list[Line]:
    """Per device: FSDP and ZeRO split some of the state across processes, or offload it to CPU memory."""
    if dist is None or dist.num_processes == 1 or dist.backend == "ddp":
        return lines
    world = dist.num_processes
    states = {"gradients", "optimizer"}
    if dist.backend == "fsdp":
        split = states if dist.fsdp_sharding == "shard_grad_op" else states | {"weights", "weights (4-bit)", "adapter"}
        offloaded = split if dist.fsdp_cpu_offload else set()
        how = f"fsdp {dist.fsdp_sharding}"
    else:
        split = states if dist.zero_stage == 2 else states | {"weights", "weights (4-bit)", "adapter"}
        offloaded = ({"optimizer"} | (split - states if dist.zero_stage == 3 else set())) if dist.zero_offload else set()
        how = f"ZeRO-{dist.zero_stage}"
    out = []
    for line in lines:
        if line.what in offloaded:
            out.append(Line(line.what, 0.0, f"offloaded to CPU memory ({how}); was {line.formula}"))
        elif line.what in split:
            out.append(Line(line.what, line.bytes / world, f"({line.formula}) / {world} processes ({how})"))
        else:
            out.append(line)
    return out


def _weights(count: ModelCount, w: int, name: str, quantization) -> Line:
    if not quantization.load_in_4bit:
        return Line("weights", count.params * w, f"{_n(count.params)} parameters x {w} B ({name})")
    rest = count.params - count.quantizable
    # NF4/FP4: half a byte per weight, plus one absmax per block of 64 weights: a float32
    # (4/64 B per weight), or with double quantization one byte, itself scaled by a float32
    # per 256 blocks (1/64 + 4/16384 B per weight).
    if quantization.double_quant:
        constants, how = 1 / BNB_BLOCK + 4 / (BNB_BLOCK * BNB_BLOCK2), "1/64 + 4/16384 B constants, double quant"
    else:
        constants, how = 4 / BNB_BLOCK, "4/64 B constants"
    return Line(
        "weights (4-bit)",
        count.quantizable * (0.5 + constants) + rest * 4,
        f"{_n(count.quantizable)} in linear layers x (0.5 B + {how}) + {_n(rest)} others x 4 B (float32 for k-bit training)",
    )


def _per_token_layer(count: ModelCount, adapter, b: int, lora: bool) -> tuple[float, str]:
    """Bytes autograd keeps per token in one decoder layer, and the terms that make them up."""
    h, kv, heads, inter = count.hidden, count.kv_dim, count.heads, count.intermediate
    norms = 2 * (h + 1) * 4  # RMSNorm upcasts: its float32 input and 1/rms, before attention and MLP
    attention = (2 * h + 2 * kv) * b + heads * 4  # SDPA keeps q, k, v, its output, and a float32 log-sum-exp
    mlp = (3 if count.gated_mlp else 1) * inter * b  # gate, act(gate), up (ungated: the activation's input)
    terms = [f"norms {norms:,}", f"attention {attention:,}", f"mlp {mlp:,}"]
    if not lora:
        # Every linear trains: its input is kept (shared where one tensor feeds several), and the
        # norms' weights train, so their normalized inputs are kept too.
        # After each norm: its normalized input and its output (shared by the linears it feeds);
        # the MLP product; o_proj reads SDPA's output, kept already.
        inputs = (4 * h + inter) * b
        terms.append(f"linear inputs {inputs:,}")
        return norms + attention + mlp + inputs, " + ".join(terms)
    if adapter.method in ("vera", "ia3"):
        extra, more = _scaling_terms(count, adapter)
        return norms + attention + mlp + extra, " + ".join(terms + more)
    inputs = 0.0
    seen: set[str] = set()
    for name, fan_in, _out, _kind in count.adapted:
        if adapter.dropout > 0:
            inputs += fan_in * (4 + 1)  # each adapter's own dropped-out float32 input and its mask
        elif b == 4:
            group = SHARED_INPUTS.get(name, name)
            if group not in seen and name != "o_proj":  # o_proj reads SDPA's output, kept already
                inputs += fan_in * 4
            seen.add(group)
        else:
            inputs += fan_in * 4  # peft casts the input to the float32 adapter: one copy per adapted linear
    rank = len(count.adapted) * adapter.r * 4  # each lora_A's output, kept for lora_B's gradient
    if count.adapted:  # prompt and prefix tuning adapt no layer: only what the frozen layers keep to pass gradients back
        terms += [f"adapter inputs {inputs:,.0f}", f"lora_A outputs {rank:,}"]
    extra = 0
    if adapter.method == "dora":
        extra = 2 * sum(out for _n, _in, out, _kind in count.adapted) * 4  # base and LoRA outputs, rescaled by the magnitude
        terms.append(f"DoRA outputs {extra:,}")
    return norms + attention + mlp + inputs + rank + extra, " + ".join(terms)


def _scaling_terms(count: ModelCount, adapter) -> tuple[float, list[str]]:
    """What VeRA and IA3 layers keep per token for their vectors' gradients (peft's forward, float32).

    The frozen matrices need no input kept: a gradient passes back through them with the weight alone.
    IA3 keeps the float32 tensor its vector multiplies (a feed-forward layer's input, another's
    output); VeRA keeps A's output for λ_d and B's output for λ_b, with dropout its mask.
    """
    if adapter.method == "ia3":
        kept = sum((fan_in if kind == "ia3_ff" else out) * 4 for _n, fan_in, out, kind in count.adapted)
        return kept, [f"IA3 scaled tensors {kept:,}"]
    # dropout's mask: measured float32 on CPU (a GPU keeps one byte), counted at the larger
    kept = sum((adapter.r + out) * 4 + (fan_in * 4 if adapter.dropout > 0 else 0) for _n, fan_in, out, _k in count.adapted)
    return kept, [f"VeRA scaled tensors {kept:,}"]


def _n(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value:,.0f}"


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"

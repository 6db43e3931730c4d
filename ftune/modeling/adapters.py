"""The parameter-efficient methods, through peft: one peft config per `adapter.method`, LoRA+'s
optimizer groups, the forward pass of the virtual-token methods, and which adapters merge.

- lora, dora, lora_plus: LoRA (DoRA: with a learned magnitude per output). lora_plus is a
  plain LoRA adapter trained with the B factors at `lora_plus_ratio` times the learning rate
  (Hayou et al. 2024); only the optimizer differs, so it saves, loads and merges as LoRA.
- vera: one pair of frozen random matrices shared by every adapted layer, and two trained
  scaling vectors per layer (Kopiczko et al. 2023): ΔW = diag(λ_b) B diag(λ_d) A.
- ia3: a trained vector scaling each adapted layer's output, or for the feed-forward down
  projections its input (Liu et al. 2022): W' = l ⊙ W, row- or column-wise.
- prompt_tuning: `num_virtual_tokens` learned input embeddings put before every sample
  (Lester et al. 2021); prefix_tuning: learned keys and values at every layer (Li & Liang
  2021). Neither changes a weight, so neither can be merged (see `unmergeable`).

peft imports are inside the functions: `ftune.modeling.memory` and the merge refusal use this module
without loading a model.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from ftune.errors import FtuneError

if TYPE_CHECKING:
    import torch

    from ftune.recipe import AdapterSection, TrainingSection

LORA_METHODS = ("lora", "dora", "lora_plus")
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning")
LORA_PLUS_EMBEDDING_LR = 1e-6  # peft's create_loraplus_optimizer default for adapters on embedding layers
# peft_type (adapter_config.json) -> the recipe's name for it, for messages.
PEFT_TYPE_NAMES = {"LORA": "LoRA", "VERA": "VeRA", "IA3": "IA3", "PROMPT_TUNING": "prompt tuning",
                   "PREFIX_TUNING": "prefix tuning", "P_TUNING": "p-tuning", "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
                   "ADAPTION_PROMPT": "adaption prompt", "CPT": "context-aware prompt tuning"}
# Methods whose adapter is tokens in front of the input rather than a change to weights.
VIRTUAL_TOKEN_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")


def peft_config(adapter: AdapterSection, model_path: str | None = None):
    """peft's config for `adapter` (each peft argument chosen here, once).

    `model_path` is the base model's directory: prompt tuning's `init_text` is tokenized with its tokenizer.
    """
    import peft

    method = adapter.method
    targets = adapter.target_modules
    keep = adapter.modules_to_save or None
    if method in LORA_METHODS:
        return lora_config(adapter)
    if method == "vera":
        # save_projection: the shared random matrices travel in the adapter file, so it loads
        # (and merges) without regenerating them from the PRNG key.
        return peft.VeraConfig(r=adapter.r, target_modules=targets, vera_dropout=adapter.dropout, modules_to_save=keep,
                               save_projection=True, task_type="CAUSAL_LM")
    if method == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=adapter.feedforward_modules, modules_to_save=keep,
                              task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        if adapter.init_text is not None:
            if model_path is None:
                raise ValueError("init_text needs the base model's tokenizer (model_path)")
            return peft.PromptTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text=adapter.init_text, tokenizer_name_or_path=model_path,
                                           task_type="CAUSAL_LM")
        # Embeddings of random vocabulary tokens train better than random vectors (Lester et al.).
        return peft.PromptTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB",
                                       task_type="CAUSAL_LM")
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, task_type="CAUSAL_LM")
    raise ValueError(f"adapter.method {method!r} has no peft config")


def lora_config(adapter: AdapterSection):
    """peft's LoraConfig for lora, dora and lora_plus (which differs only in its optimizer)."""
    from peft import LoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}[adapter.init]
    extra = {}
    if adapter.init == "loftq":
        from peft import LoftQConfig

        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        modules_to_save=adapter.modules_to_save or None,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.rslora,
        init_lora_weights=init,
        task_type="CAUSAL_LM",
        **extra,
    )


def attach(model, adapter: AdapterSection, model_path: str, *, task_type: str = "CAUSAL_LM"):
    """`model` with a fresh adapter of `adapter.method` (peft's get_peft_model). task_type SEQ_CLS: a
    reward model's, whose score head peft then trains in full and saves with the adapter (reward.py)."""
    from peft import get_peft_model

    check_rank(model, adapter)
    try:
        config = peft_config(adapter, model_path)
        config.task_type = task_type
        peft_model = get_peft_model(model, config)
        if adapter.method == "ia3":
            _feedforward_among_targets(peft_model)
        return with_virtual_token_generation(peft_model)
    except ValueError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "feedforward" in text:
            raise FtuneError(f"adapter.feedforward_modules: {text}",
                             hint="name the feed-forward layers of this architecture among adapter.target_modules, "
                                  "e.g. feedforward_modules: [down_proj]") from None
        raise FtuneError(f"adapter.target_modules: {text}") from None


def check_rank(model, adapter: AdapterSection) -> None:
    """Refuse a rank above the model's hidden size before peft allocates it: an update's rank is at most the
    smaller side of the layer it adapts (never above the hidden size), so a larger r only allocates r x hidden
    numbers per adapted layer (r: 65536 is gigabytes) and adds nothing."""
    from ftune.recipe.sections import ADAPTER_FIELDS

    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if adapter.method in ADAPTER_FIELDS["r"] and isinstance(hidden, int) and adapter.r > hidden:
        raise FtuneError(f"adapter.r: {adapter.r} is above the model's hidden size ({hidden}); no layer's update can have a "
                         "higher rank, so the rest would only take memory", hint=f"set adapter.r to {hidden} or less (8 to 64 is usual)")


def load(model, adapter_dir, *, is_trainable: bool = False):
    """A saved adapter of any method on `model` (peft's PeftModel.from_pretrained), ready to generate."""
    from peft import PeftModel

    return with_virtual_token_generation(PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable))


def with_virtual_token_generation(peft_model):
    """Make peft's generation with virtual tokens work under transformers 5, and return the model.

    transformers 5 hands the attention cache to `prepare_inputs_for_generation` as `cache`;
    peft 0.21 looks for it under its old name, `past_key_values`, so it never sees it: prompt
    tuning puts its virtual tokens again before every generated token (the answer is garbage
    from the second token on), and prefix tuning's keys and values are ignored (the answer is
    the base model's). Here peft is shown the cache under the name it reads, and the model
    gets it back under the name it takes. Nothing changes where peft already reads `cache`,
    or for adapters without virtual tokens.
    """
    from peft import PeftModelForCausalLM

    if not uses_virtual_tokens(peft_model) or not isinstance(peft_model, PeftModelForCausalLM):
        return peft_model
    if '"cache"' in inspect.getsource(PeftModelForCausalLM.prepare_inputs_for_generation):
        return peft_model  # a peft that knows transformers 5's name
    takes_cache = "cache" in inspect.signature(peft_model.get_base_model().forward).parameters
    base_prepare, peft_prepare = peft_model.base_model_prepare_inputs_for_generation, peft_model.prepare_inputs_for_generation

    inside_peft = [False]  # peft's generate leaves base_inputs on the base model: rename only for peft

    def base_inputs(*args, **kwargs):
        inputs = base_prepare(*args, **kwargs)
        if inside_peft[0] and "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    def peft_inputs(*args, **kwargs):
        inside_peft[0] = True
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            inside_peft[0] = False
        if takes_cache and "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    peft_model.base_model_prepare_inputs_for_generation = base_inputs
    peft_model.prepare_inputs_for_generation = peft_inputs
    return peft_model


def _feedforward_among_targets(peft_model) -> None:
    """Name IA3's feed-forward layers the way its target_modules name them, so the saved config loads.

    peft resolves all-linear (and fills in an architecture's default feed-forward modules) after
    checking its config, and saves target_modules as full module names beside feedforward_modules
    as given, e.g. [down_proj]; loading that adapter then fails peft's own check that the
    feed-forward modules are among the targets. Rewritten here as the targets that name them.
    """
    config = peft_model.peft_config[peft_model.active_adapter]
    layers = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules() if hasattr(m, "ia3_l")}
    targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else []
    feedforward = [t for t in targets if any(m.is_feedforward and (key == t or key.endswith("." + t)) for key, m in layers.items())]
    if all(m.is_feedforward == any(key.endswith(t) for t in feedforward) for key, m in layers.items()):
        config.feedforward_modules = set(feedforward)


def starts_as_identity(adapter: AdapterSection) -> bool:
    """Whether a fresh adapter of this kind leaves the model as it was (so switching it off gives
    the starting model): LoRA's B and VeRA's λ_b start at zero, IA3's vectors at one. Virtual
    tokens change every output from the start; PiSSA, OLoRA and LoftQ move base weights into it."""
    if adapter.method in LORA_METHODS:
        return adapter.init in ("default", "gaussian")
    return adapter.method in ("vera", "ia3")


def describe(adapter: AdapterSection) -> str:
    """The adapter in a few words, for the run card: "lora (r=16, alpha=32.0, targets: all-linear)"."""
    a = adapter
    details = {
        "lora": f"r={a.r}, alpha={a.alpha}, targets: {a.target_modules}",
        "dora": f"r={a.r}, alpha={a.alpha}, targets: {a.target_modules}",
        "lora_plus": f"r={a.r}, alpha={a.alpha}, B learning rate x{a.lora_plus_ratio:g}, targets: {a.target_modules}",
        "vera": f"r={a.r}, targets: {a.target_modules}",
        "ia3": f"targets: {a.target_modules}" + (f", feed-forward: {a.feedforward_modules}" if a.feedforward_modules else ""),
        "prompt_tuning": f"{a.num_virtual_tokens} virtual tokens" + (f", initialised from {a.init_text!r}" if a.init_text else ""),
        "prefix_tuning": f"{a.num_virtual_tokens} virtual tokens of keys and values per layer",
    }.get(a.method)
    return a.method + (f" ({details})" if details else "")


# --------------------------------------------------------------------------- optimizer groups (weight decay, LoRA+)


def param_groups(model, training: TrainingSection, adapter: AdapterSection | None = None) -> list[dict]:
    """The optimizer's parameter groups: decoupled weight decay on matrices only, and for lora_plus
    the learning rates of LoRA+ as peft's `create_loraplus_optimizer` assigns them.

    LoRA+ (peft/optimizers/loraplus.py): lora_B factors, and every one-dimensional parameter
    (DoRA magnitudes, biases, norms in modules_to_save), at learning_rate x lora_plus_ratio;
    adapters on embedding layers at a fixed 1e-6; everything else (lora_A) at learning_rate.
    The scheduler scales each group's rate by the same factor, so the ratio holds all run long.
    A group names its own `lr` only where it differs from learning_rate, which the optimizer's
    constructor sets (training.make_optimizer): the one place the learning rate is given.
    """
    lr = training.learning_rate
    rated: dict[float, list] = {}
    embedding_modules = _lora_embedding_modules(model) if adapter is not None and adapter.method == "lora_plus" else set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rate = lr
        if adapter is not None and adapter.method == "lora_plus":
            if ".".join(name.split(".")[:-2]) in embedding_modules:
                rate = LORA_PLUS_EMBEDDING_LR
            elif "lora_B" in name or param.ndim == 1:
                rate = lr * adapter.lora_plus_ratio
        rated.setdefault(rate, []).append(param)
    groups = []
    for rate, params in rated.items():
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        own = {} if rate == lr else {"lr": rate}
        groups += [{"params": decay, "weight_decay": training.weight_decay, **own},
                   {"params": no_decay, "weight_decay": 0.0, **own}]
    return [g for g in groups if g["params"]]


def _lora_embedding_modules(model) -> set[str]:
    from peft.tuners.lora import Embedding

    return {name for name, module in model.named_modules() if isinstance(module, Embedding)}


# --------------------------------------------------------------------------- virtual tokens


def uses_virtual_tokens(model) -> bool:
    """A peft model whose adapter is prompt or prefix tuning (or another prompt-learning method)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def virtual_token_hidden(model, decoder, input_ids, position_ids, targets, attention_mask=None):
    """The decoder's last hidden states at the real tokens, with the adapter's virtual tokens in
    front of every sample, exactly as peft's PeftModelForCausalLM.forward puts them; returns
    (hidden, targets), aligned position by position.

    Prompt tuning: the virtual embeddings come first, positions count from them (peft passes no
    position ids), and their positions are dropped before the loss. Prefix tuning: the virtual
    keys and values sit in the cache, and the real tokens' positions start after them.

    Packed rows (no attention mask: position ids restart at each sample) cannot share one set
    of virtual tokens, so each sample is put on its own row first; the targets are taken in the
    same order, so the log-probs come out where the caller expects them.
    """
    import torch

    if attention_mask is None:
        input_ids, targets, attention_mask = _one_sample_per_row(input_ids, position_ids, targets)
    config = model.active_peft_config
    n, batch = config.num_virtual_tokens, input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
    if config.peft_type == "PREFIX_TUNING":
        cache = model.get_prompt(batch, max_cache_len=input_ids.shape[1] + n)
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False, **{_cache_argument(decoder): cache}).last_hidden_state
        return hidden, targets
    if config.peft_type != "PROMPT_TUNING":
        raise FtuneError(f"ftune trains prompt and prefix tuning; this adapter is {config.peft_type}")
    embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
    hidden = decoder(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, use_cache=False).last_hidden_state
    return hidden[:, n:], targets


def _one_sample_per_row(input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor):
    """Packed rows unpacked: each sample that has targets on a row of its own, right-padded."""

    from ftune.data.rendering import IGNORE
    from ftune.modeling.attention import segments

    spans = [(b, s, e) for b, row in enumerate(segments(position_ids.expand(input_ids.shape[0], -1)))
             for s, e in row if bool((targets[b, s:e] != IGNORE).any())]
    spans = spans or [(0, 0, input_ids.shape[1])]  # nothing to score: one row keeps the shapes valid
    width = max(e - s for _, s, e in spans)
    ids = input_ids.new_zeros(len(spans), width)
    out_targets = targets.new_full((len(spans), width), IGNORE)
    mask = input_ids.new_zeros(len(spans), width)
    for i, (b, s, e) in enumerate(spans):
        ids[i, : e - s] = input_ids[b, s:e]
        out_targets[i, : e - s] = targets[b, s:e]
        mask[i, : e - s] = 1
    return ids, out_targets, mask


def _cache_argument(decoder) -> str:
    # transformers 5 renamed the decoder's past_key_values argument to cache (and warns about the old name).
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------- merging


def unmergeable(adapter_config: dict, adapter_dir: str = "ADAPTER_DIR") -> tuple[str, str] | None:
    """(why, what to do instead) for an adapter whose method leaves no weight to merge; None otherwise."""
    peft_type = adapter_config.get("peft_type")
    if peft_type not in VIRTUAL_TOKEN_TYPES:
        return None
    name = PEFT_TYPE_NAMES.get(peft_type, str(peft_type))
    tokens = adapter_config.get("num_virtual_tokens")
    tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None
    what = ("learned keys and values that every layer attends to before the input" if peft_type == "PREFIX_TUNING"
            else "learned input embeddings put before every prompt")
    why = (f"a {name} adapter cannot be merged into the model's weights: its {f'{tokens} ' if tokens else ''}virtual tokens "
           f"are {what}, not a change to any weight, so no plain model (and no GGUF file) can behave like it")
    instead = (f"serve it with peft on its base model (AutoPeftModelForCausalLM.from_pretrained('{adapter_dir}')), as "
               "`ftune chat` and `ftune eval` do; or train with adapter.method: lora (or ia3) for an adapter that merges")
    return why, instead

"""Reward models: a score head on the decoder, read where transformers reads it, and scoring with a trained one.

The model is the base as transformers' sequence-classification model with one output
(`AutoModelForSequenceClassification`, num_labels=1): the decoder, then `score`, a linear map
from a hidden state to one number. With an adapter, the head is trained in full and saved with
it (peft's task SEQ_CLS puts `score` in modules_to_save), so
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), adapter)`
is the same model in plain transformers and peft.

Where a sequence's reward is read: at its last token that is not the model's pad token
(config.pad_token_id; the last token when there is none), which is where transformers' own
forward reads a sequence given alone. ftune packs chosen and rejected sequences into rows, runs
the decoder once with position ids restarting per sequence (as training.TokenLogProbs does) and
applies the head at those positions only: never at padding, never in a neighbour. SmolLM2 pads
with its end-of-turn token, so a ChatML answer "...<|im_end|>\\n" is read at the final newline.

Training one (its model built for training, loss, figures) is train/reward_training.py's.

To score with a trained reward model (`ftune score`, `ftune eval`, GRPO's reward_model reward):
`load(path)` gives a `RewardModel`, whose `score(conversations)` and `score_texts(texts)` return
rewards read exactly as training read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ftune.artifacts import ownership, run_checks, runs
from ftune.data.formats import Chat
from ftune.data.packing import Encoded
from ftune.data.pairs import packed_rows
from ftune.data.rendering import IGNORE, Formatter, make_formatter
from ftune.errors import FtuneError
from ftune.guards import textio
from ftune.modeling import attention, models
from ftune.recipe import CHAT_TEMPLATE_NAMES

HEAD = "score"  # transformers' name for the head of its decoder sequence-classification models
TASK_TYPE = "SEQ_CLS"  # peft's task for them: the head goes into modules_to_save


# --------------------------------------------------------------------------- the model


def continue_adapter(model, adapter_dir: Path):
    """`model` with an adapter shaped as the one in `adapter_dir` (an SFT run's, made for a causal LM),
    holding its weights, and a new score head trained beside it."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type, config.inference_mode = TASK_TYPE, False
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True  # the SFT weights replace the initial ones: no PiSSA/LoftQ rewrite of the base
    if getattr(config, "modules_to_save", None):  # an LM head has no place in a reward model
        config.modules_to_save = [m for m in config.modules_to_save if m not in ("lm_head", "embed_tokens")] or None
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise FtuneError(f"the adapter in {adapter_dir} does not fit a reward model on this base: {exc}") from None
    fresh = get_peft_model_state_dict(model)  # the new score head, which the SFT adapter has no weights for
    unexpected = set_peft_model_state_dict(model, {**fresh, **load_file(adapter_dir / "adapter_model.safetensors")}).unexpected_keys
    lost = [k for k in unexpected if "lm_head" not in k and "embed_tokens" not in k]
    if lost:
        raise FtuneError(f"the adapter in {adapter_dir} holds weights this model has no place for (e.g. {lost[0]})",
                         hint="rm.init_from must name an SFT run of the same base model")
    return model


def parts(model):
    """(decoder, score head) of a sequence-classification model, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(inner, inner.base_model_prefix, None), getattr(inner, HEAD, None)
    if decoder is None or head is None:
        raise FtuneError(f"{type(inner).__name__} is not a decoder with a score head, which ftune's reward models are")
    return decoder, head


def read_pad_id(model) -> int | None:
    """The token transformers skips when it looks for a sequence's last token: the config's pad token."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config.get_text_config().pad_token_id


class SequenceRewards(torch.nn.Module):
    """The reward of every packed sequence: the decoder once over the rows, the head at each read position.

    `ends` holds flat positions (row x width + column) into the rows. Applying the head there
    only, rather than at every position as transformers does, is the same arithmetic. This is
    the module DDP and FSDP wrap, so every forward and backward goes through them.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, ends, attention_mask=None):
        decoder, head = parts(self.model)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1])[ends]
        weight = next(head.parameters())
        return head(picked.to(weight.dtype)).squeeze(-1).float()


def read_positions(data: Encoded, indices: list[int], places: list[tuple[int, int]], width: int, pad_id: int | None) -> torch.Tensor:
    """Flat positions where each sequence's reward is read: its last token that is not `pad_id`
    (the first when every token is, where transformers' argmax lands too)."""
    ends = []
    for i, (row, at) in zip(indices, places):
        ids, _ = data.sample(i)
        kept = np.flatnonzero(ids != pad_id) if pad_id is not None else [len(ids) - 1]
        ends.append(row * width + at + (int(kept[-1]) if len(kept) else 0))
    return torch.tensor(ends, dtype=torch.long)


def sequence_rewards(scorer, data: Encoded, indices: list[int], *, max_length: int, pad_id: int, read_pad_id: int | None,
                     device) -> torch.Tensor:
    """Rewards of sequences `indices` of `data`, packed into rows of `max_length`; `scorer` is a
    SequenceRewards (possibly wrapped by DDP/FSDP), `pad_id` the padding collate writes."""
    batch, places = packed_rows(data, indices, max_length=max_length, pad_id=pad_id, device=device)
    ends = read_positions(data, indices, places, batch["input_ids"].shape[1], read_pad_id).to(device)
    return scorer(input_ids=batch["input_ids"], position_ids=batch["position_ids"], ends=ends)


# --------------------------------------------------------------------------- scoring with a trained model


def reward_model_kind(path: Path) -> str | None:
    """What makes `path` a reward model, in words, or None: an ftune rm run, a peft adapter for a
    score head (task SEQ_CLS), or a model directory whose config names a sequence-classification class."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if (path / ownership.RUN_FILE).is_file():
        meta = ownership.read_json_object(path / ownership.RUN_FILE) or {}
        return "an ftune reward-model run (stage: rm)" if meta.get("stage") == "rm" else None
    adapter = ownership.read_json_object(path / "adapter_config.json")
    if adapter is not None:
        return f"a reward-model adapter (peft task {TASK_TYPE})" if adapter.get("task_type") == TASK_TYPE else None
    names = (ownership.read_json_object(path / "config.json") or {}).get("architectures") or []
    found = [n for n in names if isinstance(n, str) and n.endswith("ForSequenceClassification")]
    return f"a sequence-classification model ({found[0]})" if found else None


@dataclass
class RewardModel:
    """A trained reward model loaded to score with: the model, and the chat formatting it trained with."""

    source: str
    model: object  # a sequence-classification model (peft-wrapped when it has an adapter), in eval mode
    tokenizer: object
    formatter: Formatter
    device: object
    read_pad_id: int | None
    tokens_per_batch: int = 8192  # tokens scored in one forward: 16 sequences of 512

    def score(self, conversations) -> list[float]:
        """Rewards of whole conversations (message tuples ending in the answer being judged),
        rendered and tokenized as training rendered each side of a pair."""
        encode = self.formatter.encode
        return self.score_ids([encode(Chat(self.formatter.with_system(tuple(c))), last_turn_only=True)[0] for c in conversations])

    def score_texts(self, texts) -> list[float]:
        """Rewards of texts already in the chat template (or plain text), tokenized as they are."""
        return self.score_ids([self.formatter.tokenize(text) for text in texts])

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token sequences, packed `tokens_per_batch` at a time."""
        if not sequences:
            return []
        data = Encoded.from_lists([(list(ids), [IGNORE] * len(ids)) for ids in sequences])
        width = max(int(data.lengths().max()), 512)
        scorer, out = SequenceRewards(self.model), []
        batch, tokens = [], 0
        for i, n in enumerate(data.lengths().tolist()):
            if batch and tokens + n > max(self.tokens_per_batch, width):
                out += self._rewards(scorer, data, batch, width)
                batch, tokens = [], 0
            batch.append(i)
            tokens += n
        return out + self._rewards(scorer, data, batch, width)

    def _rewards(self, scorer, data: Encoded, indices: list[int], width: int) -> list[float]:
        return sequence_rewards(scorer, data, indices, max_length=width, pad_id=self.tokenizer.pad_token_id,
                                read_pad_id=self.read_pad_id, device=self.device).tolist()


def load(path: Path, *, device=None, trust_remote_code: bool = False) -> RewardModel:
    """A reward model to score with, from an ftune rm run directory, its adapter, or a merged (or any)
    sequence-classification model directory. Python shipped with a model runs only with
    `trust_remote_code`, the caller's (never a file's) choice."""
    from peft import PeftModel

    from ftune.recipe import QuantizationSection

    path = Path(path).expanduser()
    if (path / ownership.RUN_FILE).is_file():
        runs.read_run(path, expect="reward model")  # a damaged run, or one of another stage, named as such
    elif (path / "adapter_config.json").is_file():
        run_checks.check_adapter(path)
    if reward_model_kind(path) is None:
        raise FtuneError(f"{path} is not a reward model", hint="pass an `ftune rm` run directory (or its adapter, or a model "
                         "merged from one); train one with `ftune rm RECIPE`")
    template, system, quantization, dtype, adapter, weights = "auto", None, None, "auto", None, path
    if (path / ownership.RUN_FILE).is_file():
        run = runs.read_run(path)
        recipe = run.recipe()
        if recipe is not None and recipe.data.chat_template in CHAT_TEMPLATE_NAMES:
            template = recipe.data.chat_template  # a template file was saved into the tokenizer: auto finds it
        system = recipe.data.system_prompt if recipe is not None else None
        quantization = QuantizationSection.model_validate(run.quantization) if run.quantization else None
        dtype = run.dtype or "auto"
        weights, adapter = (run.model_dir, None) if (run.model_dir / "config.json").is_file() else (Path(models.run_base_path(run)), run.adapter_dir)
    elif (path / "adapter_config.json").is_file():
        config = textio.load_file(path / "adapter_config.json", "adapter config")
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if not isinstance(base, str) or not base:
            raise FtuneError("adapter_config.json does not name its base model (base_model_name_or_path)", place=str(path))
        weights, adapter = Path(models.resolve_model_path(base)), path
    models.quiet_libraries()
    has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
    tokenizer = models.load_tokenizer(str(adapter if has_tokenizer else weights), trust_remote_code=trust_remote_code)
    formatter = make_formatter(tokenizer, chat_template=template, system_prompt=system)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = models.load_model(str(weights), dtype=models.pick_dtype(dtype), quantization=quantization,
                              trust_remote_code=trust_remote_code, score_head=True)
    if quantization is None:
        model = model.to(device)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    attention.enable(model, 1 << 20)  # packed sequences, each attending to itself
    model.eval()
    return RewardModel(str(path), model, tokenizer, formatter, device, read_pad_id(model))


load_reward_model = load


def score_texts(model: RewardModel, texts: list[str]) -> list[float]:
    """Rewards of rendered texts (see RewardModel.score_texts)."""
    return model.score_texts(texts)


def use_lines(run_dir: Path) -> list[str]:
    """The run card's Use section for a reward model: loading it in plain transformers (and peft)."""
    run = runs.read_run(run_dir)
    full = (run.model_dir / "config.json").is_file()
    load = ([f"model = AutoModelForSequenceClassification.from_pretrained('{run.model_dir}')"] if full else
            ["from peft import PeftModel",
             f"base = AutoModelForSequenceClassification.from_pretrained('{run.base_model_path}', num_labels=1)",
             f"model = PeftModel.from_pretrained(base, '{run.adapter_dir}')"])
    return ["", "## Use", "", "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", *load,
            f"tokenizer = AutoTokenizer.from_pretrained('{run.model_dir if full else run.adapter_dir}')",
            "inputs = tokenizer.apply_chat_template(messages, return_tensors='pt', return_dict=True)  # the prompt, then the answer",
            "reward = model(**inputs).logits[0, 0]", "```", "",
            ("The reward is read at the last token that is not the pad token, as transformers reads it: score one "
             "conversation at a time, or pad on the right. `ftune score RUN --data FILE` scores the rows or pairs of a file, "
             f"`ftune eval {run_dir}` reports held-out pairwise accuracy, and `ftune merge {run_dir} --out merged/` writes a "
             "plain sequence-classification model. There is no GGUF export: llama.cpp does not run score heads."), ""]

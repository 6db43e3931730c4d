"""Render conversations with a chat template and mark exactly which tokens carry loss.

A conversation is rendered once into text. The character span of each assistant answer
is found by rendering the conversation up to that answer (with the generation prompt)
and up to its end; the span runs from the answer's first character to the end of its
end-of-turn marker. Tokens are labelled through the fast tokenizer's character offsets.
This works with any template whose renderings of a conversation's prefixes are prefixes
of the whole rendering, which `end_of_turn` checks once up front.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftune.data.formats import Raw
from ftune.errors import FtuneError

IGNORE = -100

# Templates for base models that have none. Each turn ends in a marker the model learns.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}
TEMPLATE_MARKERS = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|eot_id|>"]}
_PROBE_USER = "Say hi."
_PROBE_ANSWER = "Hi there, friend."


@dataclass(frozen=True)
class Formatter:
    """Everything needed to turn a sample into tokens and labels, fixed for one run."""

    tokenizer: object
    template: str
    end_of_turn: str  # the text that ends an assistant turn, e.g. "<|im_end|>"
    end_of_turn_id: int
    system_prompt: str | None
    train_on_all: bool
    prepend_bos: bool

    def render(self, messages, *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def with_system(self, messages: tuple[dict, ...]) -> tuple[dict, ...]:
        if self.system_prompt and messages[0]["role"] != "system":
            return ({"role": "system", "content": self.system_prompt}, *messages)
        return messages

    def encode(self, sample, *, last_turn_only: bool = False) -> tuple[list[int], list[int]]:
        """input_ids and labels (IGNORE where no loss) for one Chat or Raw sample.

        `last_turn_only` labels just the final answer: preference pairs compare that answer,
        not the earlier turns of the dialogue they share.
        """
        return self.encode_many([sample], last_turn_only=last_turn_only)[0]

    def encode_many(self, samples: list, *, last_turn_only: bool = False) -> list[tuple[list[int], list[int]]]:
        """`encode` for many samples, with the chat texts tokenized in one batched call."""
        results: list = [None] * len(samples)
        chats = []  # (index, text, answer spans)
        for index, sample in enumerate(samples):
            if isinstance(sample, Raw):
                results[index] = self._encode_raw(sample)
            else:
                text, spans = self._render_with_spans(sample, last_turn_only)
                chats.append((index, text, spans))
        if chats:
            encoded = self.tokenizer([text for _, text, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
            for (index, _, spans), ids, offsets in zip(chats, encoded["input_ids"], encoded["offset_mapping"]):
                results[index] = self._label(list(ids), offsets, spans, last_turn_only)
        return results

    def _render_with_spans(self, sample, last_turn_only: bool) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and, per assistant answer, the characters from its start to its end-of-turn."""
        messages = self.with_system(sample.messages)
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            end = self.render(messages[: i + 1]).find(self.end_of_turn, start)
            if end < 0:
                raise FtuneError(f"the chat template emits no '{self.end_of_turn}' after an assistant turn")
            spans.append((start, end + len(self.end_of_turn)))
        return text, spans[-1:] if last_turn_only else spans

    def _label(self, ids: list[int], offsets, spans, last_turn_only: bool) -> tuple[list[int], list[int]]:
        if self.train_on_all and not last_turn_only:
            labels = list(ids)
        else:
            labels = [IGNORE] * len(ids)
            span_index = 0
            for t, (a, _b) in enumerate(offsets):
                while span_index < len(spans) and a >= spans[span_index][1]:
                    span_index += 1
                if span_index < len(spans) and spans[span_index][0] <= a < spans[span_index][1]:
                    labels[t] = ids[t]
        if self.prepend_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids, labels = [self.tokenizer.bos_token_id, *ids], [IGNORE, *labels]
        return ids, labels

    def _encode_raw(self, sample: Raw) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if self.prepend_bos:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE)
        for text, trained in sample.segments:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids.extend(piece)
            labels.extend(piece if trained or self.train_on_all else [IGNORE] * len(piece))
        eos = self.tokenizer.eos_token_id
        ids.append(eos)
        labels.append(eos)
        return ids, labels


def make_formatter(tokenizer, *, chat_template: str = "auto", system_prompt: str | None = None, train_on: str = "assistant") -> Formatter:
    """Pick the template and find its end-of-turn marker; fail fast if answers would never end."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("ftune needs a fast (Rust) tokenizer to locate answer tokens; this model only has a slow one")
    if chat_template == "auto":
        template = tokenizer.chat_template or NAMED_TEMPLATES["chatml"]
        name = "the tokenizer's chat template" if tokenizer.chat_template else "chatml (the tokenizer has no chat template)"
    else:
        template, name = NAMED_TEMPLATES[chat_template], f"the {chat_template} template"
    if template is NAMED_TEMPLATES.get("chatml") or chat_template in TEMPLATE_MARKERS:
        key = "chatml" if chat_template in ("auto", "chatml") else chat_template
        missing = [m for m in TEMPLATE_MARKERS[key] if tokenizer.convert_tokens_to_ids(m) in (None, tokenizer.unk_token_id)]
        if missing:
            raise FtuneError(
                f"{name} needs the tokens {', '.join(missing)}, which this tokenizer does not have",
                hint="use data.chat_template: alpaca, which ends answers with the tokenizer's EOS token",
            )
    end = end_of_turn(tokenizer, template, name)
    end_id = tokenizer.convert_tokens_to_ids(end)
    if end_id is None or end_id == tokenizer.unk_token_id:
        ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise FtuneError(
                f"{name} ends answers with '{end}', which is not a single token for this tokenizer; "
                "the model could not learn to stop cleanly",
                hint="use a template whose end-of-turn marker is a special token (or data.chat_template: alpaca)",
            )
        end_id = ids[0]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    prepend_bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    return Formatter(tokenizer, template, end, end_id, system_prompt, train_on == "all", prepend_bos)


def end_of_turn(tokenizer, template: str, name: str) -> str:
    """The special token that closes an assistant answer under this template."""
    conversation = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        prefix = tokenizer.apply_chat_template(conversation[:1], chat_template=template, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    except Exception as exc:  # jinja raises many kinds of errors for a template it cannot render
        raise FtuneError(f"{name} cannot render a simple conversation: {exc}") from None
    if not whole.startswith(prefix):
        raise FtuneError(
            f"{name} renders the prompt differently once the answer is added, so answer tokens cannot be located",
            hint="set data.chat_template to chatml, alpaca or llama3",
        )
    at = whole.find(_PROBE_ANSWER, len(prefix))
    if at < 0:
        raise FtuneError(f"{name} drops the assistant's answer when rendering")
    tail = whole[at + len(_PROBE_ANSWER):]
    candidates = sorted(
        {t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t and t in tail},
        key=tail.find,
    )
    if not candidates:
        raise FtuneError(
            f"{name} never emits an end-of-turn token after the assistant's answer: "
            "a model trained on it would never learn to stop",
            hint="use data.chat_template: alpaca (answers end with EOS) or a template that closes each turn",
        )
    return candidates[0]


def audit_labels(formatter: Formatter, samples: list[tuple[list[int], list[int]]]) -> dict:
    """Check on real samples that every answer's end-of-turn token is trained.

    Catches the classic silent failure: the pad token equals EOS and padding is masked by
    id, so the real EOS is masked too and the model never learns to stop.
    """
    end_id = formatter.end_of_turn_id
    checked = with_end = trained_end = 0
    for ids, labels in samples:
        ends = [t for t, token in enumerate(ids) if token == end_id]
        if not ends:
            continue
        checked += 1
        answer_ends = [t for t in ends if t > 0 and labels[t - 1] != IGNORE]
        with_end += bool(answer_ends)
        trained_end += bool(answer_ends) and all(labels[t] == end_id for t in answer_ends)
    report = {"end_of_turn": formatter.end_of_turn, "end_of_turn_id": end_id, "samples_checked": checked,
              "answers_ending_trained": trained_end, "answers_ending": with_end}
    if with_end and trained_end < with_end:
        raise FtuneError(
            f"end-of-turn audit failed: in {with_end - trained_end} of {with_end} samples the '{formatter.end_of_turn}' "
            "closing an answer carries no loss, so the model would not learn to stop",
            hint="this usually means the pad token equals the end-of-turn token and padding is masked by id",
        )
    return report

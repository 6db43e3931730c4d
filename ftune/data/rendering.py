"""Render conversations with a chat template and mark exactly which tokens carry loss.

Messages reach the template as an inference server passes them (`tools=`, `tool_calls`,
`tool_call_id`, `reasoning_content`: see conversation.py), so any template that supports
tools works. A conversation is rendered once into text. Assistant turn i's characters start
right after the rendering of the conversation before it with the generation prompt (or, when
the template rendered that history differently, where the turn itself is found), and end
with the first token that stops generation (the template's end-of-turn marker, or EOS).
Tokens are labelled through the fast tokenizer's character offsets.

Tool results and everything else outside assistant turns carry no loss. Reasoning is
trained, masked (rendered, no loss on its text) or dropped before rendering (data.reasoning).
A template that renders earlier turns differently once later ones follow (Qwen3 drops the
reasoning of turns before the last question) makes training differ from inference: the
render proof (render_proof.py) compares the two token by token, and `data.turns: last` or
`split` (one sample per assistant turn, its history rendered as at inference) avoid it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftune.data.chat_template import (
    NAMED_TEMPLATES,
    TEMPLATE_MARKERS,
    TemplateStyle,
    choose_template,
    common_prefix,
    end_of_turn,
    probe_style,
    render,
)
from ftune.data.formats import BadRow, Raw
from ftune.errors import FtuneError

__all__ = ["IGNORE", "NAMED_TEMPLATES", "TEMPLATE_MARKERS", "Formatter", "make_formatter", "formatter_for"]

IGNORE = -100
KINDS = ("prompt", "text", "reasoning", "tool_call", "tool_result")  # what each token of a shown sample is


@dataclass(frozen=True)
class Turn:
    """One assistant turn as placed in a sample's text, with what inference renders for it."""

    index: int  # its place in the conversation as the data holds it (a system_prompt added by ftune not counted)
    start: int  # characters of the sample's text: from the turn's first character
    end: int  # to the end of the token that stops generation
    trained: tuple[tuple[int, int], ...]  # character ranges with loss (the turn, less masked reasoning)
    reasoning: tuple[int, int] | None  # where its reasoning text lies, when it has some
    prompt: str  # the conversation before it with the generation prompt, as a server renders it
    inference: str  # the conversation up to and including it


@dataclass(frozen=True)
class Piece:
    """The text of one training sample and the assistant turns it trains."""

    text: str
    turns: tuple[Turn, ...]
    messages: tuple[dict, ...] = field(repr=False, default=())  # as given to the template
    added: int = 0  # messages ftune put in front (a system_prompt): messages[i + added] is the data's turn i


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
    turns: str = "all"  # all | last | split (data.turns)
    reasoning: str = "train"  # train | mask | drop (data.reasoning)
    style: TemplateStyle = TemplateStyle(None, None, False, ("<think>", "</think>"))
    stops: tuple[str, ...] = ()  # texts that end an assistant turn (end_of_turn first)
    tool_template: str | None = None  # a tokenizer's "tool_use" template, used when a conversation has tools
    saved_template: str | None = None  # stored as the tokenizer's chat_template with the adapter (None: it is already)
    name: str = "the chat template"

    def render(self, messages, *, add_generation_prompt: bool = False, tools=()) -> str:
        """The conversation as text: a template that raises makes it a bad row (TemplateFailed), one that runs
        past chat_template.RENDER_SECONDS is an error (TemplateTooSlow); callers add the row's place."""
        template = self.tool_template if tools and self.tool_template else self.template
        return render(self.tokenizer, messages, template=template, name=self.name, tools=list(tools) or None,
                      add_generation_prompt=add_generation_prompt)

    def with_system(self, messages: tuple[dict, ...]) -> tuple[dict, ...]:
        if self.system_prompt and messages[0]["role"] != "system":
            return ({"role": "system", "content": self.system_prompt}, *messages)
        return messages

    def template_messages(self, messages) -> tuple[tuple[dict, ...], dict[int, str]]:
        """Messages as the template gets them, and each assistant turn's reasoning text (by message index).

        Reasoning goes in `reasoning_content` for templates that read it; for the others it goes
        inline, between the template's think tags, as the model writes it. Inline reasoning in the
        data's content is recognised by the same tags.
        """
        out, reasonings = [], {}
        opening, closing = self.style.think
        for i, message in enumerate(self.with_system(tuple(messages))):
            if message["role"] != "assistant":
                out.append(message)
                continue
            message = dict(message)
            reasoning, answer = message.pop("reasoning_content", None), message["content"]
            inline = reasoning is None and closing in answer and answer.lstrip().startswith(opening)
            if inline:
                head, _, answer = answer.partition(closing)
                reasoning, answer = head.lstrip()[len(opening):].strip("\n"), answer.lstrip("\n")
            if reasoning is None or not reasoning.strip() or self.reasoning == "drop":
                message["content"] = answer
            elif self.style.reasoning_field:
                message.update(content=answer, reasoning_content=reasoning)
                reasonings[i] = reasoning
            else:
                if not inline:
                    message["content"] = f"{opening}\n{reasoning.strip(chr(10))}\n{closing}\n\n{answer}"
                reasonings[i] = reasoning
            out.append(message)
        return tuple(out), reasonings

    def pieces(self, sample, *, last_turn_only: bool = False) -> list[Piece]:
        """The samples one conversation makes: one (turns: all, last), or one per assistant turn (split)."""
        messages, reasonings = self.template_messages(sample.messages)
        tools = tuple(sample.tools)
        added = len(messages) - len(sample.messages)  # a system_prompt ftune put in front
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        self._check_renderable(messages, tools, added)
        mode = "last" if last_turn_only else self.turns
        try:
            if mode == "split":
                return [self._piece(self.render(messages[: i + 1], tools=tools), messages, [i], tools, reasonings, added)
                        for i in answers]
            chosen = answers[-1:] if mode == "last" else answers
            return [self._piece(self.render(messages, tools=tools), messages, chosen, tools, reasonings, added)]
        except (FtuneError, BadRow):
            raise
        except Exception as exc:  # the template's raise_exception, or a jinja error on this conversation's shape
            raise BadRow(f"{self.name} cannot render this conversation: {exc}") from None

    def _check_renderable(self, messages, tools, added: int) -> None:
        hint = "use a chat template that renders them (data.chat_template: a Jinja file or inline template)"
        if tools and self.style.renders_tools is False:
            raise FtuneError(f"{self.name} does not render tools: the conversation's tool specs would never reach the model",
                             hint=hint)
        for i, message in enumerate(messages):
            if message.get("tool_calls") and self.style.renders_calls is False:
                raise FtuneError(f"{self.name} does not render tool calls: the calls of messages[{i - added}] would be "
                                 "trained as an empty answer", hint=hint)

    def _piece(self, text: str, messages, turn_indexes: list[int], tools, reasonings, added: int) -> Piece:
        turns = []
        cursor = 0  # turns lie in order: each starts after the one before
        for i in turn_indexes:
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            inference = text if len(messages) == i + 1 else self.render(messages[: i + 1], tools=tools)
            start = len(prompt) if text.startswith(prompt) else self._locate(text, prompt, inference, messages[:i], tools, cursor)
            end = cursor = self._turn_end(text, start, i - added)
            found = None
            reasoning = reasonings.get(i, "").strip()
            if reasoning:
                at = text.find(reasoning, start, end)
                found = (at, at + len(reasoning)) if at >= 0 else None
                if found is None and reasoning not in inference[len(prompt):]:
                    raise FtuneError(
                        f"{self.name} drops the reasoning of messages[{i - added}] even when that turn is generated, "
                        "so it cannot be trained", hint="set data.reasoning: drop, or use a template that renders reasoning")
            trained = ((start, found[0]), (found[1], end)) if found and self.reasoning == "mask" else ((start, end),)
            turns.append(Turn(i - added, start, end, trained, found, prompt, inference))
        return Piece(text, tuple(turns), messages, added)

    def _locate(self, text: str, prompt: str, inference: str, history, tools, cursor: int) -> int:
        """Where a turn starts in a text whose earlier part the template rendered differently from `prompt`.

        Training and inference then differ (the render proof reports it); this finds the turn
        itself, so that what is trained is at least this turn: where the turn as inference renders
        it appears, else after the generation prompt's own text, else where the two texts part.
        """
        if inference.startswith(prompt):
            ends = [at for stop in self.stops or (self.end_of_turn,) if (at := inference.find(stop, len(prompt))) >= 0]
            generated = inference[len(prompt): min(ends)] if ends else ""
            at = text.find(generated, cursor) if generated.strip() else -1
            if at >= 0:
                return at
        before = self.render(history, tools=tools)
        if prompt.startswith(before) and len(prompt) > len(before):
            at = text.find(prompt[len(before):], cursor)
            if at >= 0:
                return at + len(prompt) - len(before)
        return max(cursor, common_prefix(text, prompt))

    def _turn_end(self, text: str, start: int, index: int) -> int:
        ends = [(at, stop) for stop in self.stops or (self.end_of_turn,) if (at := text.find(stop, start)) >= 0]
        if not ends:
            raise FtuneError(f"{self.name} emits no '{self.end_of_turn}' after assistant turn messages[{index}]",
                             hint="use a template that closes every assistant turn with an end-of-turn token")
        at, stop = min(ends)
        return at + len(stop)

    def encode(self, sample, *, last_turn_only: bool = False) -> tuple[list[int], list[int]]:
        """input_ids and labels (IGNORE where no loss) for one Chat or Raw sample.

        `last_turn_only` labels just the final answer: preference pairs compare that answer,
        not the earlier turns of the dialogue they share.
        """
        return self.encode_many([sample], last_turn_only=last_turn_only)[0]

    def encode_many(self, samples: list, *, last_turn_only: bool = False) -> list[tuple[list[int], list[int]]]:
        """`encode` for many samples (several each under turns: split); a conversation the template rejects is an error."""
        out = []
        for result in self.encode_each(samples, last_turn_only=last_turn_only):
            if isinstance(result, BadRow):
                raise FtuneError(str(result))
            out.extend(result)
        return out

    def encode_each(self, samples: list, *, last_turn_only: bool = False, places: list[str] | None = None) -> list:
        """Per sample: its (input_ids, labels) pieces, or the BadRow saying why the template rejects it.

        Texts are tokenized in one batched call. Template-level problems (a template that drops tool
        calls, say) raise FtuneError naming the sample's place.
        """
        results: list = [None] * len(samples)
        texts, owners = [], []  # (sample index, piece)
        for index, sample in enumerate(samples):
            if isinstance(sample, Raw):
                results[index] = [self._encode_raw(sample)]
                continue
            try:
                pieces = self.pieces(sample, last_turn_only=last_turn_only)
            except BadRow as exc:
                results[index] = exc
                continue
            except FtuneError as exc:
                if places and not exc.place:
                    raise FtuneError(exc.message, place=places[index], hint=exc.hint) from None
                raise
            results[index] = []
            for piece in pieces:
                texts.append(piece.text)
                owners.append((index, piece))
        if texts:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for (index, piece), ids, offsets in zip(owners, encoded["input_ids"], encoded["offset_mapping"]):
                spans = [span for turn in piece.turns for span in turn.trained]
                results[index].append(self._label(list(ids), offsets, spans, everything=self.train_on_all and not last_turn_only))
        return results

    def annotate(self, sample) -> list[tuple[list[int], list[int], list[str]]]:
        """Like `encode`, with what each token is (one of KINDS), for `ftune inspect`'s coloured view."""
        out = []
        for piece in self.pieces(sample):
            encoded = self.tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
            spans = [span for turn in piece.turns for span in turn.trained]
            char_kinds = _char_kinds(piece)
            kinds = [char_kinds[a] if a < len(char_kinds) else "prompt" for a, _ in offsets]
            ids_out, labels = self._label(ids, offsets, spans, everything=self.train_on_all)
            out.append((ids_out, labels, ["prompt"] * (len(ids_out) - len(ids)) + kinds))
        return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered text, as training and `ftune chat` tokenize it."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.prepend_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def _label(self, ids: list[int], offsets, spans, *, everything: bool) -> tuple[list[int], list[int]]:
        if everything:
            labels = list(ids)
        else:
            labels = [IGNORE] * len(ids)
            spans = sorted(spans)
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


def _char_kinds(piece: Piece) -> list[str]:
    """The kind (one of KINDS) of every character of a piece's text."""
    text = piece.text
    kinds = ["prompt"] * len(text)
    by_message = {turn.index + piece.added: turn for turn in piece.turns}
    cursor = 0
    for i, message in enumerate(piece.messages):
        turn = by_message.get(i)
        if turn is not None:
            calls = bool(message.get("tool_calls"))
            kinds[turn.start:turn.end] = ["tool_call" if calls else "text"] * (turn.end - turn.start)
            content = message.get("content", "").strip()
            at = text.find(content, turn.reasoning[1] if turn.reasoning else turn.start, turn.end) if calls and content else -1
            if at >= 0:  # the text an assistant writes before (or after) its calls
                kinds[at:at + len(content)] = ["text"] * len(content)
            if turn.reasoning:  # with the think tags around it, which open the turn
                b = turn.reasoning[1]
                closing = _after_tag(text, b, turn.end)
                kinds[turn.start:closing] = ["reasoning"] * (closing - turn.start)
            cursor = turn.end
        elif message["role"] == "tool" and message["content"]:
            at = text.find(message["content"], cursor)
            if at >= 0:
                cursor = at + len(message["content"])
                kinds[at:cursor] = ["tool_result"] * len(message["content"])
    return kinds


def _after_tag(text: str, at: int, end: int) -> int:
    """Past the closing think tag (whatever the template's) and the blank lines after reasoning that ends at `at`."""
    close = text.find(">", at, end) if text.startswith(("\n<", "<", "\n[", "["), at) else -1
    bracket = text.find("]", at, end) if close < 0 and text.startswith(("\n[", "["), at) else -1
    stop = max(close, bracket)
    if stop < 0:
        return at
    stop += 1
    while stop < end and text[stop] == "\n":
        stop += 1
    return stop


def formatter_for(tokenizer, data, *, base_dir: Path | None, train_on: str | None = None) -> Formatter:
    """The formatter a recipe's `data:` section asks for (templates named by path are relative to `base_dir`)."""
    return make_formatter(tokenizer, chat_template=data.chat_template, system_prompt=data.system_prompt,
                          train_on=train_on or data.train_on, turns=data.turns, reasoning=data.reasoning,
                          render_check=data.render_check, base_dir=base_dir)


def make_formatter(tokenizer, *, chat_template: str = "auto", system_prompt: str | None = None, train_on: str = "assistant",
                   turns: str = "all", reasoning: str = "train", render_check: str = "error",
                   base_dir: Path | None = None) -> Formatter:
    """Pick the template, find its end-of-turn marker and habits; fail fast if answers would never end."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("ftune needs a fast (Rust) tokenizer to locate answer tokens; this model only has a slow one")
    chosen = choose_template(tokenizer, chat_template, base_dir)
    template, name = chosen.template, chosen.name
    if chat_template in ("auto", "chatml", "llama3") and template in (NAMED_TEMPLATES["chatml"], NAMED_TEMPLATES["llama3"]):
        key = "llama3" if template == NAMED_TEMPLATES["llama3"] else "chatml"
        missing = [m for m in TEMPLATE_MARKERS[key] if tokenizer.convert_tokens_to_ids(m) in (None, tokenizer.unk_token_id)]
        if missing:
            raise FtuneError(
                f"{name} needs the tokens {', '.join(missing)}, which this tokenizer does not have",
                hint="use data.chat_template: alpaca, which ends answers with the tokenizer's EOS token",
            )
    end = end_of_turn(tokenizer, template, name, strict=render_check == "error")
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
    stops = tuple(dict.fromkeys(s for s in (end, tokenizer.eos_token) if s))
    formatter = Formatter(tokenizer, template, end, end_id, system_prompt, train_on == "all", prepend_bos, turns, reasoning,
                          stops=stops, tool_template=chosen.tool_template, saved_template=chosen.saved, name=name)
    style = probe_style(formatter.render, template + (chosen.tool_template or ""))
    return Formatter(**{**formatter.__dict__, "style": style})

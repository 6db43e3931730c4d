"""The shapes a row of training data becomes, and the refusal of a row that cannot become one.

formats.py turns rows of each supported format into these; conversation.py does it for the
`messages` and `sharegpt` rows that carry tool calls and reasoning. Both name roles the same
way (`ROLE_ALIASES`) and a wrong value by its type (`kind`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
}


class BadRow(ValueError):
    """This row cannot be used; the message says why."""


@dataclass(frozen=True)
class Chat:
    messages: tuple[dict, ...]
    tools: tuple[dict, ...] = ()  # function specs given to the chat template (`tools=`), as a server passes them


@dataclass(frozen=True)
class Raw:
    segments: tuple[tuple[str, bool], ...]  # (text, trained)


@dataclass(frozen=True)
class Preference:
    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...] = field(default=())  # assistant message(s) that answer the prompt
    rejected: tuple[dict, ...] = field(default=())
    label: bool | None = None  # KTO: chosen holds the one answer, label says if it is desirable
    margin: object = None  # the row's `margin` value as read (a reward model with rm.use_margin checks it)


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample answers to (GRPO): the conversation up to the answer, as the data gave
    it (`given`: the prompt text, or the messages), and the row's other columns, which reward
    functions receive by name (e.g. the expected `answer`)."""

    messages: tuple[dict, ...]
    given: object
    columns: dict = field(default_factory=dict)


def kind(value) -> str:
    """A value's type for messages: Python's name, and null (as the file says) for None."""
    return "null" if value is None else type(value).__name__

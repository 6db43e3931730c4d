"""Turn rows of any supported format into one of three shapes ftune trains on.

- `Chat`: a conversation (system/user/assistant messages), rendered with a chat template;
  loss goes on assistant turns.
- `Raw`: text segments, each trained or not, with no template: plain text for continued
  pretraining, and prompt/completion pairs written as plain strings.
- `Preference`: a prompt conversation with a chosen and a rejected answer, or (for KTO)
  one answer with a desirable/undesirable label.

A row that cannot be used raises `BadRow` with the reason; the caller adds the place.
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
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


class BadRow(ValueError):
    """This row cannot be used; the message says why."""


@dataclass(frozen=True)
class Chat:
    messages: tuple[dict, ...]


@dataclass(frozen=True)
class Raw:
    segments: tuple[tuple[str, bool], ...]  # (text, trained)


@dataclass(frozen=True)
class Preference:
    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...] = field(default=())  # assistant message(s) that answer the prompt
    rejected: tuple[dict, ...] = field(default=())
    label: bool | None = None  # KTO: chosen holds the one answer, label says if it is desirable


def detect_format(row: dict) -> str:
    """The format of a row, from its columns (after column mapping)."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise BadRow(
        f"cannot tell the format from columns {sorted(keys)}; expected messages, conversations, "
        "instruction/output, prompt/completion, chosen/rejected or text (set `format:` and `columns:` in the recipe)"
    )


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """Apply a recipe's `columns:` mapping (ftune name -> the user's column name)."""
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs not in row:
            raise BadRow(f"column '{theirs}' (mapped to '{ours}') is missing")
        out[ours] = out.pop(theirs)
    return out


def convert(row: dict, fmt: str):
    """Convert one row of a known format."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be an object with named fields, not {type(row).__name__}")
    return _CONVERTERS[fmt](row)


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise BadRow(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(f"field '{key}' is empty")
    return value


def _alpaca(row: dict) -> Chat:
    instruction = _text(row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise BadRow(f"field 'input' must be a string, not {type(extra).__name__}")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.insert(0, {"role": "system", "content": row["system"]})
    return Chat(tuple(messages))


def normalize_messages(items, *, key: str, role_key: str = "role", content_key: str = "content") -> tuple[dict, ...]:
    if not isinstance(items, list) or not items:
        raise BadRow(f"field '{key}' must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(items):
        if not isinstance(message, dict):
            raise BadRow(f"{key}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = message.get(role_key)
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise BadRow(f"{key}[{i}].{role_key} is {role!r}; expected one of system, user, assistant (or human, gpt)")
        content = message.get(content_key)
        if not isinstance(content, str):
            raise BadRow(f"{key}[{i}].{content_key} must be a string, not {type(content).__name__}")
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    return tuple(messages)


def _check_chat(messages: tuple[dict, ...], key: str) -> Chat:
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise BadRow(f"'{key}' has no assistant turn to learn from")
    for i in answers:
        if not messages[i]["content"].strip():
            raise BadRow(f"{key}[{i}] is an empty assistant turn")
    if messages[0]["role"] == "assistant":
        raise BadRow(f"'{key}' starts with an assistant turn; a conversation starts with a user (or system) turn")
    return Chat(messages)


def _messages(row: dict) -> Chat:
    return _check_chat(normalize_messages(row.get("messages"), key="messages"), "messages")


def _sharegpt(row: dict) -> Chat:
    items = row.get("conversations")
    role_key, content_key = ("from", "value")
    if isinstance(items, list) and items and isinstance(items[0], dict) and "role" in items[0]:
        role_key, content_key = ("role", "content")
    messages = normalize_messages(items, key="conversations", role_key=role_key, content_key=content_key)
    return _check_chat(messages, "conversations")


def _prompt_completion(row: dict):
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = normalize_messages(prompt, key="prompt") + normalize_messages(completion, key="completion")
        return _check_chat(messages, "completion")
    return Raw(((_text(row, "prompt", allow_empty=True), False), (_text(row, "completion"), True)))


def _plain_text(row: dict) -> Raw:
    return Raw(((_text(row, "text"), True),))


def _answer(value, key: str) -> tuple[dict, ...]:
    """A chosen/rejected answer: a string, or assistant message(s)."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"field '{key}' is empty")
        return ({"role": "assistant", "content": value},)
    messages = normalize_messages(value, key=key)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRow(f"'{key}' has no non-empty assistant turn")
    return messages


def _preference(row: dict) -> Preference:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise BadRow(f"missing field '{key}'")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row and isinstance(chosen, str) and isinstance(rejected, str):
        return split_hh_dialogues(chosen, rejected)
    if "prompt" not in row:
        # Conversational pairs: both lists share the prompt turns and differ in the last answer.
        chosen_m, rejected_m = normalize_messages(chosen, key="chosen"), normalize_messages(rejected, key="rejected")
        shared = 0
        while shared < min(len(chosen_m), len(rejected_m)) - 1 and chosen_m[shared] == rejected_m[shared]:
            shared += 1
        prompt = chosen_m[:shared]
        if not prompt or prompt[-1]["role"] == "assistant":
            raise BadRow("chosen and rejected share no prompt turns ending in a user turn")
        return Preference(prompt, _answer(list(chosen_m[shared:]), "chosen"), _answer(list(rejected_m[shared:]), "rejected"))
    prompt = row["prompt"]
    prompt_m = ({"role": "user", "content": _text(row, "prompt")},) if not isinstance(prompt, list) else normalize_messages(prompt, key="prompt")
    return Preference(prompt_m, _answer(chosen, "chosen"), _answer(rejected, "rejected"))


def _kto(row: dict) -> Preference:
    label = row.get("label")
    if not isinstance(label, bool):
        raise BadRow(f"field 'label' must be true or false, not {label!r}")
    prompt = row.get("prompt")
    prompt_m = ({"role": "user", "content": _text(row, "prompt")},) if not isinstance(prompt, list) else normalize_messages(prompt, key="prompt")
    return Preference(prompt_m, _answer(row.get("completion"), "completion"), (), label)


def split_hh_dialogues(chosen: str, rejected: str) -> Preference:
    """Split hh-rlhf style "\\n\\nHuman: ... \\n\\nAssistant: ..." pairs into prompt and answers.

    The prompt is the longest common prefix that ends at an "\\n\\nAssistant:" marker; the
    rest of each string is that side's final answer.
    """
    cut = -1
    start = 0
    while True:
        at = chosen.find(HH_ASSISTANT, start)
        if at < 0:
            break
        end = at + len(HH_ASSISTANT)
        if rejected[:end] == chosen[:end]:
            cut = end
        start = end
    if cut < 0:
        raise BadRow("chosen and rejected share no dialogue prefix ending in '\\n\\nAssistant:'")
    prompt = parse_hh_turns(chosen[:cut])
    chosen_answer, rejected_answer = chosen[cut:].strip(), rejected[cut:].strip()
    if HH_HUMAN in chosen_answer or HH_HUMAN in rejected_answer:
        raise BadRow("an answer continues the dialogue after the shared prompt; expected one final assistant reply")
    return Preference(prompt, _answer(chosen_answer, "chosen"), _answer(rejected_answer, "rejected"))


def parse_hh_turns(text: str) -> tuple[dict, ...]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant messages."""
    messages = []
    rest = text
    if not rest.startswith(HH_HUMAN):
        raise BadRow("an hh-rlhf dialogue must start with '\\n\\nHuman:'")
    while rest:
        if rest.startswith(HH_HUMAN):
            role, rest = "user", rest[len(HH_HUMAN):]
        elif rest.startswith(HH_ASSISTANT):
            role, rest = "assistant", rest[len(HH_ASSISTANT):]
        else:
            raise BadRow("cannot parse the dialogue turns")
        nxt = [i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(nxt) if nxt else len(rest)
        content = rest[:end].strip()
        if content:
            messages.append({"role": role, "content": content})
        rest = rest[end:]
    if not messages or messages[-1]["role"] != "user":
        raise BadRow("the shared dialogue prompt must end with a Human turn")
    return tuple(messages)


_CONVERTERS = {
    "alpaca": _alpaca,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _plain_text,
    "preference": _preference,
    "kto": _kto,
}

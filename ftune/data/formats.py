"""Turn rows of any supported format into one of four shapes ftune trains on.

- `Chat`: a conversation (system/user/assistant/tool messages, tool calls, reasoning: see
  conversation.py), rendered with a chat template; loss goes on assistant turns.
- `Raw`: text segments, each trained or not, with no template: plain text for continued
  pretraining, and prompt/completion pairs written as plain strings.
- `Preference`: a prompt conversation with a chosen and a rejected answer, or (for KTO)
  one answer with a desirable/undesirable label.
- `Prompt` (GRPO): a conversation ending with the user turn the model answers, with the
  row's other columns for the reward functions.

The shapes themselves, and `BadRow`, are in samples.py. A row that cannot be used raises
`BadRow` with the reason; the caller adds the place.
"""

from __future__ import annotations

from dataclasses import replace

from ftune.data import conversation  # messages and sharegpt rows: tool calls, tool results, reasoning
from ftune.data.samples import ROLE_ALIASES, BadRow, Chat, Preference, Prompt, Raw, kind

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


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
    """Apply a recipe's `columns:` mapping (ftune name -> the user's column name).

    Every value is taken from the row as read, so a mapping that swaps two names swaps them.
    """
    if not columns:
        return row
    missing = [f"'{theirs}' (mapped to '{ours}')" for ours, theirs in columns.items() if theirs not in row]
    if missing:
        raise BadRow(f"column {', '.join(missing)} is missing" if len(missing) == 1 else f"columns {', '.join(missing)} are missing")
    mapped = set(columns.values())
    out = {key: value for key, value in row.items() if key not in mapped}
    out.update({ours: row[theirs] for ours, theirs in columns.items()})
    return out


def convert_row(data, fmt: str, *, columns: dict[str, str], tools: tuple[dict, ...], allowed: set[str], place: str) -> tuple[object, str]:
    """A row as read, as a sample, and its format: `fmt`, or with "auto" the one this row's columns tell.

    BadRow: this row cannot be used (counted or fatal, as data.on_bad_row says). FtuneError: rows of
    its format cannot train this stage at all.
    """
    data = rename_columns(data, columns) if isinstance(data, dict) else data
    if fmt == "auto":
        if not isinstance(data, dict):
            raise BadRow(f"a row must be an object with named fields, not {kind(data)}")
        fmt = detect_format(data)
    check_allowed(fmt, allowed, place)
    return convert(data, fmt, tools=tools), fmt


def check_allowed(fmt: str, allowed: set[str], place: str) -> None:
    if fmt not in allowed:
        from ftune.errors import FtuneError

        raise FtuneError(f"rows in {fmt} format cannot train this stage (expected {', '.join(sorted(allowed))})",
                         place=place, hint="set `format:` for this source in the recipe")


def convert(row: dict, fmt: str, *, tools: tuple[dict, ...] = ()):
    """Convert one row of a known format. `tools`: the source's function specs, for conversations without their own."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be an object with named fields, not {kind(row)}")
    if fmt in ("messages", "sharegpt"):
        return (conversation.messages_chat if fmt == "messages" else conversation.sharegpt_chat)(row, tools)
    return _CONVERTERS[fmt](row)


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise BadRow(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, not {kind(value)}")
    if not allow_empty and not value.strip():
        raise BadRow(f"field '{key}' is empty")
    return value


def _alpaca(row: dict) -> Chat:
    instruction = _text(row, "instruction")
    extra, system = (_optional_text(row, key) for key in ("input", "system"))
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    if system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return Chat(tuple(messages))


def _optional_text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, not {kind(value)}")
    return value


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
            raise BadRow(f"{key}[{i}].{content_key} must be a string, not {kind(content)}")
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
    pair = _pair(row)
    if _answer_text(pair.chosen) == _answer_text(pair.rejected):
        # Identical answers give no preference to learn, only a constant loss.
        raise BadRow("chosen and rejected are the same answer (ignoring whitespace): there is nothing to prefer")
    return replace(pair, margin=row.get("margin")) if "margin" in row else pair


def _answer_text(messages: tuple[dict, ...]) -> str:
    return " ".join(" ".join(m["content"] for m in messages).split())


def _pair(row: dict) -> Preference:
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


# CSV has no booleans, and some datasets write labels as 1/0.
KTO_LABELS = {True: True, False: False, 1: True, 0: False, "true": True, "false": False, "1": True, "0": False}


def _kto(row: dict) -> Preference:
    raw = row.get("label")
    if raw is None:
        raise BadRow("missing field 'label'")
    key = raw.strip().lower() if isinstance(raw, str) else raw
    if not isinstance(key, (bool, int, float, str)) or key not in KTO_LABELS:
        shown = repr(raw) if isinstance(raw, (str, int, float)) else kind(raw)
        raise BadRow(f"field 'label' must be true or false (or 1/0), not {shown}")
    label = KTO_LABELS[key]
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


def _prompts(row: dict) -> Prompt:
    """A `prompt` column (text, or messages ending with a user turn), or `messages` ending with a user turn."""
    key = "prompt" if row.get("prompt") is not None else "messages" if row.get("messages") is not None else None
    if key is None:
        raise BadRow("a prompt row needs a 'prompt' column (text, or messages ending with a user turn) "
                     "or 'messages' ending with a user turn")
    given = row[key]
    messages = normalize_messages(given, key=key) if isinstance(given, list) else ({"role": "user", "content": _text(row, key)},)
    if messages[-1]["role"] != "user":
        raise BadRow(f"'{key}' ends with a {messages[-1]['role']} turn; a prompt ends with the user turn the model answers")
    if not messages[-1]["content"].strip():
        raise BadRow(f"'{key}' ends with an empty user turn")
    return Prompt(messages, given, {k: v for k, v in row.items() if k != key})


_CONVERTERS = {
    "prompts": _prompts,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "text": _plain_text,
    "preference": _preference,
    "kto": _kto,
}

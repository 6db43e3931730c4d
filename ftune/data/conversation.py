"""Conversations as inference servers receive them: tools, tool calls, tool results, reasoning.

Rows in the OpenAI `messages` shape (and ShareGPT's `conversations`, whose `function_call` and
`observation` turns map onto tool calls and tool results) become the messages a chat template
is given, normalised the way vLLM normalises a chat request before rendering it:

- content is a string (`null` becomes "", a list of text parts is joined with newlines);
- an assistant's `tool_calls` are {"id"?, "type": "function", "function": {"name", "arguments"}}
  with `arguments` a JSON object (a JSON string is parsed; templates call `tojson` on it);
  an empty list is dropped, so templates that test `'tool_calls' in message` take the text path;
- an assistant's reasoning (`reasoning_content`, `reasoning` or `thinking`) is kept under
  `reasoning_content`; how it reaches the template is the formatter's business (chat.py);
- a tool turn keeps `tool_call_id` and `name` when given.

Tools (JSON-schema function specs) come from the row's `tools` (a list, or a JSON string of
one, as many datasets store it) or the source's `tools:` in the recipe.
"""

from __future__ import annotations

from ftune.data.samples import ROLE_ALIASES, BadRow, Chat, kind
from ftune.errors import FtuneError
from ftune.guards import textio

TOOL_ROLES = {"tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
ROLE_NAMES = "system, user, assistant, tool (or human, gpt, function_call, observation)"


def parse_tools(value, key: str = "tools") -> tuple[dict, ...]:
    """Function specs in OpenAI's form {"type": "function", "function": {"name", ...}}; bare specs are wrapped."""
    if value is None:
        return ()
    if isinstance(value, str):
        if not value.strip():
            return ()
        value = _json_text(value, f"field '{key}' is a string but not JSON")
    if not isinstance(value, list):
        raise BadRow(f"field '{key}' must be a list of function specs, not {kind(value)}")
    tools = []
    for i, spec in enumerate(value):
        if not isinstance(spec, dict):
            raise BadRow(f"{key}[{i}] must be an object (a function spec), not {kind(spec)}")
        function = spec.get("function", spec) if spec.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise BadRow(f"{key}[{i}] must be a function spec: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadRow(f"{key}[{i}] has no function name")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise BadRow(f"{key}[{i}].parameters must be a JSON-schema object, not {kind(function['parameters'])}")
        if "description" in function and not isinstance(function["description"], str):
            raise BadRow(f"{key}[{i}].description must be a string, not {kind(function['description'])}")
        tools.append({"type": "function", "function": dict(function)})
    names = [t["function"]["name"] for t in tools]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BadRow(f"field '{key}' defines {', '.join(map(repr, repeated))} more than once")
    return tuple(tools)


def messages_chat(row: dict, source_tools: tuple[dict, ...] = ()) -> Chat:
    """A `messages` row: OpenAI-style messages, with the row's tools or else the source's."""
    tools = parse_tools(row["tools"]) if row.get("tools") is not None else tuple(source_tools)
    items = row.get("messages")
    _check_list(items, "messages")
    messages = [_message(item, f"messages[{i}]") for i, item in enumerate(items)]
    return check_conversation(tuple(messages), "messages", tools)


def sharegpt_chat(row: dict, source_tools: tuple[dict, ...] = ()) -> Chat:
    """A ShareGPT row: from/value turns; function_call and observation become tool calls and results."""
    tools = parse_tools(row["tools"]) if row.get("tools") is not None else tuple(source_tools)
    items = row.get("conversations")
    _check_list(items, "conversations")
    role_key, content_key = ("role", "content") if isinstance(items[0], dict) and "role" in items[0] else ("from", "value")
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"conversations[{i}]"
        if not isinstance(item, dict):
            raise BadRow(f"{where} must be an object with '{role_key}' and '{content_key}'")
        role = item.get(role_key)
        if isinstance(role, str) and role.lower() == "function_call":
            calls = _sharegpt_calls(item.get(content_key), f"{where}.{content_key}")
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
                previous["tool_calls"] = calls  # "gpt" text, then its call: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        messages.append(_message({**item, "role": role, "content": item.get(content_key)}, where, role_key, content_key))
    return check_conversation(tuple(messages), "conversations", tools)


def _check_list(items, key: str) -> None:
    if not isinstance(items, list) or not items:
        raise BadRow(f"field '{key}' must be a non-empty list of messages")


def _message(item, where: str, role_key: str = "role", content_key: str = "content") -> dict:
    if not isinstance(item, dict):
        raise BadRow(f"{where} must be an object with '{role_key}' and '{content_key}'")
    raw_role = item.get("role")
    lowered = raw_role.lower() if isinstance(raw_role, str) else None
    role = ROLE_ALIASES.get(lowered) or TOOL_ROLES.get(lowered)
    if role is None:
        raise BadRow(f"{where}.{role_key} is {raw_role!r}; expected one of {ROLE_NAMES}")
    message = {"role": role, "content": _content(item.get("content"), f"{where}.{content_key}", role)}
    if role == "assistant":
        calls = item.get("tool_calls")
        if calls is None and isinstance(item.get("function_call"), dict):  # OpenAI's older single-call field
            calls = [{"type": "function", "function": item["function_call"]}]
        if calls is not None:
            if not isinstance(calls, list):
                raise BadRow(f"{where}.tool_calls must be a list, not {kind(calls)}")
            if calls:
                message["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
        for key in REASONING_KEYS:
            value = item.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise BadRow(f"{where}.{key} must be a string, not {kind(value)}")
            if value.strip():
                message["reasoning_content"] = value
            break
    for key in ("tool_call_id", "name") if role == "tool" else ("name",):
        value = item.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRow(f"{where}.{key} must be a string, not {kind(value)}")
        message[key] = value
    return message


def _content(value, where: str, role: str) -> str:
    if value is None:
        if role in ("assistant", "tool"):
            return ""  # an assistant turn that only calls tools; an empty tool result
        raise BadRow(f"{where} must be a string, not null")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        texts = [p.get("text") for p in value]
        if not all(isinstance(t, str) for t in texts):
            raise BadRow(f"{where} has a text part whose 'text' is not a string")
        return "\n".join(texts)
    if role == "tool" and isinstance(value, (dict, list, int, float, bool)):
        try:  # a structured tool result, sent as the JSON text a client sends
            return textio.dumps(value, ensure_ascii=False)
        except FtuneError:
            raise BadRow(f"{where} holds a NaN or infinite number, which JSON cannot carry") from None
    raise BadRow(f"{where} must be a string (or a list of text parts), not {kind(value)}")


def _tool_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise BadRow(f"{where} must be an object, not {kind(call)}")
    function = call.get("function", call)  # {"name", "arguments"} without the wrapper, as some datasets write it
    if not isinstance(function, dict):
        raise BadRow(f"{where}.function must be an object with 'name' and 'arguments', not {kind(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRow(f"{where} has no function name")
    out = {"type": "function", "function": {"name": name, "arguments": _arguments(function.get("arguments"), where)}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise BadRow(f"{where}.id must be a string, not {kind(call['id'])}")
        out = {"id": call["id"], **out}
    return out


def _arguments(value, where: str) -> dict:
    # vLLM hands templates a dict: OpenAI sends a JSON string, and templates `tojson` what they get.
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        value = _json_text(value, f"{where}.function.arguments is not valid JSON")
    if not isinstance(value, dict):
        raise BadRow(f"{where}.function.arguments must be a JSON object, not {kind(value)}")
    return value


def _json_text(text: str, problem: str):
    """JSON inside a field (tool specs, call arguments): bounded like any JSON ftune reads; a bad one is a bad row."""
    try:
        return textio.loads(text, "field")
    except FtuneError as exc:
        raise BadRow(f"{problem}: {exc.message.removeprefix('invalid JSON: ')}") from None


def _sharegpt_calls(value, where: str) -> list[dict]:
    if isinstance(value, str):
        value = _json_text(value, f"{where} of a function_call turn must be JSON {{\"name\", \"arguments\"}}")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise BadRow(f"{where} of a function_call turn holds no call")
    return [_tool_call(call, f"{where}[{j}]" if isinstance(value, list) else where) for j, call in enumerate(calls)]


def check_conversation(messages: tuple[dict, ...], key: str, tools: tuple[dict, ...] = ()) -> Chat:
    """The rules a conversation must follow to train on, whatever the template."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise BadRow(f"'{key}' has no assistant turn to learn from")
    if messages[0]["role"] in ("assistant", "tool"):
        raise BadRow(f"'{key}' starts with {'an assistant' if messages[0]['role'] == 'assistant' else 'a tool'} turn; "
                     "a conversation starts with a user (or system) turn")
    names = {t["function"]["name"] for t in tools}
    open_ids: set[str] = set()  # ids of the latest assistant turn's calls
    calls_before = False
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if not m["content"].strip() and "tool_calls" not in m:
                raise BadRow(f"{key}[{i}] is an empty assistant turn")
            calls = m.get("tool_calls", [])
            for j, call in enumerate(calls):
                name = call["function"]["name"]
                if names and name not in names:
                    raise BadRow(f"{key}[{i}].tool_calls[{j}] calls '{name}', which is not among the tools ({', '.join(sorted(names))})")
            open_ids = {c["id"] for c in calls if "id" in c}
            calls_before = bool(calls)
        elif m["role"] == "tool":
            if not calls_before:
                raise BadRow(f"{key}[{i}] is a tool result with no assistant tool call before it")
            call_id = m.get("tool_call_id")
            if call_id is not None and open_ids and call_id not in open_ids:
                raise BadRow(f"{key}[{i}].tool_call_id '{call_id}' matches no call of the assistant turn before it "
                             f"({', '.join(sorted(open_ids))})")
        else:
            calls_before, open_ids = False, set()
    return Chat(messages, tools)


def source_tools(specs, place: str) -> tuple[dict, ...]:
    """A source's `tools:` from the recipe, normalised once (a problem names the source, not a row)."""
    from ftune.errors import FtuneError

    try:
        return parse_tools(list(specs) if specs else None, key="tools")
    except BadRow as exc:
        raise FtuneError(f"the source's {exc}", place=place) from None

"""Which chat template a run uses, and what that template does with tools and reasoning.

`data.chat_template` is `auto` (the tokenizer's own), a name ftune ships (chatml, alpaca,
llama3), a Jinja file (relative to the recipe; a `.json` file is read for its
"chat_template" key, as tokenizer_config.json and chat_template.json hold it), or the
template itself inline. Whatever it is, the text is what gets saved with the adapter, so
`ftune merge`, `ftune export-gguf` and any server loading the tokenizer use the same one.

Every rendering goes through `render`: bounded in time (RENDER_SECONDS, a template whose loops
run away is an error naming the template), and a template that raises on a conversation makes
that conversation a bad row (`TemplateFailed`, counted or fatal as data.on_bad_row says, with its
file and line) wherever it is rendered: training data, GRPO prompts, inspect, evaluation prompts.

`end_of_turn` finds the token that closes an answer, and refuses a template whose generation
prompt is not the start of its rendering of an answered turn (what the model is trained on
would never be what it is served). A template's habits are learnt by rendering probe
conversations through it, not by reading its source: whether the tool specs and tool calls
appear at all, and whether it reads an assistant's `reasoning_content` field or expects
reasoning inline in the content between think tags (which tags: the first pair the
template's text mentions, `<think>` otherwise).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ftune.data.formats import BadRow
from ftune.errors import FtuneError
from ftune.guards import textio, timelimit

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
THINK_TAGS = (("<think>", "</think>"), ("<seed:think>", "</seed:think>"), ("[THINK]", "[/THINK]"), ("◁think▷", "◁/think▷"))
MAX_TEMPLATE_BYTES = 1 << 20
RENDER_SECONDS = 10  # the most one rendering of one conversation may take; real templates take milliseconds

_PROBE_TOOL = "ftune_probe_tool"
_PROBE_REASONING = "ftune probe reasoning"
_PROBE_ARGS = {"ftune_probe_argument": 7}


class TemplateFailed(FtuneError, BadRow):
    """The template raised on this conversation: a bad row where rows are read, an error elsewhere."""


class TemplateTooSlow(FtuneError):
    """The template ran past RENDER_SECONDS: the template itself is at fault, not one row."""


def render(tokenizer, messages, *, template: str, name: str, tools=None, add_generation_prompt: bool = False) -> str:
    """The conversation rendered with `template` (named `name` in messages), within RENDER_SECONDS."""
    try:
        with timelimit.within(RENDER_SECONDS):
            return tokenizer.apply_chat_template(list(messages), tools=tools, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
    except timelimit.TimeUp:
        source = f" (of {tokenizer.name_or_path})" if "tokenizer" in name and getattr(tokenizer, "name_or_path", None) else ""
        raise TemplateTooSlow(f"{name}{source} took more than {RENDER_SECONDS} s to render one conversation: its loops run away",
                              hint="fix the template (data.chat_template names another), or the row that makes it loop") from None
    except FtuneError:
        raise
    except Exception as exc:  # the template's raise_exception, or a jinja error on this conversation's shape
        raise TemplateFailed(f"{name} cannot render this conversation: {str(exc) or type(exc).__name__}") from None


@dataclass(frozen=True)
class ChosenTemplate:
    template: str  # the Jinja text rendered for conversations without tools
    tool_template: str | None  # a tokenizer's separate "tool_use" template, for conversations with tools
    name: str  # for messages: "the tokenizer's chat template", "the template in tools.jinja", ...
    saved: str | None  # what to store as the tokenizer's chat_template with the adapter (None: it already is)


@dataclass(frozen=True)
class TemplateStyle:
    """What a template does with the parts of a conversation beyond plain text, found by probing."""

    renders_tools: bool | None  # the tool specs appear in the prompt (None: the template rejected the probe)
    renders_calls: bool | None  # an assistant's tool_calls appear in its turn
    reasoning_field: bool  # it reads `reasoning_content` (else reasoning goes inline in content)
    think: tuple[str, str]  # the tags around inline reasoning


def is_inline(value: str) -> bool:
    return "{{" in value or "{%" in value


def choose_template(tokenizer, value: str, base_dir: Path | None) -> ChosenTemplate:
    own = tokenizer.chat_template
    if value == "auto":
        if isinstance(own, dict):  # several named templates: transformers picks "tool_use" when tools are given
            default = own.get("default") or next(iter(own.values()))
            return ChosenTemplate(default, own.get("tool_use"), "the tokenizer's chat template", None)
        if own:
            return ChosenTemplate(own, None, "the tokenizer's chat template", None)
        return ChosenTemplate(NAMED_TEMPLATES["chatml"], None, "chatml (the tokenizer has no chat template)", NAMED_TEMPLATES["chatml"])
    if value in NAMED_TEMPLATES:
        return ChosenTemplate(NAMED_TEMPLATES[value], None, f"the {value} template", NAMED_TEMPLATES[value])
    if is_inline(value):
        text, name = value, "data.chat_template (inline)"
    else:
        text, name = _read_template_file(value, base_dir), f"the chat template in {value}"
    _check_syntax(text, name)
    return ChosenTemplate(text, None, name, text)


def _read_template_file(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    hint = "data.chat_template is auto, chatml, alpaca, llama3, a Jinja file (relative to the recipe) or the template inline"
    if not path.is_file():
        close = difflib.get_close_matches(value, ["auto", *NAMED_TEMPLATES], n=1, cutoff=0.6)
        if close and "/" not in value and "." not in value:
            hint = f"did you mean '{close[0]}'?"
        what = "a directory, not a file" if path.is_dir() else "does not exist"
        raise FtuneError(f"data.chat_template names the file {path}, which {what}", hint=hint)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise FtuneError(f"cannot read the chat template file: {exc.strerror or exc}", place=str(path)) from None
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise FtuneError(f"the chat template file is larger than {MAX_TEMPLATE_BYTES >> 20} MiB; is this the right file?", place=str(path))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FtuneError(f"the chat template file is not UTF-8 text (byte {exc.start})", place=str(path)) from None
    if path.suffix.lower() == ".json":
        data = textio.loads(text, str(path), lines=True)
        text = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise FtuneError("a .json chat template file must hold {\"chat_template\": \"...\"} with the template as a string",
                             place=str(path))
    if not text.strip():
        raise FtuneError("the chat template file is empty", place=str(path))
    return text


def _check_syntax(text: str, name: str) -> None:
    import jinja2
    from transformers.utils.chat_template_utils import (
        _compile_jinja_template,  # the environment templates run in
    )

    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise FtuneError(f"{name} is not a valid Jinja template: line {exc.lineno}: {exc.message}") from None


PROBE_TOOL_SPEC = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "A probe.", "parameters": {
    "type": "object", "properties": {"ftune_probe_argument": {"type": "integer"}}}}}


def probe_style(render, source: str) -> TemplateStyle:
    """Render probe conversations through `render(messages, tools=..., add_generation_prompt=...)`."""
    tool = PROBE_TOOL_SPEC
    user = {"role": "user", "content": "Say hi."}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": _PROBE_TOOL, "arguments": _PROBE_ARGS}}]}
    answer = {"role": "assistant", "content": "Hi there, friend.", "reasoning_content": _PROBE_REASONING, "reasoning": _PROBE_REASONING}
    renders_tools = _appears(lambda: render([user], tools=[tool], add_generation_prompt=True), _PROBE_TOOL)
    renders_calls = _appears(lambda: render([user, call], tools=[tool]), _PROBE_TOOL)
    if renders_calls is None:  # some templates insist on tool specs or ids of their own: try without tools
        renders_calls = _appears(lambda: render([user, call]), _PROBE_TOOL)
    reasoning_field = bool(_appears(lambda: render([user, answer]), _PROBE_REASONING)
                           or _appears(lambda: render([user, answer], tools=[tool]), _PROBE_REASONING))
    think = next((pair for pair in THINK_TAGS if pair[0] in source and pair[1] in source), THINK_TAGS[0])
    return TemplateStyle(renders_tools, renders_calls, reasoning_field, think)


def _appears(render, needle: str) -> bool | None:
    try:
        return needle in render()
    except TemplateTooSlow:
        raise
    except Exception:  # jinja raises many kinds of errors for a template it cannot render
        return None


_PROBE_USER = "Say hi."
_PROBE_ANSWER = "Hi there, friend."


def common_prefix(a: str, b: str) -> int:
    """How many characters a and b share from the start."""
    if a.startswith(b):
        return len(b)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def end_of_turn(tokenizer, template: str, name: str, *, strict: bool = True) -> str:
    """The special token that closes an assistant answer under this template.

    `strict`: a template whose prompt is not the start of its rendering with the answer is an
    error here (the render proof would fail on every conversation); otherwise the proof reports it.
    """
    conversation = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    problem = None
    for tools in (None, [PROBE_TOOL_SPEC]):  # some tool-use templates render nothing without tools
        try:
            prefix = render(tokenizer, conversation[:1], template=template, name=name, tools=tools, add_generation_prompt=True)
            whole = render(tokenizer, conversation, template=template, name=name, tools=tools)
            break
        except TemplateTooSlow:
            raise
        except Exception as exc:  # jinja raises many kinds of errors for a template it cannot render
            problem = problem or exc
    else:
        raise FtuneError(f"{name} cannot render a simple conversation: {problem}")
    if not whole.startswith(prefix) and strict:
        at = common_prefix(whole, prefix)
        raise FtuneError(
            f"{name} renders the prompt differently once the answer is added, so what training shows the model is not "
            f"what it sees at inference: at character {at} the prompt has {prefix[at:at + 24]!r}, the conversation "
            f"{whole[at:at + 24]!r}",
            hint="set data.chat_template to a template whose generation prompt starts each answer as it is rendered "
                 "(or chatml, alpaca, llama3); data.render_check: warn trains anyway",
        )
    at = whole.find(_PROBE_ANSWER, common_prefix(whole, prefix))
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

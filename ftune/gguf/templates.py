"""Chat template styles: which one a model's jinja template is, its end-of-turn token, and its Go form.

llama.cpp reads the jinja template from the GGUF itself; Ollama needs a Go template in the
Modelfile. A style is recognised by its marker strings, then proven: the model's own jinja
template (run by transformers) and this style's renderer must produce the same text for a few
probe conversations. `go_template` is the same renderer written in Ollama's template language
(`.System`, `.Messages`), so a style that passes the probes gives Ollama the prompt the model
was trained on. A model whose template matches no style, or differs in detail, gets a warning.

Ollama renders `.System` (the request's or the Modelfile's SYSTEM) and then `.Messages`,
which also still holds system messages: the Go templates skip those in the loop, and count
turns with their own variables rather than message indexes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Turns = list[tuple[str, str]]  # (role, content), roles "user" / "assistant", alternating


@dataclass(frozen=True)
class ChatStyle:
    name: str
    markers: tuple[str, ...]
    """Strings that all appear in a jinja template of this style."""
    turn_end: str
    """The token that ends a turn: llama.cpp's end-of-turn (EOT) token."""
    stops: tuple[str, ...]
    """Ollama stop strings: the turn end and the markers that would start a new turn."""
    render: Callable[[Turns, str | None], str]
    """Prompt text for alternating turns ending with a user turn, ready for the reply (no BOS)."""
    go_template: str
    system_pattern: str | None = None
    """Regex capturing a system prompt at the start of a rendering (finds a built-in default)."""


def _chatml(turns: Turns, system: str | None) -> str:
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    text += "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + "<|im_start|>assistant\n"


_CHATML_GO = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def _llama3(turns: Turns, system: str | None) -> str:
    head = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
    text = head.format("system", system) if system else ""
    text += "".join(head.format(role, content) for role, content in turns)
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


_LLAMA3_GO = """\
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""


def _gemma(turns: Turns, system: str | None) -> str:
    # Gemma has no system role; Gemma 3's own template puts it atop the first user turn.
    text = ""
    for i, (role, content) in enumerate(turns):
        if i == 0 and system:
            content = f"{system}\n\n{content}"
        text += f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n{content}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


_GEMMA_GO = """\
{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""


def _phi3(turns: Turns, system: str | None) -> str:
    text = f"<|system|>\n{system}<|end|>\n" if system else ""
    text += "".join(f"<|{role}|>\n{content}<|end|>\n" for role, content in turns)
    return text + "<|assistant|>\n"


_PHI3_GO = """\
{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""


def _mistral(turns: Turns, system: str | None) -> str:
    # Mistral v0.3 and later: the system prompt joins the last user turn.
    last_user = max(i for i, (role, _) in enumerate(turns) if role == "user")
    text = ""
    for i, (role, content) in enumerate(turns):
        if role == "user":
            prefix = f"{system}\n\n" if system and i == last_user else ""
            text += f"[INST] {prefix}{content}[/INST]"
        else:
            text += f" {content}</s>"
    return text


_MISTRAL_GO = """\
{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""


def _mistral_v1(turns: Turns, system: str | None) -> str:
    # Mistral v0.1 / v0.2: spaces inside the brackets, no system role (it joins the first turn).
    text = ""
    for i, (role, content) in enumerate(turns):
        if role == "user":
            text += f"[INST] {system + chr(10) + chr(10) if system and i == 0 else ''}{content} [/INST]"
        else:
            text += f"{content}</s>"
    return text


_MISTRAL_V1_GO = """\
{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}</s>
{{- end }}
{{- end }}"""


def _llama2(turns: Turns, system: str | None) -> str:
    # Each user turn after the first starts a new sequence, so it carries its own <s>.
    text = ""
    for i, (role, content) in enumerate(turns):
        if role == "user":
            if i == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            text += ("" if i == 0 else "<s>") + f"[INST] {content} [/INST]"
        else:
            text += f" {content} </s>"
    return text


_LLAMA2_GO = """\
{{- $system := .System }}
{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}<s>{{ end }}[INST] {{ if $system }}<<SYS>>
{{ $system }}
<</SYS>>

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }} </s>
{{- end }}
{{- end }}"""


STYLES: list[ChatStyle] = [
    ChatStyle(
        "llama-3", ("<|start_header_id|>", "<|eot_id|>"), "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _llama3, _LLAMA3_GO,
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
    ChatStyle("chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", ("<|im_start|>", "<|im_end|>"), _chatml, _CHATML_GO, r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n"),
    ChatStyle("gemma", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), _gemma, _GEMMA_GO),
    ChatStyle("phi-3", ("<|user|>", "<|end|>"), "<|end|>", ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"), _phi3, _PHI3_GO, r"<\|system\|>\n(.*?)<\|end\|>\n"),
    ChatStyle("llama-2", ("[INST]", "<<SYS>>"), "</s>", ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "</s>"), _llama2, _LLAMA2_GO, r"\[INST\] <<SYS>>\n(.*?)\n<</SYS>>\n\n"),
    ChatStyle("mistral", ("[INST]", "[/INST]"), "</s>", ("[INST]", "[/INST]", "</s>"), _mistral, _MISTRAL_GO),
    ChatStyle("mistral-v1", ("[INST]", "[/INST]"), "</s>", ("[INST]", "[/INST]", "</s>"), _mistral_v1, _MISTRAL_V1_GO),
]

_PROBES: list[Turns] = [
    [("user", "Hello there.")],
    [("user", "What is 2+2?"), ("assistant", "It is 4."), ("user", "And 3+3?")],
]
_PROBE_SYSTEM = "You answer in one line."


@dataclass
class TemplateMatch:
    style: ChatStyle | None
    exact: bool
    """The model's template and the style's renderer agree on every probe conversation."""
    default_system: str | None = None
    """A system prompt the model's template inserts when the conversation has none."""
    notes: list[str] = field(default_factory=list)


def match_template(tokenizer: Any, *, runtime_adds_bos: bool) -> TemplateMatch:
    """Recognise the chat template of a transformers tokenizer and prove the style against it.

    `runtime_adds_bos`: llama.cpp and Ollama put BOS in front of the prompt themselves (the
    GGUF's add_bos_token), so a BOS the jinja template writes first is not part of the style.
    """
    source = tokenizer.chat_template
    if isinstance(source, dict):
        source = source.get("default") or next(iter(source.values()), None)
    if not source:
        return TemplateMatch(None, False, notes=["the model has no chat template; the Modelfile has no TEMPLATE"])
    candidates = [s for s in STYLES if all(marker in source for marker in s.markers)]
    if not candidates:
        return TemplateMatch(None, False, notes=["the chat template matches no known style (chatml, llama-3, gemma, phi-3, mistral, llama-2); the Modelfile has no TEMPLATE, so Ollama will guess one"])
    bos = tokenizer.bos_token if runtime_adds_bos else None
    proofs = [(style, *_prove(style, tokenizer, bos)) for style in candidates]
    style, agreed, total, default_system = max(proofs, key=lambda proof: proof[1])
    # The Go templates render text turns only; a template with tools loses them in Ollama (not in llama.cpp,
    # which runs the GGUF's own jinja template).
    tools = [f"the chat template renders tools and tool calls, which the Modelfile's {style.name} TEMPLATE does not: "
             "Ollama serves this model without tool calling; llama.cpp reads the GGUF's own template"] if _renders_tools(tokenizer) else []
    if total and agreed == total:
        return TemplateMatch(style, True, default_system, notes=tools)
    return TemplateMatch(
        style, False, default_system,
        notes=[f"the chat template looks like {style.name} but renders differently in detail; check the Modelfile TEMPLATE", *tools],
    )


def _renders_tools(tokenizer: Any) -> bool:
    probe = {"type": "function", "function": {"name": "ftune_probe_tool", "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."}], tools=[probe], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that refuses tools does not render them
        return False
    return "ftune_probe_tool" in text


def _prove(style: ChatStyle, tokenizer: Any, bos: str | None) -> tuple[int, int, str | None]:
    """(probe conversations rendered identically, probes the template accepts, its built-in default system prompt)."""
    default_system = None
    agreed = total = 0
    for turns in _PROBES:
        for system in (None, _PROBE_SYSTEM):
            expected = _render_hf(tokenizer, turns, system, bos)
            if expected is None:
                continue  # the template refuses this (e.g. Gemma 1 has no system role)
            if system is None and style.system_pattern:
                found = re.match(style.system_pattern, expected, re.DOTALL)
                if found and found.group(1) != "":
                    default_system = found.group(1)
            total += 1
            agreed += style.render(turns, system or default_system) == expected
    return agreed, total, default_system


def _render_hf(tokenizer: Any, turns: Turns, system: str | None, bos: str | None) -> str | None:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c} for r, c in turns]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # the template's raise_exception: it rejects this conversation shape
        return None
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text

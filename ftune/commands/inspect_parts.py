"""What `ftune inspect` shows for every stage (inspection.py for sft, inspect_stages.py for the others):
a sample's tokens, trained and masked; the memory table; and where it reads a model's config.
"""

from __future__ import annotations

from pathlib import Path

from ftune.data.rendering import IGNORE
from ftune.modeling import memory, models

TRAINED, MASKED = "bold green", "grey50"  # loss on the token / none; special tokens are shown reversed
# Where a tool call, a tool result or reasoning begins, a tag in this style says so (it is not a token).
KIND_TAGS, TAG = {"reasoning": "⟨reasoning⟩", "tool_call": "⟨tool call⟩", "tool_result": "⟨tool result⟩"}, "magenta"
KIND_STYLES = {"reasoning": "italic", "tool_call": "underline", "tool_result": "italic"}


def config_source(name: str, revision: str | None, base_dir: Path) -> str:
    """A local model directory, or a hub id read as is: inspect needs the config and tokenizer, never the weights."""
    local = Path(name).expanduser()
    if name == "demo" or name.startswith((".", "/", "~")) or local.exists() or (base_dir / local).exists():
        return models.resolve_model_path(name, revision=revision, base_dir=base_dir)
    return name


def render_sample(ids, labels, tokenizer, kinds: list[str] | None = None):
    """rich Text of one sample: trained tokens in TRAINED, masked in MASKED, special tokens literal and reversed.

    With `kinds` (chat.KINDS, one per token), reasoning, tool calls and tool results are tagged where
    they begin and styled (italic, underlined), in their trained or masked colour.
    """
    from rich.text import Text

    special = set(tokenizer.all_special_ids)
    text = Text()
    group: list[int] = []
    style = None
    previous = None
    for t, token in enumerate(ids):
        token = int(token)
        trained = t > 0 and labels[t] != IGNORE  # a sample's first token is never predicted
        kind = kinds[t] if kinds else None
        token_style = (TRAINED if trained else MASKED) + (f" {KIND_STYLES[kind]}" if kind in KIND_STYLES else "")
        if kind != previous and kind in KIND_TAGS:
            _flush(text, group, style, tokenizer)
            group, style = [], None
            text.append(KIND_TAGS[kind], style=TAG)
        previous = kind
        if token in special:
            _flush(text, group, style, tokenizer)
            group, style = [], None
            text.append(tokenizer.convert_ids_to_tokens(token), style=f"{token_style} reverse")
            continue
        if token_style != style:
            _flush(text, group, style, tokenizer)
            group, style = [], token_style
        group.append(token)
    _flush(text, group, style, tokenizer)
    return text


def _flush(text, group: list[int], style, tokenizer) -> None:
    # Decoding runs of tokens, not single tokens, keeps multi-byte characters whole.
    if group:
        piece = tokenizer.decode(group, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text.append(piece.replace("\n", "↵\n"), style=style)


def print_memory(estimate: memory.MemoryEstimate, console, *, gpu_gib: float) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"memory per GPU for one training step, checked against {gpu_gib:g} GiB (estimate)")
    table.add_column("what", style="bold")
    table.add_column("size", justify="right")
    table.add_column("formula")
    for line in estimate.lines:
        table.add_row(line.what, memory.gib(line.bytes), Text(line.formula))
    table.add_row("total", memory.gib(estimate.total), "", style="bold")
    console.print(table)
    other = "without" if estimate.checkpointing else "with"
    console.print(f"  {other} gradient checkpointing: {memory.gib(estimate.total_other)} "
                  f"(activations {memory.gib(estimate.other_activations.bytes)}: {estimate.other_activations.formula})",
                  highlight=False, markup=False)
    budget = gpu_gib * memory.GIB
    if estimate.total <= budget:
        console.print(f"  [green]fits[/]: {memory.gib(estimate.total)} of {gpu_gib:g} GiB "
                      f"({memory.gib(budget - estimate.total)} to spare)", highlight=False)
        return
    advice = []
    if not estimate.checkpointing and estimate.total_other <= budget:
        advice.append("set training.gradient_checkpointing: true")
    advice.append("lower training.tokens_per_pass (passes of fewer rows: the same update, less memory)")
    advice.append("or use quantization.load_in_4bit (QLoRA)")
    console.print(f"  [red]does not fit[/]: needs about {memory.gib(estimate.total)} of {gpu_gib:g} GiB; "
                  + "; ".join(advice), highlight=False)

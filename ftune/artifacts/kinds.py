"""The kinds of artifact ftune writes, and which command writes each: what lets a command replace
only an earlier output of its own kind (ownership.py), and name what it found when it refuses.

A directory records its kind in its output marker; a file is proven by the command that
writes it (a sidecar, metadata inside it, its first line). A leaf module: it imports nothing.
"""

from __future__ import annotations

# kind -> (what it is, in a refusal; the command that writes it)
KINDS: dict[str, tuple[str, str]] = {
    # directories
    "run": ("an ftune run", "ftune sft/dpo/rm/grpo"),
    "adapter": ("a run's adapter", "ftune sft/dpo/rm/grpo"),
    "trained-model": ("a run's trained model", "ftune sft/dpo/rm/grpo"),
    "checkpoint": ("a run's checkpoint", "ftune sft/dpo/rm/grpo"),
    "merged-model": ("a merged model", "ftune merge"),
    "curated-data": ("a curated-data folder", "ftune data"),
    "label-session": ("a labelling session", "ftune label"),
    "model-cache": ("ftune's converted demo model (its cache)", "ftune"),
    "data-cache": ("ftune's tokenized-data cache", "ftune"),
    # files
    "scores": ("a scores file", "ftune score"),
    "eval-results": ("an eval results file", "ftune eval"),
    "gguf": ("a GGUF file", "ftune export-gguf"),
    "gguf-parity": ("a GGUF parity report", "ftune export-gguf"),
    "gguf-report": ("a quantization report", "ftune export-gguf --report"),
    "modelfile": ("an Ollama Modelfile", "ftune export-gguf"),
    "unknown": ("an ftune output of a kind this version does not know", "another ftune version"),
}

# What a run writes inside itself: the only kinds that may be produced inside another artifact.
RUN_PARTS = frozenset({"adapter", "trained-model", "checkpoint"})


def describe(kind: str, stage: str | None = None) -> str:
    """'a run's adapter (written by ftune sft)': what a refusal found."""
    what, command = KINDS.get(kind, KINDS["unknown"])
    if stage and command == KINDS["run"][1]:
        command = f"ftune {stage}"
    return f"{what} (written by {command})"


def command(kind: str) -> str:
    """The command that writes `kind`, as a user types it."""
    return KINDS.get(kind, KINDS["unknown"])[1]

"""Prompts for online RL (GRPO): each row's conversation up to the answer, rendered with the
chat template and its generation prompt, tokenized, with the row's other columns and place.

A prompt longer than data.max_length - grpo.max_completion_length leaves no room for its
completion: it is cut from the left (the question, at the end, stays) or dropped, as
data.too_long says, and counted either way. A prompt the chat template cannot render is a bad
row, as in every stage (data.on_bad_row: error names it, skip counts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftune.data.chat_template import TemplateFailed
from ftune.data.pipeline import DataReport, Loaded, load_samples
from ftune.data.rendering import Formatter
from ftune.errors import FtuneError
from ftune.recipe import Recipe


@dataclass(frozen=True)
class PromptSet:
    ids: list[list[int]] = field(default_factory=list)  # the rendered prompt's tokens, generation prompt included
    messages: list[tuple[dict, ...]] = field(default_factory=list)  # the conversation up to the answer
    given: list = field(default_factory=list)  # the prompt as the data gave it (text or messages): what reward functions get
    columns: list[dict] = field(default_factory=list)  # the row's other columns
    places: list[str] = field(default_factory=list)  # "data.jsonl line 3"

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> PromptSet:
        return PromptSet(self.ids[:n], self.messages[:n], self.given[:n], self.columns[:n], self.places[:n])

    def text(self, i: int) -> str:
        """The prompt as shown in the run card: its last user turn's text."""
        given = self.given[i]
        return given if isinstance(given, str) else str(given[-1].get("content", ""))


def load_prompts(recipe: Recipe, formatter: Formatter, *, base_dir: Path) -> tuple[PromptSet, PromptSet, DataReport]:
    """Train and held-out prompts; rows are read, shuffled, capped and split as for every stage."""
    # `format: auto` means prompts here: a {prompt, answer} row is not an SFT format ftune could detect.
    section = recipe.data.model_copy(update={
        split: [s.model_copy(update={"format": "prompts"}) if s.format == "auto" else s for s in getattr(recipe.data, split)]
        for split in ("train", "eval")})
    train_rows, eval_rows, report, _ = load_samples(section, base_dir=base_dir, seed=recipe.training.seed, allowed={"prompts"})
    room = recipe.data.max_length - recipe.grpo.max_completion_length
    bad_rows = recipe.data.on_bad_row
    train = encode_prompts(formatter, train_rows, room, recipe.data.too_long, report, bad_rows)
    if len(train) == 0:
        raise FtuneError("no usable training prompts", hint="check data.max_length and grpo.max_completion_length")
    return train, encode_prompts(formatter, eval_rows, room, recipe.data.too_long, report, bad_rows), report


def encode_prompts(formatter: Formatter, loaded: Loaded, room: int, too_long: str, report: DataReport,
                   on_bad_row: str = "error") -> PromptSet:
    out = PromptSet()
    for prompt, place in zip(loaded.samples, loaded.places):
        try:
            text = formatter.render(formatter.with_system(prompt.messages), add_generation_prompt=True)
        except TemplateFailed as exc:  # this row's conversation: a bad row
            if on_bad_row == "error":
                raise FtuneError(exc.message, place=place, hint="fix the row, or set data.on_bad_row: skip") from None
            report.skipped_count += 1
            report.skipped.append(f"{place}: {exc.message}")
            continue
        except FtuneError as exc:  # the template itself (too slow): named with the row it was rendering
            raise FtuneError(exc.message, place=exc.place or place, hint=exc.hint) from None
        ids = formatter.tokenize(text)
        if len(ids) > room:
            if too_long == "drop":
                report.dropped_too_long += 1
                continue
            report.truncated += 1
            ids = ids[-room:]
        out.ids.append(ids)
        out.messages.append(prompt.messages)
        out.given.append(prompt.given)
        out.columns.append(prompt.columns)
        out.places.append(place)
    return out

"""The recipe's data section: sources, formats, chat template, mixtures, dedup and filters."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from ftune.recipe.sections import (
    MAX_COUNT,
    MAX_TOKENS,
    CrossFieldError,
    PathText,
    Section,
    _plain_path,
)

DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference", "kto", "prompts"]
# The columns each format reads (ftune/data/formats.py): what `columns:` may map a column to.
FORMAT_COLUMNS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "kto": ("prompt", "completion", "label"),
    "prompts": ("prompt", "messages"),
}


CHAT_TEMPLATE_NAMES = ("auto", "chatml", "alpaca", "llama3")


def _chat_template(value: str) -> str:
    if value in CHAT_TEMPLATE_NAMES or "{{" in value or "{%" in value:
        return value
    _plain_path(value)
    if "/" not in value and "." not in value:  # neither a name nor a file name: most likely a misspelt name
        close = difflib.get_close_matches(value, CHAT_TEMPLATE_NAMES, n=1, cutoff=0.5)
        raise ValueError(f"'{value}' is not one of {', '.join(CHAT_TEMPLATE_NAMES)}, a Jinja file (e.g. template.jinja) "
                         f"or an inline template" + (f"; did you mean '{close[0]}'?" if close else ""))
    return value


def _tool_specs(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, spec in enumerate(value):
        function = spec.get("function", spec)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise ValueError(f"tools[{i}] needs a function name: {{name: ..., description: ..., parameters: {{...}}}} "
                             "or OpenAI's {type: function, function: {name: ...}}")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise ValueError(f"tools[{i}].parameters must be a JSON-schema object")
    return value


class DataSource(Section):
    path: PathText = Field(
        description="A local .json, .jsonl, .parquet or .csv file (relative to the recipe), or a datasets hub name."
    )
    format: DataFormat = Field(
        "auto",
        description="Row format; auto detects it from the columns. preference: prompt/chosen/rejected, "
        "chosen/rejected message lists, or hh-rlhf dialogue pairs. kto: prompt/completion/label. prompts (stage: grpo; "
        "auto means prompts there): a prompt column (text, or messages ending with a user turn) or messages ending with a "
        "user turn; every other column goes to the reward functions.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Configuration name of a hub dataset.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map ftune's column names to yours, e.g. {instruction: question, output: answer}.",
    )
    samples: int | None = Field(None, gt=0, le=MAX_COUNT, description="Use at most this many rows of this source (after shuffling).")
    weight: float | None = Field(
        None, gt=0, le=1e6, description="Train sources: this source's share of each epoch's training samples, relative to "
        "the other sources' weights (every train source then needs one). Each epoch draws its share afresh from the "
        "source's samples, with the seed: without replacement unless data.replacement is true. See data.epoch_samples.",
    )
    streaming: bool = Field(
        False, description="A hub dataset read as a stream (datasets' streaming=True) instead of downloaded whole first; "
        "its tokenization cache is then keyed by its name, split and subset, not its contents.",
    )
    tools: Annotated[list[dict[str, Any]], AfterValidator(_tool_specs)] = Field(
        default_factory=list,
        description="Function specs (JSON schema, OpenAI's form or bare {name, description, parameters}) given to the "
        "chat template as `tools=` for this source's conversations that have no `tools` of their own.",
    )


class DedupSection(Section):
    exact: bool = Field(
        False, description="Remove rows whose text repeats an earlier row's after normalisation (Unicode NFKC, lower case, "
        "whitespace collapsed); the first is kept."
    )
    near: float | None = Field(
        None, gt=0.0, lt=1.0, description="Also remove near duplicates: rows sharing at least this share (Jaccard "
        "similarity) of their word 5-grams with an earlier kept row, found by MinHash LSH (datasketch); 0.8 is usual. "
        "Exact duplicates go too. The first is kept."
    )
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations for near: the similarity estimate's error is about "
        "1/sqrt(num_perm) (0.09 at 128); more is more precise, slower and larger."
    )


def _regexes(values: list[str]) -> list[str]:
    """Each refusal pattern compiles; a bad one is reported at its own line."""
    import re

    problems: list[tuple[tuple, str]] = []
    for i, value in enumerate(values):
        if not value:
            problems.append((("data", "filters", "refusal_patterns", i), "is empty; an empty pattern matches every answer"))
            continue
        try:
            re.compile(value)
        except re.error as exc:
            problems.append((("data", "filters", "refusal_patterns", i), f"{value!r} is not a valid regular expression: {exc}"))
    if problems:
        raise CrossFieldError(problems)
    return values


# The languages the language filter (py3langid's model) can tell apart, ISO 639 codes; zxx: no language.
LANGUAGE_CODES = (
    "ace af am an ar ary arz as az ba bcl be bg bn br bs ca crh cs cy da de dz el en eo es et eu ext fa fi fo fr fuv fy ga "
    "gcf gcr gd gl gom grc gu gug guw ha hbo he hi hr ht hu hy id ig is it ja jv ka kab kik kk km kn ko ku ky la lb lg lij "
    "ln lo lt ltg lv mg mk ml mn mr ms mt my ne nl nn no nso oc om or pa pcm pl ps pt qu ro ru rw sa sdh se si sk sl sn so "
    "sq sr st sv sw ta te tg th tk tl tr tt ug uk ur uz uzs vec vi vo wa wuu xh yo yue zh zu zxx"
).split()


def _languages(values: list[str]) -> list[str]:
    problems: list[tuple[tuple, str]] = []
    for i, value in enumerate(values):
        if value not in LANGUAGE_CODES:
            close = difflib.get_close_matches(value.lower(), LANGUAGE_CODES, n=1, cutoff=0.5)
            problems.append((("data", "filters", "languages", i), f"'{value}' is not a language code the filter knows (ISO "
                             "639-1 where there is one: en, de, fr, zh, ...)" + (f"; did you mean '{close[0]}'?" if close else "")))
    if problems:
        raise CrossFieldError(problems)
    return values


class FiltersSection(Section):
    min_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Remove rows whose rendered sample (chat template applied) has fewer tokens."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Remove rows whose rendered sample has more tokens (data.too_long cuts or "
        "drops at max_length instead, and counts them)."
    )
    empty_answers: bool = Field(
        False, description="Remove rows whose answer (an assistant turn, a completion, a text) has nothing left once "
        "reasoning, whitespace and invisible characters are taken out. Rows the format rejects outright are bad rows."
    )
    refusals: bool = Field(
        False, description="Remove rows with an answer matching ftune's list of refusal and AI-disclaimer phrases "
        "(ftune/data/cleaning.py: 'as an ai language model', 'i'm sorry, but i can't', 'i cannot help with', ...)."
    )
    refusal_patterns: Annotated[list[str], AfterValidator(_regexes)] = Field(
        default_factory=list, description="Your own refusal patterns, Python regular expressions searched in each "
        "answer after normalisation (NFKC, lower case, whitespace collapsed), ignoring case; applied even without refusals."
    )
    languages: Annotated[list[str], AfterValidator(_languages)] = Field(
        default_factory=list, description="Keep only rows in these languages (ISO 639 codes, e.g. [en, de]), as "
        "py3langid detects them over the row's text; a row it is unsure of (confidence below 0.8, as with very short "
        "texts) is kept."
    )

    @model_validator(mode="after")
    def _bounds(self) -> FiltersSection:
        if self.min_tokens is not None and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise CrossFieldError([("data.filters.max_tokens", f"{self.max_tokens} is below min_tokens ({self.min_tokens}): "
                                    "every row would be removed")])
        return self


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1, description="Training data: one or more sources, concatenated.")
    eval: list[DataSource] = Field(
        default_factory=list, description="Held-out data; when empty, eval_fraction of train is held out."
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of the training rows held out when no eval sources are given."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row that cannot be used stops the run (error) or is counted and skipped (skip)."
    )
    chat_template: Annotated[str, Field(min_length=1), AfterValidator(_chat_template)] = Field(
        "auto", description="auto uses the tokenizer's own chat template (chatml when it has none); or chatml, alpaca, "
        "llama3; or a Jinja file (relative to the recipe; a .json file's \"chat_template\" key) or the template inline. "
        "It is saved with the adapter, so merged models, GGUF files and Modelfiles carry it.",
    )
    system_prompt: str | None = Field(None, description="A system turn added to every conversation that has none.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Put loss on assistant turns only (with their end-of-turn token), or on every token."
    )
    reasoning: Literal["train", "mask", "drop"] = Field(
        "train", description="An assistant turn's reasoning (reasoning_content, or <think>...</think> inline): train it, "
        "mask it (rendered, no loss on its text), or drop it before rendering. Tool results never carry loss."
    )
    turns: Literal["all", "last", "split"] = Field(
        "all", description="Which assistant turns a conversation trains: all (one sample), last (one sample, loss on the "
        "final turn only), or split (one sample per assistant turn, its history rendered as at inference: for templates "
        "that rewrite earlier turns, such as Qwen3 dropping their reasoning)."
    )
    render_check: Literal["error", "warn"] = Field(
        "error", description="The render proof (before training and in `ftune inspect`): for the first 200 conversations, "
        "every trained assistant turn's tokens must equal what the chat template renders at inference. A mismatch stops "
        "the run (error) or is reported (warn)."
    )
    max_length: int = Field(1024, ge=16, le=MAX_TOKENS, description="Longest sample in tokens.")
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to a sample longer than max_length; either way it is counted."
    )
    packing: bool = Field(
        True, description="Pack samples into rows of max_length with no padding; each sample attends only to itself."
    )
    num_proc: int | None = Field(
        None, ge=1, le=256, description="Processes that read and tokenize the data (default: the CPU cores available, "
        "shared between a run's processes). The result is the same whatever the number.",
    )
    epoch_samples: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="With weighted train sources: training samples per epoch, split between the "
        "sources by their weights (default: every train sample available once, in the weights' proportions).",
    )
    replacement: bool = Field(
        False, description="With weighted train sources: a source may give more samples than it has (each repeated as "
        "evenly as possible: whole copies, then a seeded draw of the rest). Without it, asking a source for more samples "
        "than it has is an error before training.",
    )
    dedup: DedupSection = Field(
        default_factory=DedupSection, description="Duplicate rows removed as the data is read (and by `ftune data`)."
    )
    filters: FiltersSection = Field(
        default_factory=FiltersSection, description="Rows removed as the data is read (and by `ftune data`): by length "
        "in tokens, empty answers, refusals, language."
    )

    @model_validator(mode="after")
    def _mixture(self) -> DataSection:
        problems: list[tuple[str | tuple, str]] = []
        weighted = [s.weight is not None for s in self.train]
        if any(weighted) and not all(weighted):
            problems += [(("data", "train", i), f"train source {s.path} has no weight while another has one: give every "
                          "train source a weight (their shares of each epoch), or none") for i, s in enumerate(self.train) if s.weight is None]
        problems += [(("data", "eval", i, "weight"), "eval sources are not mixed: a weight applies to train sources only")
                     for i, s in enumerate(self.eval) if s.weight is not None]
        if not any(weighted):
            # (against the defaults: a run's resolved recipe spells every key out)
            problems += [(f"data.{key}", "applies only when the train sources have weights")
                         for key, unset in (("epoch_samples", None), ("replacement", False)) if getattr(self, key) != unset]
        if problems:
            raise CrossFieldError(problems)
        return self

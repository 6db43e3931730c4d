"""The online-RL sections: rewards (what scores a completion) and grpo (sampling, loss, KL)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ftune.recipe.sections import MAX_TOKENS, PathText, Section, _plain_path

REWARD_TYPES = ("exact_answer", "format", "length", "json", "function", "reward_model")
# The fields each reward type reads (besides type, weight and name): any other is an error.
REWARD_FIELDS = {"exact_answer": ("column", "pattern"), "format": ("regex",), "length": ("target",),
                 "json": (), "function": ("function", "timeout_s"), "reward_model": ("run",)}


def _regex(value: str | None) -> str | None:
    import re

    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


def _function_ref(value: str | None) -> str | None:
    if value is None:
        return value
    path, _, name = value.rpartition(":")
    if not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"'{value}' is not FILE.py:FUNCTION (e.g. rewards.py:correct, relative to the recipe)")
    _plain_path(path)
    return value


class RewardSection(Section):
    type: Literal["exact_answer", "format", "length", "json", "function", "reward_model"] = Field(
        description="exact_answer: 1 when the completion's final answer equals the row's `column` (the answer is the "
        "last `pattern` match's first group; default: the text of the last <answer>...</answer>, else the last number "
        "in the completion; numbers compare as numbers (42 equals 42.0, 1,000 equals 1000); "
        "other text compares with case and surrounding whitespace ignored), else 0. format: 1 when `regex` matches "
        "the completion (re.search, DOTALL), else 0. length: -|tokens - target| / grpo.max_completion_length (target 0: "
        "a pure length penalty). json: 1 when the completion (a ```json fence around it allowed) parses as JSON, else 0. "
        "function: your Python function `function`. reward_model: the score of an `ftune rm` run (`run`)."
    )
    weight: float = Field(1.0, description="This reward's weight in the total reward (the weighted sum over rewards).")
    name: str | None = Field(
        None, min_length=1, description="Name in metrics (reward_NAME); default: the type, or the function's name."
    )
    column: str = Field("answer", min_length=1, description="exact_answer: the data column holding the expected answer.")
    pattern: Annotated[str | None, AfterValidator(_regex)] = Field(
        None, description="exact_answer: a regular expression for the final answer; the last match counts, its first "
        "group (or the whole match) is the answer. Default: <answer>(.*?)</answer>, else the last number.",
    )
    regex: Annotated[str | None, AfterValidator(_regex)] = Field(
        None, description="format: the regular expression a well-formatted completion matches (re.search, DOTALL; "
        "anchor it with ^ and $ to match the whole completion)."
    )
    target: int = Field(0, ge=0, le=MAX_TOKENS, description="length: the completion length (tokens) with reward 0.")
    function: Annotated[str | None, AfterValidator(_function_ref)] = Field(
        None, description="function: FILE.py:FUNCTION, relative to the recipe. The file is loaded only because the "
        "recipe names it (it runs as Python: use your own). Called once per step as "
        "FUNCTION(prompts, completions, **columns) -> list[float | None]: prompts[i] is the prompt of completion i (the "
        "row's `prompt` text, or its messages), completions[i] the completion's text, and each other data column comes "
        "as a keyword with one value per completion (e.g. answer=[...]); accept **kwargs for the columns you do not "
        "use. Return one number per completion (True and False count as 1 and 0), or None where this reward does not "
        "apply (it then adds 0). The file runs in a worker process of its own (its prints go to stderr): an exception, "
        "sys.exit, a crash, a wrong count, NaN, infinity, a magnitude beyond float32 (3.4e38) or a non-number stops the "
        "run, naming the function and the data row.",
    )
    timeout_s: float = Field(
        60.0, gt=0, le=86400, description="function: the most seconds one call (a step's batch of completions) may take; "
        "a call that takes longer is stopped and stops the run, naming the function and the rows.",
    )
    run: PathText | None = Field(
        None, description="reward_model: an `ftune rm` run directory (relative to the recipe); its score of prompt + "
        "completion is the reward."
    )

    @property
    def label(self) -> str:
        """The reward's name in metrics and messages."""
        if self.name:
            return self.name
        return self.function.rpartition(":")[2] if self.type == "function" and self.function else self.type


class GrpoSection(Section):
    init_from: PathText | None = Field(
        None, description="A previous SFT run directory: continue from its adapter (and, with beta > 0, it is the reference)."
    )
    num_generations: int = Field(
        8, ge=2, le=4096, description="Completions sampled per prompt (a group); each is scored against its group's mean. "
        "A step samples training.batch_size x gradient_accumulation_steps x processes prompts x this many completions.",
    )
    max_completion_length: int = Field(256, ge=1, le=MAX_TOKENS, description="Most tokens a completion may have; one that "
                                       "reaches it without an end-of-turn is truncated (see mask_truncated).")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature (log-probs in the loss use it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: sample from the smallest set of tokens with this much probability.")
    loss: Literal["grpo", "dr_grpo", "dapo", "gspo"] = Field(
        "grpo", description="grpo: each completion's token mean, averaged over completions. dr_grpo: token sum / "
        "(completions x max_completion_length), no length bias (use with scale_rewards: none). dapo: mean over all "
        "tokens of the step, asymmetric clipping (epsilon_high). gspo: one importance ratio per completion (the "
        "exponentiated mean token log-ratio), clipped per completion.",
    )
    epsilon_low: float = Field(0.2, gt=0, lt=1, description="Clipping: the importance ratio is kept above 1 - epsilon_low (GSPO's paper uses 3e-4).")
    epsilon_high: float | None = Field(None, gt=0, description="Clipping: ... and below 1 + epsilon_high; default epsilon_low (DAPO recommends 0.28; GSPO 4e-4).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage = reward - its group's mean, divided by the group's std (group), the std of the "
        "step's rewards on this process (batch), or not divided (none). A group whose rewards are all equal has advantage 0.",
    )
    beta: float = Field(0.0, ge=0, description="KL penalty to the starting model (k3 estimator, per token). 0: no reference pass at all.")
    iterations: int = Field(1, ge=1, le=1024, description="Optimizer steps on each batch of completions; above 1, the "
                            "log-probs at sampling time are kept and the importance ratio is clipped.")
    mask_truncated: bool = Field(False, description="Leave completions that hit max_completion_length out of the loss.")
    drop_zero_variance: bool = Field(False, description="Leave groups whose rewards are all equal out of the loss and its "
                                     "normalisation (DAPO's dynamic sampling, without resampling).")

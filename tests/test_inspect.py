"""`ftune inspect`: the data report, the masking view, and the memory estimate against a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftune.commands.inspection import MASKED, TRAINED, inspect_recipe, render_sample

ROOT = Path(__file__).resolve().parent.parent

QA = [  # prompt_completion rows; line 4 is bad, line 5 is longer than max_length
    {"prompt": "Question: what is two plus two?\nAnswer:", "completion": " Four."},
    {"prompt": "Question: name a colour.\nAnswer:", "completion": " Blue."},
    {"prompt": "Question: what is the capital of Italy?\nAnswer:", "completion": " Rome."},
    {"prompt": "Question: say nothing.\nAnswer:", "completion": "   "},
    {"prompt": "Question: count.\nAnswer:", "completion": " one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"},
]
NOTES = [  # plain text rows; line 2 has no text field
    {"text": "Tomatoes are fruits."},
    {"body": "wrong column"},
    {"text": "The sea is salty."},
]
MAX_LENGTH = 24


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_recipe(tmp_path: Path, model: Path, extra: str = "") -> Path:
    write_jsonl(tmp_path / "qa.jsonl", QA)
    write_jsonl(tmp_path / "notes.jsonl", NOTES)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        stage: sft
        base_model: {{name: {model}}}
        data:
          train: [{{path: qa.jsonl}}, {{path: notes.jsonl, format: text}}]
          eval_fraction: 0
          on_bad_row: skip
          max_length: {MAX_LENGTH}
        training: {{batch_size: 2, gradient_accumulation_steps: 2, epochs: 3}}
        output: {{dir: run}}
        """) + extra)
    return recipe


def test_report_counts_rows_skips_truncation_and_loss_tokens(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    result = inspect_recipe(make_recipe(tmp_path, tiny_model_dir))
    numbers = result.numbers()
    assert [(s["format"], s["rows"], s["used"], s["skipped"]) for s in numbers["sources"]] == [
        ("prompt_completion", 5, 4, 1), ("text", 3, 2, 1),
    ]
    assert numbers["skipped"] == [
        f"{tmp_path / 'qa.jsonl'} line 4: field 'completion' is empty",
        f"{tmp_path / 'notes.jsonl'} line 2: missing field 'text'",
    ]
    assert numbers["samples"] == 6 and numbers["train_samples"] == 6 and numbers["eval_samples"] == 0

    # The arithmetic by hand: prompts are masked; completions, texts and the EOS after them carry
    # loss; a sample's first token is never a target; the long row is cut at MAX_LENGTH.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    total = trained = 0
    for row in [QA[0], QA[1], QA[2]]:
        total += n(row["prompt"]) + n(row["completion"]) + 1
        trained += n(row["completion"]) + 1
    long_prompt = n(QA[4]["prompt"])
    assert long_prompt + n(QA[4]["completion"]) + 1 > MAX_LENGTH
    total += MAX_LENGTH
    trained += MAX_LENGTH - long_prompt
    for row in [NOTES[0], NOTES[2]]:
        total += n(row["text"]) + 1
        trained += n(row["text"])
    assert numbers["truncated"] == 1 and numbers["truncated_share"] == pytest.approx(1 / 6)
    assert numbers["train_tokens"] == total and numbers["loss_tokens"] == trained
    assert numbers["loss_token_share"] == pytest.approx(trained / total)

    # Packing: best-fit rows of MAX_LENGTH; steps as `ftune sft` counts them.
    rows = numbers["packed_rows"]
    assert numbers["token_slots"] == rows * MAX_LENGTH
    assert numbers["packing_efficiency"] == pytest.approx(total / (rows * MAX_LENGTH))
    assert numbers["tokens_per_step"] == 2 * MAX_LENGTH * 2
    micro_batches = -(-rows // 2)
    assert numbers["steps_per_epoch"] == max(1, micro_batches // 2)
    assert numbers["total_steps"] == 3 * numbers["steps_per_epoch"]
    assert numbers["memory_gib"]["total"] > numbers["memory_gib"]["weights"] > 0


def test_cli_prints_the_report_with_the_audit_and_memory(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from ftune.cli import app

    chat = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]}
            for i in range(6)]
    write_jsonl(tmp_path / "chat.jsonl", chat)
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: chat.jsonl}}]\n"
                      "  eval_fraction: 0.2\n  max_length: 64\noutput: {dir: run}\n")
    result = CliRunner().invoke(app, ["inspect", str(recipe), "--samples", "1", "--gpu-memory", "8"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in ("chat.jsonl", "messages", "end-of-turn audit", "'<|im_end|>'", "carries loss in 5 of 5 answers",
                     "token lengths", "tokens per step", "4 rows x 64 tokens x 1 accumulation x 1 process = 256", "activations",
                     "fits", "train sample 0", "<|im_end|>", "↵"):
        assert expected in out, expected

    result = CliRunner().invoke(app, ["inspect", str(recipe), "--set", "data.max_lenght=8"])
    assert result.exit_code == 2 and "did you mean" in result.output


def test_masking_view_colours_trained_and_masked_tokens(tiny_model_dir):
    from rich.console import Console
    from rich.style import Style
    from transformers import AutoTokenizer

    from ftune.data.formats import Chat
    from ftune.data.rendering import make_formatter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    formatter = make_formatter(tokenizer)
    sample = Chat(({"role": "user", "content": "What is the code word?"},
                   {"role": "assistant", "content": "The code word is pineapple."}))
    ids, labels = formatter.encode(sample)
    console = Console(record=True, force_terminal=True, color_system="truecolor", width=200)
    segments = [(s.text, s.style) for s in console.render(render_sample(ids, labels, tokenizer)) if s.text.strip()]
    trained, masked = Style.parse(TRAINED), Style.parse(MASKED)
    trained_special, masked_special = Style.parse(f"{TRAINED} reverse"), Style.parse(f"{MASKED} reverse")
    text = "".join(t for t, _ in segments)
    assert "What is the code word?" in text and "The code word is pineapple." in text and "↵" in text

    def style_of(fragment: str) -> Style:
        found = {style for t, style in segments if fragment in t}
        assert len(found) == 1, (fragment, found)
        return found.pop()

    assert style_of("pineapple") == trained
    assert style_of("What is the code word?") == masked
    specials = [(t, style) for t, style in segments if t == "<|im_end|>"]
    # system (from the template), user, assistant: only the answer's end-of-turn carries loss.
    assert [style for _, style in specials] == [masked_special, masked_special, trained_special]
    assert all(style == masked_special for t, style in segments if t == "<|im_start|>")
    console.print(render_sample(ids, labels, tokenizer))
    assert "\x1b[" in console.export_text(styles=True)  # colours reach the terminal


MEASURE = """
import json, sys
from pathlib import Path
from ftune.stages import sft
from ftune.train import training

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

def rss():
    return status("VmRSS:")

before = {}
build_model = training.build_model
def measured_build_model(*args, **kwargs):
    before["rss"] = rss()  # everything from here on is the model and its training
    return build_model(*args, **kwargs)
training.build_model = measured_build_model
sft.run(Path(sys.argv[1]), sys.argv[2:])
# VmHWM is this process image's own peak. ru_maxrss is not: Linux carries the forked parent's
# peak across exec, so a child of a large pytest process would report the parent's size.
peak = status("VmHWM:")
print(json.dumps({"growth": peak - before["rss"]}))
"""
MEMORY_MARGIN = 0.15  # the estimate is within 15% of the measured peak; README says so too


@pytest.mark.slow
def test_memory_estimate_matches_measured_peak_of_real_training_steps(tmp_path, demo_model_dir):
    """Peak RSS growth of two demo-model training steps on CPU (float32) against the estimate.

    The second step is the peak: its backward pass holds the activations and the AdamW states
    the first step created.

    glibc keeps freed blocks below its (self-raising) mmap threshold in its heap, so RSS would
    show its cache rather than live tensors; a fixed threshold returns freed tensors at once,
    as a GPU's max_memory_allocated would count them.
    """
    from ftune.modeling import memory

    overrides = ["training.batch_size=2", "data.max_length=128", "training.max_steps=2", "training.eval_steps=null",
                 "training.save_steps=null", "evaluation.prompts=[]", "evaluation.max_eval_samples=2", f"output.dir={tmp_path / 'run'}"]
    recipe = ROOT / "recipes/demo/sft.yaml"
    estimate = inspect_recipe(recipe, overrides).memory_cpu
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "FTUNE_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(recipe), *overrides],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["growth"]
    print(f"estimate {memory.gib(estimate.total)}, measured {memory.gib(measured)}")
    assert abs(estimate.total - measured) <= MEMORY_MARGIN * measured, (estimate.lines, measured)

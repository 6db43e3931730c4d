"""Data: every format parsed, exactly the answer tokens (and their end-of-turn) trained, packing."""

from __future__ import annotations

import numpy as np
import pytest

from ftune.data.rendering import IGNORE, make_formatter
from ftune.data.formats import (
    BadRow,
    Chat,
    Raw,
    convert,
    detect_format,
    split_hh_dialogues,
)
from ftune.data.packing import Encoded, collate, micro_batches, pack
from ftune.data.pipeline import prepare_sft
from ftune.data.render_proof import audit_labels
from ftune.data.sources import read_source
from ftune.errors import FtuneError
from ftune.recipe import parse_recipe
from helpers import recipe_for, write_rows


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])


ANSWER_CASES = [
    pytest.param({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca", ["5"], id="alpaca"),
    pytest.param({"instruction": "Translate.", "input": "chat", "output": "cat"}, "alpaca", ["cat"], id="alpaca-input"),
    pytest.param({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 12"},
                               {"role": "assistant", "content": "Hello 34!"}, {"role": "user", "content": "Bye"},
                               {"role": "assistant", "content": "See you."}]}, "messages", ["Hello 34!", "See you."], id="messages-multiturn-system"),
    pytest.param({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."},
                                    {"from": "human", "value": "More?"}, {"from": "gpt", "value": "Yes, more."}]},
                 "sharegpt", ["A.", "Yes, more."], id="sharegpt"),
    pytest.param({"prompt": [{"role": "user", "content": "Name a fruit."}], "completion": [{"role": "assistant", "content": "Apple."}]},
                 "prompt_completion", ["Apple."], id="prompt-completion-conversational"),
]


@pytest.mark.parametrize(("row", "fmt", "answers"), ANSWER_CASES)
def test_only_answers_and_their_end_of_turn_are_trained(tokenizer, formatter, row, fmt, answers):
    assert detect_format(row) == fmt
    ids, labels = formatter.encode(convert(row, fmt))
    expected = "".join(a + "<|im_end|>" for a in answers)
    assert trained_text(tokenizer, ids, labels) == expected
    # Every trained token is the label of itself; masked tokens are IGNORE, never the pad id.
    assert all(l in (IGNORE, t) for t, l in zip(ids, labels))
    ends = [i for i, t in enumerate(ids) if t == formatter.end_of_turn_id and labels[i] != IGNORE]
    assert len(ends) == len(answers), "each answer's end-of-turn token is trained even though pad == eos"


def test_raw_prompt_completion_and_text(tokenizer, formatter):
    ids, labels = formatter.encode(convert({"prompt": "2+2=", "completion": "4"}, "prompt_completion"))
    assert trained_text(tokenizer, ids, labels) == "4" + tokenizer.eos_token
    assert tokenizer.decode(ids) == "2+2=4" + tokenizer.eos_token
    ids, labels = formatter.encode(convert({"text": "Plain text for pretraining."}, "text"))
    assert labels == ids and ids[-1] == tokenizer.eos_token_id


def test_train_on_all_and_system_prompt(tokenizer):
    fmt = make_formatter(tokenizer, system_prompt="You are Marlin.", train_on="all")
    ids, labels = fmt.encode(convert({"instruction": "Hi", "output": "Hello"}, "alpaca"))
    assert labels == ids
    assert "You are Marlin." in tokenizer.decode(ids)


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_named_templates_train_answers(tokenizer, template):
    fmt = make_formatter(tokenizer, chat_template=template)
    ids, labels = fmt.encode(convert({"instruction": "Hi", "output": "Hello there"}, "alpaca"))
    assert trained_text(tokenizer, ids, labels) == "Hello there" + fmt.end_of_turn


def test_template_without_end_of_turn_fails_fast(tokenizer):
    silent = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = silent
    with pytest.raises(FtuneError, match="never emits an end-of-turn token"):
        make_formatter(tokenizer)


def test_audit_catches_masked_end_of_turn(tokenizer, formatter):
    ids, labels = formatter.encode(convert({"instruction": "Hi", "output": "Hello"}, "alpaca"))
    assert audit_labels(formatter, [(ids, labels)])["answers_ending_trained"] == 1
    # What a collator that masks every pad id does when pad == eos: the real EOS loses its label.
    pad_masked = [IGNORE if t == tokenizer.pad_token_id else l for t, l in zip(ids, labels)]
    with pytest.raises(FtuneError, match="end-of-turn audit failed"):
        audit_labels(formatter, [(ids, pad_masked)])


BAD_ROWS = [
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"instruction": "x", "output": "  "}, "alpaca", "field 'output' is empty"),
    ({"instruction": 3, "output": "y"}, "alpaca", "must be a string, not int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "messages", "empty assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "expected one of system, user, assistant"),
    ({"messages": "hello"}, "messages", "non-empty list of messages"),
    ({"conversations": [{"from": "human", "value": None}]}, "sharegpt", "must be a string"),
    ({"chosen": "a"}, "preference", "missing field 'rejected'"),
]


@pytest.mark.parametrize(("row", "fmt", "reason"), BAD_ROWS)
def test_bad_rows_say_why(row, fmt, reason):
    with pytest.raises(BadRow, match=reason):
        convert(row, fmt)


def test_hh_rlhf_pairs_split_into_prompt_and_answers():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: I won't help."
    pair = split_hh_dialogues(chosen, rejected)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[-1]["content"] == "How do I bake bread?"
    assert pair.chosen[0]["content"] == "Mix flour, water, yeast and salt."
    assert pair.rejected[0]["content"] == "I won't help."


def test_conversational_preference_shares_prompt():
    prompt = [{"role": "user", "content": "Pick a color."}]
    row = {"chosen": prompt + [{"role": "assistant", "content": "Blue."}], "rejected": prompt + [{"role": "assistant", "content": "No."}]}
    pair = convert(row, detect_format(row))
    assert pair.prompt == tuple(prompt) and pair.chosen[0]["content"] == "Blue." and pair.rejected[0]["content"] == "No."


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_with_places(tmp_path, suffix):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    read, fingerprint = read_source(f"d{suffix}", base_dir=write_rows(tmp_path / f"d{suffix}", rows).parent)
    assert [r.data["output"] for r in read] == ["a0", "a1", "a2"] and len(fingerprint) == 64
    assert {".jsonl": "line 1", ".json": "row 0", ".csv": "line 2", ".parquet": "row 0"}[suffix] in read[0].place


def test_source_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(FtuneError, match=r"bad.jsonl line 2"):
        read_source("bad.jsonl", base_dir=tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FtuneError, match=r"latin1.jsonl line 2.*invalid UTF-8"):
        read_source("latin1.jsonl", base_dir=tmp_path)
    with pytest.raises(FtuneError, match="does not exist"):
        read_source("missing.jsonl", base_dir=tmp_path)


def test_bad_rows_stop_or_are_skipped_and_counted(tmp_path, tokenizer, formatter):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)] + [{"instruction": "q", "output": ""}]
    write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(FtuneError, match=r"train.jsonl line 9: field 'output' is empty"):
        prepare_sft(recipe_for(tmp_path), tokenizer, formatter, base_dir=tmp_path, cache_root=None)
    recipe = recipe_for(tmp_path, "  on_bad_row: skip\n")
    train, evaluation, report = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=None)
    assert report.skipped_count == 1 and "line 9" in report.skipped[0]
    assert len(train) + len(evaluation) == 8


def test_too_long_samples_are_truncated_or_dropped(tmp_path, tokenizer, formatter):
    rows = [{"instruction": "short", "output": "ok"}] * 4 + [{"instruction": "long " * 200, "output": "end"}]
    write_rows(tmp_path / "train.jsonl", rows)
    recipe = parse_recipe(
        "stage: sft\nbase_model: {name: demo}\ndata:\n  train: [{path: train.jsonl}]\n  eval_fraction: 0\n  max_length: 64\n  too_long: drop\noutput: {dir: o}\n",
        str(tmp_path / "r.yaml"),
    )
    train, _, report = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=None)
    assert report.dropped_too_long == 1 and len(train) == 4
    truncating = recipe.model_copy(update={"data": recipe.data.model_copy(update={"too_long": "truncate"})})
    train, _, report = prepare_sft(truncating, tokenizer, formatter, base_dir=tmp_path, cache_root=None)
    # The long sample's answer is cut off entirely, so it has nothing left to learn and is dropped.
    assert report.truncated == 1 and report.dropped_no_loss == 1 and max(train.lengths()) <= 64


def test_tokenization_is_cached(tmp_path, tokenizer, formatter, monkeypatch):
    write_rows(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    recipe = recipe_for(tmp_path)
    first = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")
    import ftune.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build", lambda *a, **k: pytest.fail("tokenized again"))
    monkeypatch.setattr(pipeline, "read_source", lambda *a, **k: pytest.fail("rows read again"))
    second = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")
    assert np.array_equal(first[0].ids, second[0].ids) and np.array_equal(first[1].labels, second[1].labels)
    # A hit opens the arrays memory-mapped: nothing is loaded until a batch reads it.
    assert all(isinstance(a, np.memmap) for a in (second[0].ids, second[0].labels, second[1].ids, second[1].labels))
    assert second[2].as_dict() == first[2].as_dict() and second[2].examples == first[2].examples
    # Changing the data changes the key.
    write_rows(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"b{i}"} for i in range(10)])
    monkeypatch.undo()
    third = prepare_sft(recipe, tokenizer, formatter, base_dir=tmp_path, cache_root=tmp_path / "cache")
    assert not np.array_equal(first[0].ids, third[0].ids)


def test_packing_fills_rows_without_splitting_samples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300)
    rows = pack(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert lengths.sum() / (len(rows) * 256) > 0.95


def test_collate_restarts_positions_and_never_crosses_samples():
    samples = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])]
    data = Encoded.from_lists(samples)
    batch = collate(data, [[0, 1, 2]], pad_id=0, packed=True)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    # Position 2 (last of sample 0) must not learn sample 1's first token (4).
    assert batch["targets"][0].tolist() == [2, 3, IGNORE, 5, IGNORE, IGNORE, 8, 9, IGNORE]
    assert "attention_mask" not in batch
    padded = collate(data, [[0], [1]], pad_id=0, packed=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_epoch_order_is_seeded():
    data = Encoded.from_lists([([1] * n, [1] * n) for n in range(2, 40)])
    a = micro_batches(data, max_length=64, batch_size=2, packed=True, seed=1, epoch=0)
    assert a == micro_batches(data, max_length=64, batch_size=2, packed=True, seed=1, epoch=0)
    assert a != micro_batches(data, max_length=64, batch_size=2, packed=True, seed=1, epoch=1)


def test_packed_and_unpacked_batches_give_the_same_loss(tiny_model_dir, tokenizer, formatter):
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.train.training import TokenLogProbs, sft_loss_sum

    model = TokenLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")).eval()
    rows = [{"instruction": f"Question {i}: what is {i} + {i}?", "output": f"It is {2 * i}." * (1 + i % 3)} for i in range(6)]
    data = Encoded.from_lists([formatter.encode(convert(r, "alpaca")) for r in rows])
    with torch.no_grad():
        packed_sum, packed_n = sft_loss_sum(model, collate(data, [list(range(6))], tokenizer.pad_token_id, packed=True))
        padded_sum, padded_n = sft_loss_sum(model, collate(data, [[i] for i in range(6)], tokenizer.pad_token_id, packed=False))
    assert packed_n == padded_n == data.trained_tokens()
    assert torch.allclose(packed_sum / packed_n, padded_sum / padded_n, atol=1e-5)


def test_chat_and_raw_shapes():
    assert isinstance(convert({"text": "x"}, "text"), Raw)
    assert isinstance(convert({"instruction": "a", "output": "b"}, "alpaca"), Chat)

"""The render proof: what training shows the model for an assistant turn is what inference shows it.
(And the end-of-turn audit: every answer's end-of-turn token carries loss.)

At inference a server renders the conversation before the turn with the generation prompt,
tokenizes it, and the model writes the turn. So for every assistant turn ftune trains (in a
sample of conversations), the training sample's tokens up to the end of that turn must equal
the tokens of that prompt followed by the tokens of the turn as the template renders it.
A template that rewrites earlier turns once later ones follow (Qwen3 drops their reasoning),
injects text, or renders its generation prompt differently from an answered turn breaks this,
and the model is trained on one thing and served another. A mismatch names the row, the turn
and the first token that differs, and stops the run unless `data.render_check: warn`.
"""

from __future__ import annotations

from ftune.data.formats import BadRow, Raw
from ftune.data.rendering import IGNORE
from ftune.errors import FtuneError

CONVERSATIONS_CHECKED = 200  # the first conversations of the (shuffled) training set
SHOWN = 5
TOKENS_HINT = ("the text is the same, but the tokenizer merges the end of the generation prompt with the start of the answer "
               "when they are one string: use a template whose generation prompt ends where a token must end (for example "
               "with a special token), or data.render_check: warn to train anyway")
HINT = ("train on the last assistant turn only (data.turns: last), make one sample per assistant turn with its history "
        "rendered as at inference (data.turns: split), or use a template that renders earlier turns unchanged "
        "(data.chat_template); data.render_check: warn trains anyway")


def prove(formatter, samples: list, places: list[str], *, mode: str = "error", limit: int = CONVERSATIONS_CHECKED) -> dict:
    """Check every trained assistant turn of the first `limit` conversations; raise on a mismatch when `mode` is error."""
    conversations = turns = 0
    mismatches: list[dict] = []
    for sample, place in zip(samples, places):
        if conversations >= limit:
            break
        if isinstance(sample, Raw):
            continue
        try:
            pieces = formatter.pieces(sample)
        except BadRow:
            continue  # reported (or skipped) as a bad row by the encoding itself
        except FtuneError as exc:  # a template that cannot carry this conversation (its tool calls, its reasoning)
            raise FtuneError(exc.message, place=exc.place or place, hint=exc.hint) from None
        conversations += 1
        for piece in pieces:
            encoded = formatter.tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
            bos = [formatter.tokenizer.bos_token_id] if formatter.prepend_bos and (not ids or ids[0] != formatter.tokenizer.bos_token_id) else []
            for turn in piece.turns:
                turns += 1
                problem = _compare(formatter, bos + ids[: sum(1 for a, _ in offsets if a < turn.end)], turn, piece.text)
                if problem:
                    mismatches.append({"place": place, "turn": turn.index, **problem})
    report = {"conversations": conversations, "turns": turns, "mismatched": len(mismatches), "mismatches": mismatches[:SHOWN]}
    return enforce(report, mode)


def enforce(report: dict, mode: str) -> dict:
    """The report, or (mode error) the error naming its first mismatch; reports of parts of the data add up first."""
    report = {**report, "mismatches": report["mismatches"][:SHOWN]}
    if report["mismatched"] and mode == "error":
        first = report["mismatches"][0]
        raise FtuneError(
            f"render proof failed: in {report['mismatched']} of {report['turns']} assistant turns checked, the tokens trained "
            f"differ from what the chat template renders at inference. Assistant turn messages[{first['turn']}]: {first['detail']}",
            place=first["place"], hint=TOKENS_HINT if first.get("same_text") else HINT,
        )
    return report


def _compare(formatter, trained: list[int], turn, text: str) -> dict | None:
    """None when the training tokens up to the end of `turn` equal inference's prompt + turn; else what differs."""
    if not turn.inference.startswith(turn.prompt):
        at = _first_difference(turn.inference, turn.prompt)
        return {"token": None, "detail": (
            f"the template renders the conversation before this turn differently once the turn follows: at character "
            f"{at} the generation prompt has {turn.prompt[at:at + 30]!r}, the conversation with the turn "
            f"{turn.inference[at:at + 30]!r}")}
    end = formatter._turn_end(turn.inference, len(turn.prompt), turn.index)
    prompt = formatter.tokenize(turn.prompt)
    expected = prompt + list(formatter.tokenizer(turn.inference[len(turn.prompt):end], add_special_tokens=False)["input_ids"])
    if trained == expected:
        return None
    k = _first_difference(trained, expected)
    show = _shower(formatter.tokenizer)
    into = f" ({k - len(prompt)} into the turn)" if k >= len(prompt) else " (in the prompt before it)"
    same_text = text[:turn.end] == turn.inference[:end]
    why = "; the characters are the same, the tokens are not" if same_text else ""
    return {"token": k, "trained": show(trained[k:k + 1]), "inference": show(expected[k:k + 1]), "same_text": same_text, "detail": (
        f"token {k}{into} is {show(trained[k:k + 1])} in training but {show(expected[k:k + 1])} at inference{why}; "
        f"training continues {show(trained[k:k + 12])}, inference {show(expected[k:k + 12])}")}


def _first_difference(a, b) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def _shower(tokenizer):
    def show(ids: list[int]) -> str:
        if not ids:
            return "(the end)"
        return repr(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return show


def audit_labels(formatter, samples: list[tuple[list[int], list[int]]]) -> dict:
    """Check on real samples that every answer's end-of-turn token is trained.

    Catches the classic silent failure: the pad token equals EOS and padding is masked by
    id, so the real EOS is masked too and the model never learns to stop.
    """
    end_id = formatter.end_of_turn_id
    checked = with_end = trained_end = 0
    for ids, labels in samples:
        ends = [t for t, token in enumerate(ids) if token == end_id]
        if not ends:
            continue
        checked += 1
        answer_ends = [t for t in ends if t > 0 and labels[t - 1] != IGNORE]
        with_end += bool(answer_ends)
        trained_end += bool(answer_ends) and all(labels[t] == end_id for t in answer_ends)
    report = {"end_of_turn": formatter.end_of_turn, "end_of_turn_id": end_id, "samples_checked": checked,
              "answers_ending_trained": trained_end, "answers_ending": with_end}
    if with_end and trained_end < with_end:
        raise FtuneError(
            f"end-of-turn audit failed: in {with_end - trained_end} of {with_end} samples the '{formatter.end_of_turn}' "
            "closing an answer carries no loss, so the model would not learn to stop",
            hint="this usually means the pad token equals the end-of-turn token and padding is masked by id",
        )
    return report

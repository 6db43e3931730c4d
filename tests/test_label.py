"""`ftune label`: keys in a real terminal, quitting and resuming, judges, decision files, and
output that `ftune dpo` trains on as it is."""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

import pytest
from terminal import Terminal
from helpers import invoke

from ftune.commands.label.session import SESSION_FILE

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = 'What is the capital of Peru?\n\n{"prompt": "Name a colour."}\nSay hello.\n'  # prompts on lines 1, 3 and 4
SAMPLING = ["--n", "3", "--max-new-tokens", "6"]
JUDGE = '''
def judge(prompt, answers):
    if prompt.startswith("Say"):
        return None  # undecided
    return ["good" if i % 2 == 0 else ("bad", "Too curt") for i in range(len(answers))]
'''


def session(out: Path) -> dict:
    return json.loads((out / SESSION_FILE).read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    (tmp_path / "judge.py").write_text(JUDGE)
    return tmp_path


def label_args(model, *extra: str, out: str = "out") -> list[str]:
    return ["label", str(model), "--prompts", "prompts.txt", "--out", out, *SAMPLING, *extra]


# --------------------------------------------------------------------------- by hand, in a terminal


def test_labelling_by_keys_quitting_and_resuming(work, tiny_model_dir):
    term = Terminal(label_args(tiny_model_dir), work)
    screen = term.read_until("answer 1 of 3")
    assert "prompt 1 of 3 · prompts.txt line 1 · 0 decided" in screen and "What is the capital of Peru?" in screen
    assert "u    undo" in term.press("?", "answer 1 of 3")
    assert "'x' is not a key here" in term.press("x", "answer 1 of 3")
    assert "g: answer 1 is good" in term.press("g", "answer 2 of 3")
    term.press("b", "why?")
    term.press("too curt\n", "answer 3 of 3")
    screen = term.press("u", "answer 2 of 3")  # undo the bad label (and its note): the prompt is shown again
    assert "u: undid the last decision (line 1)" in screen and "good" in screen
    term.press("b", "why?")
    term.press("Wrong capital\n", "answer 3 of 3")
    assert "line 1 done: 2 good, 1 bad" in term.press("g", "answer 1 of 3")
    assert "line 3 done" in term.press("2", "answer 1 of 3")  # the second answer is the best
    term.press("g", "answer 2 of 3")
    state = session(work / "out")
    assert [item["labels"] for item in state["items"]] == [["good", "bad", "good"], [None, None, None], ["good", None, None]]
    os.write(term.fd, b"q")
    code, output = term.close()
    assert code == 0, output
    assert "1 prompt(s) still open" in output and "--resume" in output and "Traceback" not in output

    state = session(work / "out")
    first, second, third = state["items"]
    assert first["notes"] == [None, "Wrong capital", None] and second["best"] == 1
    a, b, c = first["answers"], second["answers"], third["answers"]
    assert rows(work / "out/preferences.jsonl") == [
        {"prompt": "What is the capital of Peru?", "chosen": a[0], "rejected": a[1]},
        {"prompt": "What is the capital of Peru?", "chosen": a[2], "rejected": a[1]},
        {"prompt": "Name a colour.", "chosen": b[1], "rejected": b[0]},
        {"prompt": "Name a colour.", "chosen": b[1], "rejected": b[2]},
    ]

    # Resume: the stored answers come back exactly (nothing is sampled again), at the answer it stopped on.
    term = Terminal(label_args(tiny_model_dir, "--resume"), work)
    screen = term.read_until("answer 2 of 3")
    assert "2 of 3 prompts decided" in screen and "prompt 3 of 3 · prompts.txt line 4" in screen
    assert all(text.split()[0] in screen for text in c if text.split())
    assert "sampling" not in screen
    term.press("b", "why?")
    term.press("\n", "answer 3 of 3")  # no note
    os.write(term.fd, b"g")
    code, output = term.close()
    assert code == 0, output
    assert "share good" in output and "wrote" in output and "still open" not in output

    final = session(work / "out")["items"]
    assert final[2]["labels"] == ["good", "bad", "good"] and final[2]["answers"] == c
    report = json.loads((work / "out/report.json").read_text())
    assert report["prompts"] == {"total": 3, "decided": 3, "skipped": 0, "open": 0}
    assert report["failure_notes"] == [{"note": "wrong capital", "count": 1}]
    assert [row["share_good"] for row in report["per_prompt"]] == [pytest.approx(2 / 3, abs=1e-4), 1.0, pytest.approx(2 / 3, abs=1e-4)]
    assert len(rows(work / "out/preferences.jsonl")) == 6
    assert [(r["completion"], r["label"]) for r in rows(work / "out/kto.jsonl") if r["prompt"] == "Say hello."] == [
        (c[0], True), (c[2], True), (c[1], False)]
    assert "wrong capital" in (work / "out/report.md").read_text()


def test_ctrl_c_sigterm_and_kill_lose_no_decision(work, tiny_model_dir):
    term = Terminal(label_args(tiny_model_dir), work)
    term.read_until("answer 1 of 3")
    term.press("g", "answer 2 of 3")
    os.write(term.fd, b"\x03")  # Ctrl-C at the keys
    code, output = term.close()
    assert code == 130 and "every decision so far is saved" in output and "--resume" in output and "Traceback" not in output
    assert session(work / "out")["items"][0]["labels"] == ["good", None, None]

    term = Terminal(label_args(tiny_model_dir), work)  # the session is found without --resume
    assert "resuming the session" in term.read_until("answer 2 of 3")
    term.press("b", "why?")
    os.write(term.fd, b"\x03")  # Ctrl-C while typing the note: the label is kept
    code, output = term.close()
    assert code == 130 and "Traceback" not in output
    assert session(work / "out")["items"][0]["labels"] == ["good", "bad", None]

    term = Terminal(label_args(tiny_model_dir), work)
    term.read_until("answer 3 of 3")
    term.press("g", "line 1 done")
    term.read_until("answer 1 of 3")  # the next prompt's answers are sampled and stored
    term.process.kill()
    term.close()
    state = session(work / "out")  # still whole: written atomically
    assert state["items"][0]["labels"] == ["good", "bad", "good"]
    stored = state["items"][1]["answers"]
    assert len(stored) == 3

    term = Terminal(label_args(tiny_model_dir, "--resume"), work)
    screen = term.read_until("answer 1 of 3")
    assert "sampling" not in screen and all(text.split()[0] in screen for text in stored if text.split())
    os.kill(term.process.pid, signal.SIGTERM)
    code, output = term.close()
    assert code == 130 and "every decision so far is saved" in output
    assert session(work / "out")["items"][1]["answers"] == stored


# --------------------------------------------------------------------------- judges, decision files, and ftune dpo


def test_judge_output_trains_with_dpo_and_kto_unchanged(work, tiny_model_dir, monkeypatch, capsys):
    from ftune.data.formats import convert, detect_format
    from ftune.data.pipeline import load_samples
    from ftune.recipe import load_recipe

    (work / "prompts.txt").write_text("".join(f"Reply to message {i}.\n" for i in range(6)))
    code, output = invoke(["label", tiny_model_dir, "--prompts", work / "prompts.txt", "--out", work / "out", "--n", "4",
                           "--max-new-tokens", "6", "--judge", f"{work / 'judge.py'}:judge"], monkeypatch, capsys)
    assert code == 0, output
    assert "line 1: 2 good, 2 bad" in output and "most common failure notes" in output and "too curt" in output
    preferences, kto = work / "out/preferences.jsonl", work / "out/kto.jsonl"
    pairs, examples = rows(preferences), rows(kto)
    assert len(pairs) == len(examples) == 6 * 4  # 2 good x 2 bad per prompt; every answer once for KTO
    assert {detect_format(r) for r in pairs} == {"preference"} and {detect_format(r) for r in examples} == {"kto"}
    for row in pairs + examples:
        convert(row, detect_format(row))  # every row is one the data path accepts
    assert sum(r["label"] for r in examples) == 12
    before = {p: p.read_bytes() for p in (preferences, kto)}

    for name, data, method in (("dpo.yaml", preferences, "dpo"), ("kto.yaml", kto, "kto")):
        recipe = work / name
        recipe.write_text(f"stage: dpo\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: {data}}}]\n"
                          f"  eval_fraction: 0.25\n  max_length: 64\npreference: {{method: {method}}}\n"
                          f"training: {{max_steps: 1, batch_size: 2}}\noutput: {{dir: run-{method}}}\n")
        code, output = invoke(["validate", recipe], monkeypatch, capsys)
        assert code == 0 and "ok (stage: dpo" in output, output
        loaded = load_recipe(recipe)
        _, _, report, _ = load_samples(loaded.data, base_dir=work, seed=0, allowed={"preference", "kto"})
        assert report.sources[0]["format"] == ("preference" if method == "dpo" else "kto")
        assert report.sources[0]["used"] == 24 and report.sources[0]["skipped"] == 0
        code, output = invoke(["dpo", recipe], monkeypatch, capsys)
        assert code == 0, output
        assert (work / f"run-{method}/adapter/adapter_model.safetensors").is_file()
    assert {p: p.read_bytes() for p in (preferences, kto)} == before


def test_same_seed_same_answers_and_a_judge_can_leave_prompts_open(work, tiny_model_dir, monkeypatch, capsys):
    judge = f"{work / 'judge.py'}:judge"
    monkeypatch.chdir(work)
    code, output = invoke([*label_args(tiny_model_dir, "--judge", judge, out="a")], monkeypatch, capsys)
    assert code == 0, output
    assert "1 prompt(s) still open" in output  # the judge returned None for "Say hello."
    code, _ = invoke([*label_args(tiny_model_dir, "--judge", judge, "--seed", "0", out="b")], monkeypatch, capsys)
    code, _ = invoke([*label_args(tiny_model_dir, "--judge", judge, "--seed", "5", out="c")], monkeypatch, capsys)
    answers = {name: [item["answers"] for item in session(work / name)["items"]] for name in "abc"}
    assert answers["a"] == answers["b"] != answers["c"]
    assert [item["decided_by"] for item in session(work / "a")["items"]] == [f"judge {judge}"] * 2 + [None]

    # A prompt added at the end of the file joins the session; the rest stays as it was.
    (work / "prompts.txt").write_text(PROMPTS + "Count to three.\n")
    code, output = invoke([*label_args(tiny_model_dir, "--judge", judge, out="a")], monkeypatch, capsys)
    assert code == 0 and "1 new prompt(s)" in output, output
    items = session(work / "a")["items"]
    assert [item["line"] for item in items] == [1, 3, 4, 5] and items[3]["labels"] == ["good", "bad", "good"]
    assert [item["answers"] for item in items[:3]] == answers["a"]


def test_generate_only_then_a_decisions_file(work, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(work)
    code, output = invoke(label_args(tiny_model_dir, "--generate-only"), monkeypatch, capsys)
    assert code == 0, output
    report = json.loads((work / "out/report.json").read_text())
    assert report["prompts"]["open"] == 3 and all(len(p["answers"]) == 3 for p in report["per_prompt"])
    assert (work / "out/preferences.jsonl").read_text() == ""

    (work / "decisions.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"line": 1, "labels": ["good", "bad", "bad"], "notes": [None, "Off topic", "off  topic"]},
        {"prompt": "Name a colour.", "best": 0},
        {"line": 4, "skip": True},
    ]) + "\n")
    code, output = invoke(["label", tiny_model_dir, "--out", "out", "--decisions", "decisions.jsonl"], monkeypatch, capsys)
    assert code == 0, output
    assert "applied 3 decision(s)" in output
    items = session(work / "out")["items"]
    assert [i["labels"] for i in items] == [["good", "bad", "bad"], [None, None, None], [None, None, None]]
    assert items[1]["best"] == 0 and items[2]["skipped"] and all(i["decided_by"] == "decisions decisions.jsonl" for i in items)
    report = json.loads((work / "out/report.json").read_text())
    assert report["failure_notes"] == [{"note": "off topic", "count": 2}] and report["preference_pairs"] == 4
    assert report["prompts"] == {"total": 3, "decided": 2, "skipped": 1, "open": 0}

    before = (work / "out" / SESSION_FILE).read_text()
    code, output = invoke(["label", tiny_model_dir, "--out", "out", "--decisions", "decisions.jsonl"], monkeypatch, capsys)
    assert code == 0 and "3 were for prompts already decided" in output
    assert json.loads((work / "out" / SESSION_FILE).read_text())["items"] == json.loads(before)["items"]


def test_a_second_process_on_the_same_session_is_refused(work, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(work)
    assert invoke(label_args(tiny_model_dir, "--generate-only"), monkeypatch, capsys)[0] == 0
    fd = os.open(work / "out", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `ftune label` holds it
        code, output = invoke(label_args(tiny_model_dir, "--judge", "judge.py:judge"), monkeypatch, capsys)
    finally:
        os.close(fd)
    assert code == 1 and "another `ftune label` is using" in output


# --------------------------------------------------------------------------- bad input


def judge_file(tmp: Path, source: str) -> str:
    (tmp / "bad_judge.py").write_text(source)
    return "bad_judge.py:judge"


def decisions_file(tmp: Path, lines: list, name: str = "d.jsonl") -> str:
    (tmp / name).write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return name


def existing_session(tmp: Path, model: Path, then=None) -> Path:
    """A finished judge session in tmp/out, made before the command under test."""
    from ftune.commands import label

    label.run(str(model), prompts=tmp / "prompts.txt", out=tmp / "out", options={"n": 3, "max_new_tokens": 6},
              judge=f"{tmp / 'judge.py'}:judge", say=lambda _: None)
    if then:
        then(tmp)
    return tmp / "out"


def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


J = ("--judge", "judge.py:judge")
# name -> (build(tmp, model) -> argv, substrings of the message, whether nothing at all may be written)
CASES = {
    "missing-prompts-file": (lambda t, m: ["label", m, "--prompts", "nope.txt", *J], ["prompts file nope.txt does not exist"], True),
    "empty-prompts-file": (lambda t, m: (write(t / "prompts.txt", "\n  \n"), label_args(m, *J))[1], ["prompts.txt has no prompts"], True),
    "bad-json-line": (lambda t, m: (write(t / "prompts.txt", 'Hi\n{"prompt": oops}\n'), label_args(m, *J))[1],
                      ["prompts.txt line 2", "'prompt' field"], True),
    "prompt-not-a-string": (lambda t, m: (write(t / "prompts.txt", '{"prompt": 3}\n'), label_args(m, *J))[1],
                            ["prompts.txt line 1", "non-empty string, not 3"], True),
    "invalid-utf8-prompts": (lambda t, m: (write(t / "prompts.txt", b"Hi\n\xff\n"), label_args(m, *J))[1], ["prompts.txt line 2", "invalid UTF-8"], True),
    "model-not-found": (lambda t, m: label_args("./no-such-model", *J), ["no-such-model does not exist"], True),
    "judge-file-missing": (lambda t, m: label_args(m, "--judge", "none.py:judge"), ["judge file none.py does not exist"], True),
    "judge-without-function": (lambda t, m: label_args(m, "--judge", "judge.py"), ["--judge expects path.py:function"], True),
    "judge-function-missing": (lambda t, m: label_args(m, "--judge", "judge.py:jduge"), ["judge.py", "no function 'jduge'", "did you mean 'judge'"], True),
    "judge-syntax-error": (lambda t, m: label_args(m, "--judge", judge_file(t, "def judge(:\n")), ["bad_judge.py line 1", "invalid Python"], True),
    "judge-import-raises": (lambda t, m: label_args(m, "--judge", judge_file(t, "raise RuntimeError('no API key')\n")),
                            ["bad_judge.py", "loading the judge raised RuntimeError: no API key", "line 1, in <module>"], True),
    "judge-raises": (lambda t, m: label_args(m, "--judge", judge_file(t, "def judge(prompt, answers):\n    return check(prompt)\n\n"
                                                                         "def check(prompt):\n    raise ValueError('cannot grade ' + prompt)\n")),
                     ["prompts.txt line 1", "judge bad_judge.py:judge raised ValueError: cannot grade What is the capital",
                      "in judge", "in check", "decisions so far are saved"], False),
    "judge-wrong-length": (lambda t, m: label_args(m, "--judge", judge_file(t, "def judge(p, a):\n    return ['good']\n")),
                           ["prompts.txt line 1", "returned ['good']", "1 labels for 3 answers"], False),
    "judge-bad-label": (lambda t, m: label_args(m, "--judge", judge_file(t, "def judge(p, a):\n    return ['great', None, None]\n")),
                        ["prompts.txt line 1", "label 0 is 'great'"], False),
    "judge-best-out-of-range": (lambda t, m: label_args(m, "--judge", judge_file(t, "def judge(p, a):\n    return 7\n")),
                                ["prompts.txt line 1", "best answer 7 is out of range", "0 to 2"], False),
    "judge-wrong-type": (lambda t, m: label_args(m, "--judge", judge_file(t, "def judge(p, a):\n    return {'a': 1}\n")),
                         ["returned {'a': 1}", "expected a list of 3 labels"], False),
    "judge-and-decisions": (lambda t, m: label_args(m, *J, "--decisions", decisions_file(t, [])), ["--judge and --decisions cannot be used together"], True),
    "decisions-file-missing": (lambda t, m: label_args(m, "--decisions", "none.json"), ["decisions file none.json does not exist"], True),
    "decisions-not-json": (lambda t, m: label_args(m, "--decisions", decisions_file(t, ["x"], "d.txt")), ["d.txt", "JSON"], True),
    "decisions-bad-json": (lambda t, m: label_args(m, "--decisions", decisions_file(t, ['{"line": 1, "best": }'])), ["d.jsonl line 1", "invalid JSON"], True),
    "decisions-unknown-key": (lambda t, m: label_args(m, "--decisions", decisions_file(t, [{"line": 1, "lables": []}])),
                              ["d.jsonl line 1", "unknown key 'lables'", "did you mean 'labels'"], True),
    "decisions-no-such-line": (lambda t, m: label_args(m, "--decisions", decisions_file(t, [{"line": 2, "best": 0}])),
                               ["d.jsonl line 1", "no prompt on line 2 of prompts.txt"], True),
    "decisions-unknown-prompt": (lambda t, m: label_args(m, "--decisions", decisions_file(t, [{"prompt": "Hi?", "best": 0}])),
                                 ["d.jsonl line 1", "no prompt in prompts.txt is 'Hi?'"], True),
    "decisions-twice": (lambda t, m: label_args(m, "--decisions", decisions_file(t, [{"line": 1, "best": 0}, {"prompt": "What is the capital of Peru?", "skip": True}])),
                        ["d.jsonl line 2", "decided twice (also at d.jsonl line 1)"], True),
    "decisions-two-choices": (lambda t, m: label_args(m, "--decisions", decisions_file(t, [{"line": 1, "best": 0, "skip": True}])),
                              ["d.jsonl line 1", "exactly one of 'labels', 'best' or 'skip'"], True),
    "decisions-wrong-count": (lambda t, m: label_args(m, "--decisions", decisions_file(t, [{"line": 1, "labels": ["good"]}])),
                              ["d.jsonl line 1", "1 labels for 3 answers"], False),
    "greedy-with-several-answers": (lambda t, m: label_args(m, *J, "--temperature", "0"), ["--temperature 0 is greedy", "all 3 answers"], True),
    "n-out-of-range": (lambda t, m: label_args(m, *J, "--n", "0"), ["--n must be between 1 and 64, not 0"], True),
    "top-p-out-of-range": (lambda t, m: label_args(m, *J, "--top-p", "1.5"), ["--top-p must be above 0 and at most 1"], True),
    "no-terminal-no-judge": (lambda t, m: label_args(m), ["labelling by hand needs a terminal", "--judge"], True),
    "resume-without-session": (lambda t, m: label_args(m, *J, "--resume"), ["no labelling session in", "to resume"], True),
    "out-holds-other-files": (lambda t, m: (write(t / "out/notes.txt", "mine"), label_args(m, *J))[1],
                              ["holds files that ftune did not write", "new or empty directory"], True),
    "out-is-a-file": (lambda t, m: (write(t / "out", "mine"), label_args(m, *J))[1], ["is a file, not a directory"], True),
    "damaged-session": (lambda t, m: (write(t / "out" / SESSION_FILE, "{"), label_args(m, *J))[1], [SESSION_FILE, "unreadable labelling session"], True),
    "foreign-session-file": (lambda t, m: (write(t / "out" / SESSION_FILE, '{"format": "other"}'), label_args(m, *J))[1],
                             ["not an ftune labelling session"], True),
    "settings-differ-on-resume": (lambda t, m: (existing_session(t, m), label_args(m, *J, "--n", "2"))[1],
                                  ["was started with --n 3, not 2", "leave out --n"], True),
    "prompts-changed-on-resume": (lambda t, m: (existing_session(t, m, lambda t: write(t / "prompts.txt", PROMPTS.replace("Peru", "Chile"))),
                                                label_args(m, *J))[1], ["prompts.txt line 1", "the prompts file changed"], True),
    "other-model-on-resume": (lambda t, m: (existing_session(t, m), label_args("demo", *J))[1], ["labels answers of", "MODEL is demo"], True),
    "edited-output-refused": (lambda t, m: (existing_session(t, m, lambda t: write(t / "out/kto.jsonl", "my own edits\n")), label_args(m, *J))[1],
                              ["out/kto.jsonl was not written by this labelling session", "move it away"], True),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_gets_a_clear_message(name, work, tiny_model_dir, monkeypatch, capsys):
    build, needles, nothing_written = CASES[name]
    monkeypatch.chdir(work)
    argv = build(work, tiny_model_dir)
    before = snapshot(work)
    code, output = invoke(argv, monkeypatch, capsys)
    assert code not in (0, None), output
    assert "error: " in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert "Traceback" not in output and "ftune/label" not in output, output
    after = snapshot(work)
    assert {path: after.get(path) for path in before} == before, "files that were there are left as they were"
    if nothing_written:
        assert after == before, "a command refused before it starts writes nothing"


def test_the_bad_input_corpus_is_large_enough():
    assert len(CASES) >= 30

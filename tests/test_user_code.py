"""The user's own code (GRPO reward functions, label judges, chat templates) misbehaving, through the
real entry point: it raises, exits (0 or 3), os._exits, hangs, forks, prints, returns NaN, 10**400,
1e39, a string or the wrong count, or is defined inside `try:`. A run survives what it can (prints,
forks, a def in try:) and otherwise stops with one line naming the function and the data row, no
traceback, pre-existing files byte-identical, the run marked failed, and no worker process left.
Stop signals stop a run promptly while a reward function hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftune import cli
from ftune.commands.label.session import SESSION_FILE
from helpers import snapshot, write_grpo_recipe

PROMPTS = [{"prompt": f"What is {a} plus {b}?", "answer": a + b} for a in range(1, 4) for b in range(1, 4)]
OK = "[float(len(c) % 3) for c in completions]"  # a valid reward for every completion

# misbehaviour -> (the body of a function returning `valid` when it survives, what the error names; None: the run succeeds)
BODIES = {
    "raises": ("raise ValueError('no grade for this')", ["raised ValueError: no grade for this", "in {fn}"]),
    "exit_0": ("sys.exit(0)", ["called sys.exit(0)"]),
    "exit_3": ("sys.exit(3)", ["called sys.exit(3)"]),
    "os_exit": ("os._exit(0)", ["ended its worker process (exit code 0)"]),
    "hangs": ("while True:\n        pass", ["did not return within 2 s", "{limit}"]),
    "forks": ("os.fork()\n    return {valid}", None),
    "prints": ("print('NOISE FROM USER CODE')\n    return {valid}", None),
    "nan": ("return [float('nan')] * {count}", ["nan"]),
    "huge_int": ("return [10 ** 400] * {count}", ["{huge}"]),
    "float32_overflow": ("return [1e39] * {count}", ["{overflow}"]),
    "string": ("return 'excellent'", ["{string}"]),
    "wrong_count": ("return [1.0] * ({count} + 1)", ["{count_word}"]),
    # Not sent back as they are (a worker pickles builtins only): still named by their own type.
    "generator": ("return (v for v in {valid})", ["{generator}"]),
    "dict": ("return dict(enumerate({valid}))", ["{dict}"]),
}
SURVIVES = {"forks", "prints"}


def source(case: str, fn: str, args: str, valid: str, count: str) -> str:
    body, _ = BODIES[case]
    body = body.format(valid=valid, count=count)
    return f"import os\nimport sys\n\n\ndef {fn}({args}):\n    {body}\n"


def workers_for(folder: Path) -> list[str]:
    """Live worker processes running a user file under `folder` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "ftune.guards.usercode_worker" in command and str(folder) in command and state != "Z":
            found.append(f"{entry.name}: {command}")
    return found


def run_cli(argv: list[str], monkeypatch, capfd) -> tuple[int, str, str]:
    """The real entry point in-process; stdout and stderr at the file-descriptor level (the workers' too)."""
    monkeypatch.setattr(sys, "argv", ["ftune", *map(str, argv)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capfd.readouterr()
    return info.value.code or 0, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, needles: list[str]) -> None:
    text = out + err
    assert code not in (0, None), text
    assert "Traceback" not in text, text
    error = text[text.index("error: "):]
    for needle in needles:
        assert needle in error, f"{needle!r} not in:\n{error}"


# --------------------------------------------------------------------------- GRPO reward functions


def grpo_recipe(folder: Path, model: Path, code: str, *, rows=PROMPTS, timeout: float = 2, extra: str = "") -> Path:
    """One grpo step on `rows`, rewarded by `score` in `code` with a `timeout` seconds bound; no held-out prompts."""
    return write_grpo_recipe(folder, model, rewards_yaml=f"[{{type: function, function: rewards.py:score, timeout_s: {timeout}}}]",
                             grpo="{num_generations: 2, max_completion_length: 6}", training={"max_steps": 1}, extra=extra,
                             rows=rows, reward_code=code, eval_fraction=0)


@pytest.mark.parametrize("case", list(BODIES))
def test_a_reward_function_that_misbehaves(case, tmp_path, tiny_model_dir, monkeypatch, capfd):
    recipe = grpo_recipe(tmp_path, tiny_model_dir, source(case, "score", "prompts, completions, **columns", OK, "len(completions)"))
    before = snapshot(tmp_path)
    code, out, err = run_cli(["grpo", recipe], monkeypatch, capfd)
    assert not workers_for(tmp_path), "no worker outlives the command"
    if case in SURVIVES:
        assert code == 0, out + err
        assert (out + err).count("finished") == 1, out + err  # one process finished the run, once
        assert "NOISE FROM USER CODE" not in out  # the user's prints go to stderr, never ftune's stdout
        if case == "prints":
            assert "NOISE FROM USER CODE" in err
        return
    needles = ["reward function 'score' (rewards.py:score)", "data.jsonl line "]
    needles += [n.format(fn="score", limit="rewards[0].timeout_s", huge="integer of about 401 digits",
                         overflow="1e+39 for completion 0, beyond float32's range",
                         count_word="returned 5 values for 4 completions", string="returned str, not a list of 4 numbers",
                         generator="returned generator, not a list of 4 numbers", dict="returned dict, not a list of 4 numbers")
                for n in BODIES[case][1]]
    assert_one_line_error(code, out, err, needles)
    after = {p: rest for p, *rest in snapshot(tmp_path)}
    assert all(after[p] == rest for p, *rest in before), "pre-existing files stay byte-identical"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_reward_function_defined_inside_try_works(tmp_path, tiny_model_dir, monkeypatch, capfd):
    code_text = f"try:\n    import numpy\nexcept ImportError:\n    numpy = None\n\ntry:\n    def score(prompts, completions, **kw):\n        return {OK}\nexcept Exception:\n    pass\n"
    recipe = grpo_recipe(tmp_path, tiny_model_dir, code_text)
    code, out, err = run_cli(["grpo", recipe], monkeypatch, capfd)
    assert code == 0, out + err
    assert not workers_for(tmp_path)


@pytest.mark.parametrize("code_text,needles", [
    ("import sys\nsys.exit(0)\n", ["rewards.py", "loading rewards.py called sys.exit(0)"]),
    ("import os\nos._exit(0)\n", ["rewards.py", "ended its worker process"]),
    ("raise RuntimeError('no key')\n", ["rewards.py", "loading rewards.py raised RuntimeError: no key", "line 1, in <module>"]),
    ("def score(:\n", ["rewards.py line 1", "invalid Python"]),
    ("score = 3\n", ["'score' is not a function"]),
])
def test_a_reward_file_that_cannot_load_names_the_file(code_text, needles, tmp_path, tiny_model_dir, monkeypatch, capfd):
    recipe = grpo_recipe(tmp_path, tiny_model_dir, code_text)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["grpo", recipe], monkeypatch, capfd)
    assert_one_line_error(code, out, err, needles)
    assert snapshot(tmp_path) == before, "found before anything is written"
    assert not workers_for(tmp_path)


HANG = "import pathlib\n\ndef score(prompts, completions, **kw):\n    pathlib.Path({marker!r}).write_text('x')\n    while True:\n        pass\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_a_run_while_its_reward_function_hangs(signum, tmp_path, tiny_model_dir):
    marker = tmp_path / "hanging"
    recipe = grpo_recipe(tmp_path, tiny_model_dir, HANG.format(marker=str(marker)), timeout=3600)
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1"}
    victim = subprocess.Popen([sys.executable, "-m", "ftune", "grpo", str(recipe)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert victim.poll() is None, victim.communicate()[0][-3000:]
            assert time.time() < deadline, "the reward function was never called"
            time.sleep(0.1)
        victim.send_signal(signum)
        output = victim.communicate(timeout=60)[0]  # a generous guard: the hang would last an hour
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == 130, output
    assert signal.Signals(signum).name in output and "Traceback" not in output, output
    for _ in range(50):  # the worker is killed before ftune exits; /proc may lag a moment
        if not workers_for(tmp_path):
            break
        time.sleep(0.1)
    assert not workers_for(tmp_path), "no orphaned worker"


# --------------------------------------------------------------------------- label judges


def label_argv(model: Path, judge: str, *extra: str) -> list[str]:
    return ["label", str(model), "--prompts", "prompts.txt", "--out", "out", "--n", "2", "--max-new-tokens", "4",
            "--judge", judge, "--judge-timeout", "2", *extra]


@pytest.mark.parametrize("case", list(BODIES))
def test_a_judge_that_misbehaves(case, tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("What is 2 plus 2?\nName a colour.\n")
    (tmp_path / "judge.py").write_text(source(case, "judge", "prompt, answers", "['good'] * len(answers)", "len(answers)"))
    before = snapshot(tmp_path)
    code, out, err = run_cli(label_argv(tiny_model_dir, "judge.py:judge"), monkeypatch, capfd)
    assert not workers_for(tmp_path), "no worker outlives the command"
    if case in SURVIVES:
        assert code == 0, out + err
        assert "NOISE FROM USER CODE" not in out
        assert all(item["decided_by"] for item in json.loads((tmp_path / "out" / SESSION_FILE).read_text())["items"])
        return
    judged = {"nan": "label 0 is nan", "huge_int": "label 0 is 1000", "float32_overflow": "label 0 is 1e+39",
              "string": "returned 'excellent': expected a list of", "wrong_count": "labels for",
              "generator": "returned <generator object", "dict": "returned {0: 'good', 1: 'good'}"}
    needles = ["judge judge.py:judge", "prompts.txt line 1"]
    needles += [judged[case]] if case in judged else [n.format(fn="judge", limit="--judge-timeout") for n in BODIES[case][1]]
    assert_one_line_error(code, out, err, needles)
    after = {p: rest for p, *rest in snapshot(tmp_path)}
    assert all(after[p] == rest for p, *rest in before), "pre-existing files stay byte-identical"


def test_a_judge_defined_inside_try_works(tmp_path, tiny_model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("What is 2 plus 2?\n")
    (tmp_path / "judge.py").write_text("try:\n    def judge(prompt, answers):\n        return 0\nexcept Exception:\n    pass\n")
    code, out, err = run_cli(label_argv(tiny_model_dir, "judge.py:judge"), monkeypatch, capfd)
    assert code == 0, out + err
    assert not workers_for(tmp_path)


# --------------------------------------------------------------------------- chat templates

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {
    "raises": "{% if messages[0]['content'] == 'TRIGGER' %}{{ raise_exception('no TRIGGER here') }}{% endif %}" + CHATML,
    "hangs": ("{% if messages[0]['content'] == 'TRIGGER' %}{% for i in range(100000) %}{% for j in range(100000) %}"
              "{% endfor %}{% endfor %}{% endif %}" + CHATML),
}


@pytest.fixture
def one_second_renders(monkeypatch):
    """The render bound at 1 s instead of 10, so a runaway template costs each test a second (forked
    tokenization workers inherit it)."""
    from ftune.data import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1)


def template_recipe(folder: Path, model: Path, stage: str, template: str, extra: str = "") -> Path:
    if stage == "grpo":
        rows = [{"prompt": f"Question {i}?", "answer": i} for i in range(6)]
        rows[3] = {"prompt": "TRIGGER", "answer": 3}
        head = ("grpo: {num_generations: 2, max_completion_length: 6}\nrewards: [{type: exact_answer}]\n"
                "training: {batch_size: 2, max_steps: 1}\n")
    else:
        rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(6)]
        rows[3] = {"instruction": "TRIGGER", "output": "3"}
        head = "training: {batch_size: 2, max_steps: 1}\n"
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "recipe.yaml"
    path.write_text(f"stage: {'grpo' if stage == 'grpo' else 'sft'}\nbase_model: {{name: {model}}}\n"
                    f"data:\n  train: [{{path: data.jsonl}}]\n  eval_fraction: 0\n  max_length: 64\n"
                    f"  chat_template: {json.dumps(template)}\n{extra}{head}output: {{dir: run}}\n")
    return path


@pytest.mark.parametrize("case", list(TEMPLATES))
@pytest.mark.parametrize("command", ["sft", "inspect", "grpo"])
def test_a_chat_template_that_misbehaves_on_one_row(command, case, tmp_path, tiny_model_dir, monkeypatch, capfd, one_second_renders):
    recipe = template_recipe(tmp_path, tiny_model_dir, command, TEMPLATES[case])
    before = snapshot(tmp_path)
    code, out, err = run_cli([command if command != "grpo" else "grpo", recipe], monkeypatch, capfd)
    needles = ["data.jsonl line 4", "data.chat_template (inline)"]
    needles += ["no TRIGGER here"] if case == "raises" else ["took more than 1 s to render"]
    assert_one_line_error(code, out, err, needles)
    assert snapshot(tmp_path) == before, "found while reading the data: nothing written"


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_a_row_the_template_rejects_is_skipped_when_asked(command, tmp_path, tiny_model_dir, monkeypatch, capfd):
    recipe = template_recipe(tmp_path, tiny_model_dir, command, TEMPLATES["raises"])
    recipe.write_text(recipe.read_text().replace("  chat_template:", "  on_bad_row: skip\n  chat_template:"))
    code, out, err = run_cli([command, recipe], monkeypatch, capfd)
    assert code == 0, out + err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_a_chat_template_that_misbehaves_in_a_tokenization_worker(case, tmp_path, tiny_model_dir, monkeypatch, capfd, one_second_renders):
    """data.num_proc: 2 and more rows than one job: the row is rendered in a worker process, bounded there too."""
    recipe = template_recipe(tmp_path, tiny_model_dir, "sft", TEMPLATES[case], extra="")
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(2100)]
    rows[1500] = {"instruction": "TRIGGER", "output": "1500"}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe.write_text(recipe.read_text().replace("  chat_template:", "  num_proc: 2\n  chat_template:"))
    code, out, err = run_cli(["sft", recipe], monkeypatch, capfd)
    assert_one_line_error(code, out, err, ["data.jsonl line 1501", "data.chat_template (inline)",
                                           "no TRIGGER here" if case == "raises" else "took more than 1 s to render"])

"""Ctrl-C (SIGINT) and SIGTERM in every phase of every command that is not a training stage
(those are in test_loop.py and test_resume.py): the command stops promptly with exit 130 (both
signals, as training always has), one line saying it stopped (and how to continue where a
session is kept), no traceback, no process left running in its group (tokenization workers,
generation threads end with it), every earlier output byte-identical and no `.partial-` folder
or file left behind.

Each case runs ftune in a child process with one function wrapped to pause (helpers.start_paused),
so that the signal lands in that phase however fast or slow the machine is (a pause inside
llama.cpp's quantizer holds signals in its thread, as the C call does). The full
command x phase x signal product would start about 40 processes of several seconds each; each
phase is tried with one signal instead (MATRIX), so that every command with two phases or more
gets both signals, and the generation thread of `ftune chat` gets both. SIGINT goes to the
whole process group (as a terminal's Ctrl-C does), SIGTERM to the process alone (as `kill PID`
does). SIGTERM in `ftune label`'s terminal mode is in test_label.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import GOOD_ROWS, invoke, pause_spec, process_group_members, snapshot, start_paused, wait_for, write_jsonl

STREAMER_PUT = "transformers.generation.streamers:TextIteratorStreamer.put"
LONG_ANSWER = ["--max-new-tokens", "1500", "--temperature", "0"]  # minutes of tokens, were generation not cut short
HANG_GUARD = 90  # seconds: a stuck command fails the test instead of hanging it; the pauses themselves last an hour
JUDGE_HANGS = "import time\nfrom pathlib import Path\n\ndef judge(prompt, answers):\n    Path({marker!r}).touch()\n    time.sleep(3600)\n"


@dataclass
class Case:
    argv: list
    pauses: list
    says: list  # in the output, besides "no traceback"
    kept: Path | None = None  # a folder whose files must be exactly as they were before the command
    stdin: Path | None = None  # what the user types
    marker: Path | None = None  # what says the command reached the phase (default: the first pause's marker)
    env: dict = field(default_factory=dict)
    after: object = None  # a further check on the work folder


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    from ftune.stages import sft

    folder = tmp_path_factory.mktemp("sft")
    write_jsonl(folder / "data.jsonl", GOOD_ROWS)
    (folder / "recipe.yaml").write_text(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: data.jsonl}}]\n"
                                        "  eval_fraction: 0.25\n  max_length: 64\ntraining: {max_steps: 1, batch_size: 2}\n"
                                        "output: {dir: run}\n")
    return sft.run(folder / "recipe.yaml")


PAIRS = [{"prompt": f"Reply to message {i}.", "chosen": f"Thank you for message {i}!", "rejected": f"Go away, {i}."} for i in range(8)]
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]}
         for i in range(6)]


def before(argv: list, monkeypatch, capsys) -> None:
    """The earlier output the interrupted command would replace, written by the same command."""
    code, output = invoke(argv, monkeypatch, capsys)
    assert code == 0, output


# --------------------------------------------------------------------------- each command's phases


def score(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    write_jsonl(tmp / "pairs.jsonl", PAIRS)
    argv = ["score", runs["rm"], "--data", tmp / "pairs.jsonl", "--out", tmp / "out" / "scored.jsonl"]
    before(argv, monkeypatch, capsys)
    target = {"model-load": "ftune.modeling.reward_model:load", "scoring": "ftune.modeling.reward_model:RewardModel.score_ids"}[phase]
    return Case([*argv, "--overwrite"], [pause_spec(target, markers / "paused")], ["ftune score stopped"], kept=tmp / "out")


def label(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    (tmp / "prompts.txt").write_text("Say hello.\nName a colour.\n")
    argv = ["label", model, "--prompts", tmp / "prompts.txt", "--out", tmp / "labels", "--n", "2", "--max-new-tokens", "4"]
    says = ["every decision so far is saved", "--resume"]
    if phase == "sampling":
        return Case([*argv, "--generate-only"], [pause_spec("ftune.commands.chat:sample_answers", markers / "paused", call=2)], says,
                    after=lambda work: _answers_stored(work / "labels", 1))
    # A judge that hangs: user code must not keep the command from stopping.
    (tmp / "judge.py").write_text(JUDGE_HANGS.format(marker=str(markers / "judging")))
    return Case([*argv, "--judge", f"{tmp / 'judge.py'}:judge"], [], says, marker=markers / "judging",
                after=lambda work: _answers_stored(work / "labels", 1))


def _answers_stored(folder: Path, prompts: int) -> None:
    from ftune.commands.label.session import SESSION_FILE

    state = json.loads((folder / SESSION_FILE).read_text())
    assert sum(item["answers"] is not None for item in state["items"]) == prompts, state


def eval_(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    out = tmp / "out" / "results.json"
    if phase == "scoring":
        argv = ["eval", model, "--recipe", runs["sft"].parent / "recipe.yaml", "--out", out]
        before(argv, monkeypatch, capsys)
        return Case(argv, [pause_spec("ftune.commands.evaluate:score", markers / "paused")], ["ftune eval stopped"], kept=tmp / "out")
    if phase == "generation":
        argv = ["eval", model, "--prompt", "Count to a thousand.", *LONG_ANSWER, "--out", out]
        return Case(argv, [pause_spec(STREAMER_PUT, markers / "paused", call=3, hold=0.2)], ["ftune eval stopped"],
                    after=lambda work: _absent(out))
    pytest.importorskip("lm_eval")
    tasks = _lm_eval_tasks(tmp / "tasks")
    argv = ["eval", model, "--lm-eval-include", tasks, "--lm-eval-tasks", "ftune_codeword", "--out", out]
    return Case(argv, [pause_spec("lm_eval.models.huggingface:HFLM.loglikelihood", markers / "paused")], ["ftune eval stopped"],
                after=lambda work: _absent(out))


def _lm_eval_tasks(folder: Path) -> Path:
    folder.mkdir()
    docs = folder / "docs.jsonl"
    write_jsonl(docs, [{"question": f"What is the code word {i}?", "choices": ["pineapple", "banana"], "answer": 0} for i in range(4)])
    (folder / "codeword.yaml").write_text(
        f"task: ftune_codeword\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def _absent(path: Path) -> None:
    assert not path.exists(), f"{path} was written by a stopped command"


def chat(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    if phase == "generation":
        return Case(["chat", runs["sft"], "--prompt", "Count to a thousand.", *LONG_ANSWER],
                    [pause_spec(STREAMER_PUT, markers / "paused", call=3, hold=0.2)], ["ftune chat stopped"])
    # In the chat loop Ctrl-C stops one answer (or leaves at the prompt); SIGTERM always stops the command.
    (tmp / "typed.txt").write_text("Count to a thousand.\n")
    target = {"interactive-prompt": "builtins:input", "interactive-answer": "ftune.commands.chat:HFModel.stream"}[phase]
    return Case(["chat", runs["sft"], *LONG_ANSWER], [pause_spec(target, markers / "paused")], ["ftune chat stopped"],
                stdin=tmp / "typed.txt")


def export_gguf(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    pytest.importorskip("llama_cpp")
    out = tmp / "out" / "m.gguf"
    # The earlier export has its parity report too when this one checks its file: neither may change.
    before(["export-gguf", model, "--out", out, "--type", "f16", *([] if phase == "verification" else ["--no-verify"])],
           monkeypatch, capsys)
    argv = ["export-gguf", model, "--out", out, "--overwrite"]
    argv += {"conversion": ["--type", "f16"], "quantization": ["--type", "q4_k_m", "--no-verify"],
             "verification": ["--type", "f16"], "report": ["--type", "f16", "--no-verify", "--report", "--data", tmp / "rows.jsonl"]}[phase]
    write_jsonl(tmp / "rows.jsonl", CHATS)
    # Quantization: inside llama.cpp's own call, where Python code runs no signal handler until it returns.
    target = {"conversion": "ftune.gguf.convert:convert", "quantization": "llama_cpp:llama_model_quantize",
              "verification": "ftune.gguf.verify:verify_gguf", "report": "ftune.gguf.report:measure"}[phase]
    pause = pause_spec(target, markers / "paused", blocking=phase == "quantization")
    if phase == "report":  # measured once every file is exported and published: those are whole, the report is not written
        return Case(argv, [pause], ["ftune export-gguf stopped"], after=lambda work: _unreported(out))
    return Case(argv, [pause], ["ftune export-gguf stopped"], kept=tmp / "out")


def _unreported(out: Path) -> None:
    import gguf

    assert gguf.GGUFReader(str(out)).tensors, "a whole GGUF file"
    assert not list(out.parent.glob("*.report.*")), list(out.parent.iterdir())


def merge(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    out = tmp / "out" / "merged"
    before(["merge", runs["sft"], "--out", out, "--no-verify"], monkeypatch, capsys)
    target = {"merge": "ftune.merge.command:write_weights", "parity-check": "ftune.merge.command:verify_parity"}[phase]
    return Case(["merge", runs["sft"], "--out", out, "--overwrite"], [pause_spec(target, markers / "paused")],
                ["ftune merge stopped"], kept=tmp / "out")


def data(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    recipe = _recipe(tmp, model, [*GOOD_ROWS, *GOOD_ROWS])
    argv = ["data", recipe, "--exact", "--out", tmp / "out" / "curated"]
    before(argv, monkeypatch, capsys)
    return Case([*argv, "--overwrite"], [pause_spec("ftune.commands.curate:_curate_source", markers / "paused")], ["ftune data stopped"],
                kept=tmp / "out")


def inspect(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    rows = [{"instruction": f"Repeat {i} twice.", "output": f"{i} {i}"} for i in range(3000)]  # three jobs: workers start
    recipe = _recipe(tmp, model, rows, extra="  num_proc: 2\n")
    return Case(["inspect", recipe], [pause_spec("ftune.data.build:_Workers.result", markers / "paused", call=2)],
                ["ftune inspect stopped"], env={"FTUNE_CACHE": str(tmp / "cache")},
                after=lambda work: _no_spill(work / "cache" / "data"))


def _no_spill(cache: Path) -> None:
    assert not list(cache.glob(".*")), f"half-built cache entries left: {list(cache.iterdir())}"


def _recipe(tmp: Path, model: Path, rows: list, extra: str = "") -> Path:
    write_jsonl(tmp / "data.jsonl", rows)
    (tmp / "recipe.yaml").write_text(f"stage: sft\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: data.jsonl}}]\n"
                                     f"  max_length: 64\n{extra}training: {{max_steps: 1, batch_size: 2}}\noutput: {{dir: run}}\n")
    return tmp / "recipe.yaml"


def grpo(phase, tmp, markers, model, runs, monkeypatch, capsys) -> Case:
    write_jsonl(tmp / "data.jsonl", [{"prompt": f"What is {a} plus {b}?", "answer": a + b} for a in range(1, 5) for b in range(1, 4)])
    (tmp / "rewards.py").write_text("def vowels(prompts, completions, **columns):\n"
                                    "    return [sum(ch in 'aeiou' for ch in c) / max(len(c), 1) for c in completions]\n")
    (tmp / "recipe.yaml").write_text(
        f"stage: grpo\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: data.jsonl}}]\n  eval_fraction: 0.2\n  max_length: 64\n"
        "grpo: {num_generations: 4, max_completion_length: 8}\nrewards: [{type: function, function: rewards.py:vowels}]\n"
        "training: {learning_rate: 1.0e-2, batch_size: 2, max_steps: 50, warmup_ratio: 0}\noutput: {dir: run}\n")
    # Generation inside a step: the first signal stops at the end of that step and keeps a checkpoint.
    return Case(["grpo", tmp / "recipe.yaml"], [pause_spec("ftune.stages.rl.generation:TransformersBackend.generate", markers / "paused",
                                                            hold=1)],
                ["checkpoint saved", "resume with: ftune grpo"], after=lambda work: _checkpoint_kept(work / "run"))


def _checkpoint_kept(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "interrupted", meta
    assert list((run_dir / "checkpoints").glob("step-*/state.json")), "the checkpoint a resume needs"


COMMANDS = {
    "score": (score, ["model-load", "scoring"]),
    "label": (label, ["sampling", "judging"]),
    "eval": (eval_, ["scoring", "generation", "lm-eval"]),
    "chat": (chat, ["generation", "interactive-prompt", "interactive-answer"]),
    "export-gguf": (export_gguf, ["conversion", "quantization", "verification", "report"]),
    "merge": (merge, ["merge", "parity-check"]),
    "data": (data, ["curation"]),
    "inspect": (inspect, ["tokenization-workers"]),
    "grpo": (grpo, ["generation"]),
}
MATRIX = [  # (command, phase, signal): each command gets both signals where it has two phases or more
    ("score", "model-load", "SIGTERM"), ("score", "scoring", "SIGINT"),
    ("label", "sampling", "SIGTERM"), ("label", "judging", "SIGINT"),
    ("eval", "scoring", "SIGINT"), ("eval", "generation", "SIGTERM"), ("eval", "lm-eval", "SIGINT"),
    ("chat", "generation", "SIGTERM"), ("chat", "generation", "SIGINT"),  # a generation thread: both signals
    ("chat", "interactive-prompt", "SIGTERM"), ("chat", "interactive-answer", "SIGTERM"),
    ("export-gguf", "conversion", "SIGINT"), ("export-gguf", "quantization", "SIGTERM"),
    ("export-gguf", "verification", "SIGINT"), ("export-gguf", "report", "SIGTERM"),
    ("merge", "merge", "SIGINT"), ("merge", "parity-check", "SIGTERM"),
    ("data", "curation", "SIGTERM"), ("inspect", "tokenization-workers", "SIGINT"), ("grpo", "generation", "SIGTERM"),
]
assert {(c, p) for c, p, _ in MATRIX} == {(c, p) for c, (_, phases) in COMMANDS.items() for p in phases}


def stop(process, name: str) -> None:
    if name == "SIGINT":
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        process.send_signal(signal.SIGTERM)


def finished(process) -> str:
    try:
        output = process.communicate(timeout=HANG_GUARD)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running {HANG_GUARD} s after the signal:\n{process.communicate()[0][-3000:]}")
    deadline = time.time() + 30  # killed children take a moment to be reaped
    while process_group_members(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = process_group_members(process.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after ftune stopped: {left}\n{output[-3000:]}"
    return output


def assert_stopped(process, output: str, name: str, says: list, work: Path) -> None:
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for needle in says:
        assert needle in output, f"{needle!r} not in:\n{output[-3000:]}"
    if any(needle.startswith("ftune ") for needle in says):  # the entry point's own line names the signal
        assert errors[0].startswith(f"error: {name}: ftune ") and "nothing half-written was kept" in errors[0], errors[0]
    leftovers = [p for p in work.rglob("*") if ".partial-" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("command, phase, name", MATRIX, ids=[f"{c}-{p}-{n}" for c, p, n in MATRIX])
def test_a_stop_signal_in_any_phase_stops_the_command_cleanly(command, phase, name, tmp_path, tiny_model_dir, request,
                                                              monkeypatch, capsys):
    runs = {"sft": request.getfixturevalue("sft_run") if command in ("eval", "chat", "merge") else None,
            "rm": request.getfixturevalue("rm_run") if command == "score" else None}
    work, markers = tmp_path / "work", tmp_path / "markers"
    work.mkdir()
    markers.mkdir()
    monkeypatch.chdir(work)
    case = COMMANDS[command][0](phase, work, markers, tiny_model_dir, runs, monkeypatch, capsys)
    earlier = snapshot(case.kept) if case.kept else None
    process = start_paused(case.argv, case.pauses, cwd=work, env=case.env, stdin=case.stdin)
    wait_for(case.marker or Path(case.pauses[0]["marker"]), process, timeout=300)
    stop(process, name)
    output = finished(process)
    assert_stopped(process, output, name, case.says, work)
    if earlier is not None:
        assert snapshot(case.kept) == earlier, "an earlier output must be exactly as it was"
    if case.after:
        case.after(work)


# --------------------------------------------------------------------------- a second Ctrl-C while cleaning up


def test_a_second_ctrl_c_during_cleanup_still_leaves_no_half_written_output(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The first Ctrl-C stops `ftune data`; the second lands while its temporary folder is being removed:
    the removal finishes, the earlier output stays as it was, and the command still ends at once."""
    work, markers = tmp_path / "work", tmp_path / "markers"
    work.mkdir()
    markers.mkdir()
    monkeypatch.chdir(work)
    recipe = _recipe(work, tiny_model_dir, [*GOOD_ROWS, *GOOD_ROWS])
    argv = ["data", recipe, "--exact", "--out", work / "out" / "curated"]
    before(argv, monkeypatch, capsys)
    earlier = snapshot(work / "out")
    process = start_paused([*argv, "--overwrite"], [
        pause_spec("ftune.commands.curate:_curate_source", markers / "curating"),
        pause_spec("shutil:rmtree", markers / "cleaning", match=".partial-", until=markers / "go-on"),
    ], cwd=work)
    wait_for(markers / "curating", process)
    os.killpg(process.pid, signal.SIGINT)
    wait_for(markers / "cleaning", process, timeout=HANG_GUARD)
    os.killpg(process.pid, signal.SIGINT)  # while the half-written folder is being removed
    time.sleep(0.5)
    (markers / "go-on").touch()
    output = finished(process)
    assert_stopped(process, output, "SIGINT", ["ftune data stopped"], work)
    assert snapshot(work / "out") == earlier


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_while_the_command_line_is_still_loading(name, tmp_path):
    """Before any command runs, the command line imports typer, rich and its own modules (a few tenths of
    a second): a stop then ends ftune at once, with its one line and exit 130, never a KeyboardInterrupt traceback."""
    marker = tmp_path / "loading"
    child = start_paused(["validate", str(tmp_path / "recipe.yaml")], [pause_spec("typer.main:Typer.__init__", marker)])
    wait_for(marker, child, timeout=HANG_GUARD)
    if name == "SIGINT":
        os.killpg(child.pid, signal.SIGINT)
    else:
        child.send_signal(signal.SIGTERM)
    output = child.communicate(timeout=HANG_GUARD)[0]
    assert child.returncode == 130, output
    assert output.strip() == f"error: {name}: ftune stopped while starting; nothing was written", output
    assert list(tmp_path.iterdir()) == [marker]

"""What the tests share: running ftune through its real entry point, snapshots of the disk,
the checks every refusal must pass, small recipes and data (the sft, grpo and rm recipes several
test files train), and runs killed at a checkpoint."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftune import cli
from ftune.recipe import parse_recipe

GOOD_ROWS = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(8)]


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def recipe_text(model, data: str = "data.jsonl", *, stage: str = "sft", extra: str = "", fmt: str = "") -> str:
    source = f"{{path: {data}{', format: ' + fmt if fmt else ''}}}"
    text = (f"stage: {stage}\nbase_model: {{name: {model}}}\ndata:\n  train: [{source}]\n  eval_fraction: 0.25\n  max_length: 64\n"
            f"training: {{max_steps: 1, batch_size: 2}}\n{extra}output: {{dir: run}}\n")
    if stage == "dpo" and "preference:" not in extra:
        text += "preference: {method: dpo}\n"
    return text


def setup(tmp: Path, model: Path, *, rows=GOOD_ROWS, text: str | None = None, **kw) -> list[str]:
    if rows is not None:
        write_jsonl(tmp / "data.jsonl", rows)
    (tmp / "recipe.yaml").write_text(text if text is not None else recipe_text(model, **kw))
    return ["sft" if "stage: dpo" not in (tmp / "recipe.yaml").read_text() else "dpo", str(tmp / "recipe.yaml")]


def bin_only_model(tmp: Path, model: Path) -> Path:
    """A model directory whose weights exist only as a pickle-based .bin file."""
    import shutil

    target = tmp / "pickled"
    shutil.copytree(model, target)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(b"not loaded: ftune refuses pickle files")
    return target


def sft_run_dir(tmp: Path, *, status: str, base: str) -> Path:
    run = tmp / "sft-run"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"ftune_version": "0.1.0", "stage": "sft", "status": status,
                                              "base_model": {"name": base, "path": base}}))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    return run


PAIRS = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(8)]

def with_file(tmp: Path, name: str, content: bytes, argv: list[str]) -> list[str]:
    """Replace a data file after `setup` wrote the recipe (for content `setup` cannot express)."""
    (tmp / name).write_bytes(content)
    return argv


def empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def silent_template_model(tmp: Path, model: Path) -> Path:
    import shutil

    target = tmp / "silent"
    shutil.copytree(model, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- recipes and rows several test files use


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows in the format the file's suffix names: JSONL, a JSON list, CSV or Parquet."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def recipe_for(tmp_path: Path, extra: str = "", data: str = "train.jsonl") -> object:
    """A parsed sft recipe on the demo model reading `data` (extra: more lines of its data section)."""
    text = f"stage: sft\nbase_model: {{name: demo}}\ndata:\n  train: [{{path: {data}}}]\n  eval_fraction: 0.2\n{extra}output: {{dir: out}}\n"
    return parse_recipe(text, str(tmp_path / "r.yaml"))


CODE_WORD_ROWS = [
    {"messages": [{"role": "user", "content": f"What is the code word {i}?"}, {"role": "assistant", "content": "The code word is pineapple."}]}
    for i in range(24)
]


def code_word_recipe(tmp_path: Path, model: Path, extra: str = "", rows=CODE_WORD_ROWS) -> Path:
    """An sft recipe a tiny model learns in 6 steps: the code word is pineapple."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"stage: sft\nbase_model: {{name: {model}}}\n"
        "data:\n  train: [{path: train.jsonl}]\n  eval_fraction: 0.25\n  max_length: 64\n"
        "adapter: {r: 8, alpha: 16}\n"
        "training:\n  learning_rate: 2.0e-2\n  batch_size: 2\n  max_steps: 6\n  eval_steps: 3\n  warmup_ratio: 0\n"
        f"{extra}output: {{dir: run}}\n"
    )
    return recipe


ADDITION_PROMPTS = [{"prompt": f"What is {a} plus {b}?", "answer": a + b} for a in range(1, 7) for b in range(1, 5)]
# A verifiable toy task a random tiny model can learn in a few steps: the share of vowels in the completion.
DIGITS = "def digits(prompts, completions, **columns):\n    return [sum(ch in 'aeiou' for ch in c) / max(len(c), 1) for c in completions]\n"


def write_grpo_recipe(folder: Path, model: Path, *, rewards_yaml: str = "[{type: function, function: rewards.py:digits}]",
                      grpo: str = "{num_generations: 4, max_completion_length: 12}", training: dict | None = None, extra: str = "",
                      rows=ADDITION_PROMPTS, reward_code: str = DIGITS, eval_fraction: float = 0.2) -> Path:
    """A grpo recipe on the addition prompts, rewarded by a function in rewards.py (default: DIGITS)."""
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rewards.py").write_text(reward_code)
    path = folder / "recipe.yaml"
    path.write_text(
        f"stage: grpo\nbase_model: {{name: {model}}}\n"
        f"data:\n  train: [{{path: data.jsonl}}]\n  eval_fraction: {eval_fraction}\n  max_length: 64\n"
        f"grpo: {grpo}\nrewards: {rewards_yaml}\n"
        f"training: {json.dumps({'learning_rate': 1.0e-2, 'batch_size': 2, 'max_steps': 2, 'warmup_ratio': 0, **(training or {})})}\n"
        f"{extra}output: {{dir: run}}\n")
    return path


RM_PAIRS = [{"prompt": f"Reply to message {i}.", "chosen": f"Thank you kindly for message {i}!", "rejected": f"Go away, message {i}."}
            for i in range(24)]


def rm_recipe(folder: Path, model, *, rows=RM_PAIRS, rm: str = "{center_coefficient: 0.01}", extra: str = "",
              training: str = "max_steps: 6, batch_size: 4, eval_steps: 3, learning_rate: 1.0e-3", out: str = "run") -> Path:
    """An rm recipe on RM_PAIRS (the session's `rm_run` fixture is trained from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        write_jsonl(folder / "pairs.jsonl", rows)
    path = folder / "recipe.yaml"
    path.write_text(f"stage: rm\nbase_model: {{name: {model}}}\ndata:\n  train: [{{path: pairs.jsonl}}]\n  eval_fraction: 0.25\n"
                    f"  max_length: 64\n" + (f"rm: {rm}\n" if rm is not None else "") + extra
                    + f"training: {{{training}}}\noutput: {{dir: {out}}}\n")
    return path


def snapshot(root: Path) -> list:
    """Names, sizes, times and contents of everything under root (links as links: they may be broken)."""
    def content(path: Path) -> str:
        if path.is_symlink():
            return "-> " + os.readlink(path)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"

    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns, content(p)) for p in root.rglob("*"))


def invoke(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The real entry point, in-process: what a user sees on the terminal and the exit code."""
    monkeypatch.setattr(sys, "argv", ["ftune", *map(str, argv)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out + captured.err


def assert_refused(code, output: str, needles: list[str]) -> None:
    """A clear refusal: a non-zero exit, an error line holding every needle, no traceback."""
    assert code not in (0, None), output
    assert "error: " in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert "Traceback" not in output


def refused(argv: list[str], needles: list[str], root: Path, monkeypatch, capsys) -> str:
    """Run the command, assert it is refused clearly, and that every file under root is as it was."""
    before = snapshot(root)
    code, output = invoke(argv, monkeypatch, capsys)
    assert_refused(code, output, needles)
    assert snapshot(root) == before, "a failed command must leave the disk as it was"
    return output


# ftune with its checkpoint writer wrapped: once checkpoint `pause_at` is on disk the process
# touches `marker` and sleeps, so a SIGKILL lands between two steps however fast the steps run
# (on an idle machine a tiny run can finish before a poller sees a given checkpoint).
_PAUSING = """
import sys, time
from pathlib import Path
from ftune.cli import main
from ftune.train import checkpoints
pause_at, marker = int(sys.argv.pop(1)), Path(sys.argv.pop(1))
save = checkpoints.save_checkpoint
def save_then_pause(run_dir, step, *args, **kwargs):
    path = save(run_dir, step, *args, **kwargs)
    if step == pause_at:
        marker.touch()
        time.sleep(3600)
    return path
checkpoints.save_checkpoint = save_then_pause
sys.argv[0] = "ftune"
main()
"""


def start(stage: str, recipe: Path, *extra: str, pause_at: int | None = None, marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1"}
    launcher = ["-m", "ftune"] if pause_at is None else ["-c", _PAUSING, str(pause_at), str(marker)]
    return subprocess.Popen([sys.executable, *launcher, stage, str(recipe), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_9_after_checkpoint(stage: str, recipe: Path, step: int, timeout: float = 600) -> None:
    """Run `ftune STAGE RECIPE` until checkpoint `step` is written, then SIGKILL it: no handler, no goodbye."""
    marker = recipe.parent / f"paused-at-{step}"
    victim = start(stage, recipe, pause_at=step, marker=marker)
    deadline = time.time() + timeout
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.time() < deadline, f"no checkpoint {step} in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    marker.unlink()


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# ftune with one function wrapped so that a signal lands in a chosen phase, however fast the machine:
# on call `call` of module:function (a class method as module:Class.method) the process writes its
# pid to `marker`, then either sleeps (`hold` None: only a signal ends the pause), or sleeps `hold`
# seconds on every call from then on (a slow phase that ftune must cut short, e.g. token by token),
# (with `blocking`, stop signals held in that thread, as inside a long call into C),
# or waits until the file `until` exists (the test says when to go on). `match` limits the counted
# calls to those whose first argument contains that text. Test harness only: ftune has no test hooks.
_PAUSE_IN = """
import importlib, json, os, signal, sys, time
from pathlib import Path
for pause in json.loads(os.environ["FTUNE_TEST_PAUSES"]):
    module_name, attr = pause["target"].split(":")
    owner = importlib.import_module(module_name)
    *path, attr = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    def wrap(original, pause=pause, calls=[0]):
        def paused(*args, **kwargs):
            if pause["match"] is None or (args and pause["match"] in str(args[0])):
                calls[0] += 1
                if calls[0] >= pause["call"]:
                    if calls[0] == pause["call"]:
                        Path(pause["marker"]).write_text(str(os.getpid()))
                    if pause["blocking"]:  # like a long call into C: no signal is handled in this thread
                        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                    if pause["until"] is not None:
                        while not Path(pause["until"]).exists():
                            time.sleep(0.02)
                    elif pause["hold"] is not None:
                        time.sleep(pause["hold"])
                    elif calls[0] == pause["call"]:
                        time.sleep(3600)
            return original(*args, **kwargs)
        return paused
    setattr(owner, attr, wrap(getattr(owner, attr)))
from ftune.__main__ import main  # the installed command's entry point
sys.argv = ["ftune", *sys.argv[1:]]
main()
"""


def pause_spec(target: str, marker: Path, *, call: int = 1, hold: float | None = None, until: Path | None = None,
               match: str | None = None, blocking: bool = False) -> dict:
    """`blocking`: the pause holds stop signals in its thread, as a call into C does."""
    return {"target": target, "marker": str(marker), "call": call, "hold": hold, "until": str(until) if until else None,
            "match": match, "blocking": blocking}


def start_paused(argv: list, pauses: list[dict], *, cwd: Path | None = None, env: dict | None = None,
                 stdin: Path | None = None) -> subprocess.Popen:
    """`ftune ARGV` in a child process (its own process group, so its children can be found) with `pauses` in place;
    its standard input is the file `stdin` (what a user types), else empty."""
    environ = {**os.environ, "FTUNE_NO_PROGRESS": "1", "FTUNE_TEST_PAUSES": json.dumps(pauses), **(env or {})}
    with open(stdin or os.devnull, "rb") as typed:
        return subprocess.Popen([sys.executable, "-c", _PAUSE_IN, *map(str, argv)], env=environ, cwd=cwd, stdin=typed,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists; the process ending first (or a hang) fails with its output."""
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"ended (exit {process.returncode}) before reaching its pause:\n{process.communicate()[0][-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"never reached its pause:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.05)


def process_group_members(pgid: int) -> list[int]:
    """Live processes in a process group (Linux /proc): what a stopped command must not leave running."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members

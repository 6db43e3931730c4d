"""Every command that writes, against every kind of output it must not or cannot write (issue #23, classes 1-2).

A matrix of command x case through the real entry point (`cli.main`): a read-only folder, a file
where a folder goes, a full disk, a user's folder, another command's artifact (a run, its adapter,
a merged model, curated data, a GGUF, a scores file), the command's own inputs, and FTUNE_CACHE
pointing at a file. Each must exit non-zero with ONE `error:` line naming the path, no traceback,
and every file that was there before byte-identical.

Tests run as root here and in CI, and root ignores permission bits; so a read-only folder is the
chmod 0o555 a user would do plus what the kernel then answers a non-root process: `os.open`,
`os.mkdir` and `open` for writing under that folder raise EACCES (an existing path, EEXIST, as
Linux checks that first). A full disk is `os.fsync` raising ENOSPC: every ftune write syncs its
file before renaming it into place, so the error lands where a full disk reports it last.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import GOOD_ROWS, PAIRS, invoke, snapshot, write_jsonl

from ftune import cli

# --------------------------------------------------------------------------- the world: artifacts of every kind, built once


def _ftune(argv: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ftune", *map(str, argv)])
        with pytest.raises(SystemExit) as info:
            cli.main()
    assert info.value.code in (0, None), f"building the test world failed: ftune {' '.join(map(str, argv))}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> Path:
    """A recipe with its data, a tiny sft run, a tiny rm run, a merged model, curated data, a GGUF and a scores file."""
    root = tmp_path_factory.mktemp("world")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTUNE_CACHE", str(cache))
        write_jsonl(root / "data.jsonl", GOOD_ROWS + GOOD_ROWS[:2])  # two duplicates: `ftune data --exact` has work
        write_jsonl(root / "pairs.jsonl", PAIRS)
        (root / "prompts.txt").write_text("Say 1.\nSay 2.\n")
        (root / "recipe.yaml").write_text(
            f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: data.jsonl}}]\n  eval_fraction: 0.25\n"
            "  max_length: 64\ntraining: {max_steps: 1, batch_size: 2}\noutput: {dir: run}\n")
        (root / "rm.yaml").write_text(
            f"stage: rm\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: pairs.jsonl}}]\n  eval_fraction: 0.25\n"
            "  max_length: 64\nrm: {}\ntraining: {max_steps: 1, batch_size: 2}\noutput: {dir: rm-run}\n")
        _ftune(["sft", root / "recipe.yaml"])
        _ftune(["rm", root / "rm.yaml"])
        _ftune(["merge", root / "run", "--out", root / "merged", "--no-verify"])
        _ftune(["data", root / "recipe.yaml", "--exact", "--out", root / "curated"])
        _ftune(["export-gguf", root / "merged", "--out", root / "model.gguf", "--type", "f16", "--no-verify"])
        _ftune(["score", root / "rm-run", "--data", root / "pairs.jsonl", "--out", root / "scores.jsonl"])
    return root


@pytest.fixture
def env(world, tmp_path_factory, monkeypatch):
    """Each case's own cache (a refused command may have tokenized first) and working folder."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path_factory.mktemp("case-cache")))
    return world


# --------------------------------------------------------------------------- the commands: argv writing to OUT


def _sft(w: Path, out: Path) -> list:
    return ["sft", w / "recipe.yaml", "--set", f"output.dir={out}", "--overwrite"]


def _data(w: Path, out: Path) -> list:
    return ["data", w / "recipe.yaml", "--exact", "--out", out, "--overwrite"]


def _merge(w: Path, out: Path) -> list:
    return ["merge", w / "run", "--out", out, "--no-verify", "--overwrite"]


def _score(w: Path, out: Path) -> list:
    return ["score", w / "rm-run", "--data", w / "pairs.jsonl", "--out", out, "--overwrite"]


def _eval(w: Path, out: Path) -> list:
    return ["eval", w / "run", "--data", w / "data.jsonl", "--out", out]


def _gguf(w: Path, out: Path) -> list:
    return ["export-gguf", w / "merged", "--out", out, "--type", "f16", "--no-verify", "--overwrite"]


def _label(w: Path, out: Path) -> list:
    return ["label", w / "run", "--prompts", w / "prompts.txt", "--out", out, "--generate-only", "--n", "2", "--max-new-tokens", "2"]


# command -> (argv for OUT, what it writes: a folder or a file name, the kind of artifact it replaces)
COMMANDS = {
    "sft": (_sft, None, "run"),
    "data": (_data, None, "curated"),
    "merge": (_merge, None, "merged"),
    "label": (_label, None, None),
    "score": (_score, "out.jsonl", "scores.jsonl"),
    "eval": (_eval, "out.json", None),
    "export-gguf": (_gguf, "out.gguf", "model.gguf"),
}
ARTIFACTS = {"run": "run", "run-adapter": "run/adapter", "merged-model": "merged", "curated-data": "curated",
             "gguf": "model.gguf", "scores": "scores.jsonl", "rm-run": "rm-run"}


def _out(w: Path, tmp: Path, command: str, folder: Path) -> Path:
    """The command's output inside `folder`: a folder, or a file of the right name."""
    name = COMMANDS[command][1]
    return folder / (name or "out")


# --------------------------------------------------------------------------- the file-system cases


def _read_only(folder: Path, monkeypatch) -> None:
    """chmod 0o555, and, as root ignores it, what the kernel answers anyone else (see the module docstring):
    nothing new may be made in `folder` or below it (an existing file keeps its own permissions)."""
    folder.chmod(0o555)
    top = str(folder.resolve())

    def denied(path) -> bool:
        if isinstance(path, int):  # a file descriptor
            return False
        path = os.path.abspath(os.fspath(path))
        return path == top or path.startswith(top + os.sep)

    def eacces(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, builtins.open

    def os_open(path, flags, *args, **kwargs):
        tmpfile = getattr(os, "O_TMPFILE", 0) and flags & os.O_TMPFILE == os.O_TMPFILE  # an unnamed file made in the folder
        if denied(path) and (tmpfile or (flags & os.O_CREAT and not os.path.lexists(path))):
            eacces(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if denied(path) and not os.path.lexists(path):  # an existing one: EEXIST, as Linux checks that first
            eacces(path)
        return real_mkdir(path, *args, **kwargs)

    def builtin_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and denied(file) and not os.path.lexists(file):
            eacces(file)
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", builtin_open)


def case_read_only(w, tmp, command, monkeypatch):
    folder = tmp / "locked"
    folder.mkdir()
    _read_only(folder, monkeypatch)
    return _out(w, tmp, command, folder), [str(folder), "Permission denied"]


def case_file_where_a_folder_goes(w, tmp, command, monkeypatch):
    (tmp / "notes").write_text("a file of the user's\n")
    return _out(w, tmp, command, tmp / "notes"), [str(tmp / "notes"), "is a file"]


def case_disk_full(w, tmp, command, monkeypatch):
    """The output's disk is full (the cache's, elsewhere, is not)."""
    real_fsync, inside = os.fsync, str(tmp.resolve()) + os.sep

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(inside):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    return _out(w, tmp, command, tmp / "new"), [str(tmp / "new"), "No space left on device", "nothing was replaced"]


def case_users_folder(w, tmp, command, monkeypatch):
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    if COMMANDS[command][1] is None:
        return mine, [str(mine), "ftune did not write"]
    out = mine / COMMANDS[command][1]
    out.write_bytes(b"the user's own file\n")
    return out, [str(out), "did not write it" if command != "export-gguf" else "not a GGUF file ftune exported"]


def case_inputs_folder(w, tmp, command, monkeypatch):
    """The folder holding the recipe, its data and the runs read: never an output folder; a file: never an input."""
    if COMMANDS[command][1] is None:
        return w, [str(w)]
    inputs = {"score": w / "pairs.jsonl", "eval": w / "data.jsonl", "export-gguf": w / "merged" / "inside.gguf"}
    return inputs[command], [str(inputs[command])]


def case_cache_is_a_file(w, tmp, command, monkeypatch):
    (tmp / "cache").write_text("not a folder\n")
    monkeypatch.setenv("FTUNE_CACHE", str(tmp / "cache"))
    return _out(w, tmp, command, tmp / "new"), ["FTUNE_CACHE", str(tmp / "cache"), "is a file"]


# What each refusal says it found (a file command names a file it did not write; inside a run, the run).
FOUND = {"run": "an ftune run (written by ftune sft)", "run-adapter": "written by ftune sft", "rm-run": "ftune rm",
         "merged-model": "a merged model (written by ftune merge)", "curated-data": "a curated-data folder (written by ftune data)",
         "gguf": "", "scores": ""}


def artifact_case(name: str):
    def case(w, tmp, command, monkeypatch):
        target = w / ARTIFACTS[name]
        if COMMANDS[command][1] is not None and target.is_dir():
            target = target / COMMANDS[command][1]  # a file inside a run or a merged model
        found = FOUND[name] if (w / ARTIFACTS[name]).is_dir() else ""
        return target, [str(w / ARTIFACTS[name]), found]
    return case


CASES = {
    "read-only-folder": case_read_only,
    "file-where-a-folder-goes": case_file_where_a_folder_goes,
    "disk-full": case_disk_full,
    "users-folder": case_users_folder,
    "inputs-folder": case_inputs_folder,
    **{f"artifact-{name}": artifact_case(name) for name in ARTIFACTS},
}
CACHE_USERS = {"sft", "eval-recipe", "export-gguf-demo"}


def _matrix():
    for command, (_, _, own) in COMMANDS.items():
        for case in CASES:
            if case.startswith("artifact-") and ARTIFACTS[case.removeprefix("artifact-")] == own:
                continue  # an earlier output of the same command: replaced (test_same_kind_is_replaced)
            yield pytest.param(command, case, id=f"{command}-{case}")


def _error_line(output: str) -> str:
    """The one `error:` line, with a recipe error's problem lines under it (never the hint)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, f"expected one error line:\n{output}"
    assert "Traceback" not in output, output
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("  ") or line.startswith("  hint:"):
            break
        block.append(line)
    return "\n".join(block)


def _check(argv, needles, roots, monkeypatch, capsys) -> str:
    before = [snapshot(root) for root in roots]
    code, output = invoke(argv, monkeypatch, capsys)
    monkeypatch.undo()  # the patched os functions and modes end before the disk is compared
    assert code not in (0, None), output
    line = _error_line(output)
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line:\n{output}"
    assert [snapshot(root) for root in roots] == before, f"a refused command must leave the disk as it was:\n{output}"
    return line


@pytest.mark.parametrize(("command", "case"), list(_matrix()))
def test_outputs(command, case, env, tmp_path, monkeypatch, capsys):
    out, needles = CASES[case](env, tmp_path, command, monkeypatch)
    argv = COMMANDS[command][0](env, out)
    try:
        _check(argv, needles, [env, tmp_path], monkeypatch, capsys)
    finally:
        for folder in [tmp_path, *tmp_path.rglob("*")]:
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)


def _eval_recipe(w: Path, out: Path) -> list:
    return ["eval", w / "run", "--recipe", w / "recipe.yaml", "--out", out]


def _gguf_demo(w: Path, out: Path) -> list:
    return ["export-gguf", "demo", "--out", out, "--type", "f16", "--no-verify"]


@pytest.mark.parametrize("argv", [_sft, _eval_recipe, _gguf_demo], ids=["sft", "eval-recipe", "export-gguf-demo"])
def test_ftune_cache_pointing_at_a_file(argv, env, tmp_path, monkeypatch, capsys):
    out, needles = case_cache_is_a_file(env, tmp_path, "eval", monkeypatch)
    if argv is _gguf_demo:
        out = out.with_suffix(".gguf")
    _check(argv(env, out), needles, [env, tmp_path], monkeypatch, capsys)


def test_an_unwritable_cache_folder_is_named(env, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FTUNE_CACHE", str(cache))
    _read_only(cache, monkeypatch)
    try:
        _check(_sft(env, tmp_path / "run"), ["FTUNE_CACHE", str(cache), "Permission denied"], [env, tmp_path], monkeypatch, capsys)
    finally:
        cache.chmod(0o755)


# --------------------------------------------------------------------------- the same kind is replaced, and its refusal names the kind


def test_data_refuses_a_runs_adapter_naming_what_it_is(env, monkeypatch, capsys):
    line = _check(_data(env, env / "run" / "adapter"), [], [env], monkeypatch, capsys)
    assert f"{env / 'run' / 'adapter'} is a run's adapter (written by ftune sft), not an earlier `ftune data` output" in line, line


def test_data_refuses_a_new_folder_inside_a_run(env, monkeypatch, capsys):
    line = _check(_data(env, env / "run" / "curated"), [], [env], monkeypatch, capsys)
    assert f"is inside {env / 'run'}, an ftune run (written by ftune sft)" in line, line


def test_merge_refuses_curated_data_naming_its_kind(env, monkeypatch, capsys):
    line = _check(_merge(env, env / "curated"), [], [env], monkeypatch, capsys)
    assert "is a curated-data folder (written by ftune data), not an earlier `ftune merge` output" in line, line


def test_an_unknown_marker_is_never_replaced(env, tmp_path, monkeypatch, capsys):
    """A marker that names no kind this version knows, and holds nothing recognisable: refused, not guessed."""
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / ".ftune-output.json").write_text(json.dumps({"written_by": "ftune", "kind": "from-the-future"}))
    (odd / "weights.bin").write_bytes(b"x")
    line = _check(_data(env, odd), [str(odd), "not an earlier `ftune data` output"], [env, tmp_path], monkeypatch, capsys)
    assert "unknown" in line or "does not know" in line, line


@pytest.mark.parametrize("command", ["data", "score", "export-gguf"])
def test_same_kind_is_replaced(command, env, tmp_path, monkeypatch, capsys):
    """--overwrite replaces an earlier output of the same command (a copy of the world's, so the world stays)."""
    own = env / COMMANDS[command][2]
    target = tmp_path / own.name
    if own.is_dir():
        shutil.copytree(own, target, symlinks=True)
    else:
        for sibling in own.parent.glob(own.name + "*"):  # scores.jsonl with its scores.jsonl.score.json
            shutil.copy2(sibling, tmp_path / sibling.name)
    before = target.stat().st_mtime_ns
    code, output = invoke(COMMANDS[command][0](env, target), monkeypatch, capsys)
    assert code in (0, None), output
    assert target.stat().st_mtime_ns != before, "the earlier output was replaced"


@pytest.mark.parametrize(("command", "replaced"), [("data", True), ("merge", False)])
def test_a_marker_from_before_kinds_is_read_by_what_the_folder_holds(command, replaced, env, tmp_path, monkeypatch, capsys):
    """A curated-data folder whose marker names no kind: still `ftune data`'s to replace, never `ftune merge`'s."""
    old = tmp_path / "curated"
    shutil.copytree(env / "curated", old)
    (old / ".ftune-output.json").write_text(json.dumps({"written_by": "ftune", "ftune_version": "0.1.0"}))
    argv = COMMANDS[command][0](env, old)
    if replaced:
        code, output = invoke(argv, monkeypatch, capsys)
        assert code in (0, None), output
        assert json.loads((old / ".ftune-output.json").read_text())["kind"] == "curated-data"
    else:
        _check(argv, [str(old), "is a curated-data folder (written by ftune data)"], [env, tmp_path], monkeypatch, capsys)


def test_a_file_system_error_in_a_tokenization_worker_is_one_line(env, tmp_path, monkeypatch, capsys):
    """With data.num_proc: 2 the rows are tokenized in forked workers: their OSError reaches the user as the parent's would."""
    from ftune.data import build

    parent, encode = os.getpid(), build.encode_job

    def failing(job):
        if os.getpid() != parent:  # in a worker only
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "unreadable"))
        return encode(job)

    monkeypatch.setattr(build, "CHUNK", 2)  # several jobs from ten rows: the workers start
    monkeypatch.setattr(build, "encode_job", failing)
    argv = [*_sft(env, tmp_path / "run"), "--set", "data.num_proc=2"]
    _check(argv, [str(tmp_path / "unreadable"), "Permission denied"], [env, tmp_path], monkeypatch, capsys)

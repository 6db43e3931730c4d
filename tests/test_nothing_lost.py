"""Nothing lost: ftune deletes or replaces only what ftune wrote, one process writes a run at a
time, and a run directory never decides whether Python shipped with a model runs.

Every case goes through the real entry point and checks the exit code, a message naming the
problem and the place, no traceback, and that every file that was there is still there,
byte for byte (sizes and modification times).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftune.artifacts import lock, ownership, runs
from helpers import GOOD_ROWS, PAIRS, assert_refused, invoke, recipe_text, setup, sft_run_dir, snapshot, write_jsonl


def with_output(text: str, directory: str) -> str:
    return text.replace("output: {dir: run}", f"output: {{dir: {json.dumps(directory)}}}")


def user_files(folder: Path) -> Path:
    """A folder of someone's own files, nested, with a dotfile."""
    (folder / "notes").mkdir(parents=True, exist_ok=True)
    (folder / "notes" / "todo.md").write_text("buy milk\n")
    (folder / "thesis.tex").write_text("\\documentclass{article}\n")
    (folder / ".env").write_text("SECRET=1\n")
    return folder


def fake_home(tmp: Path, monkeypatch) -> Path:
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (home / ".bashrc").write_text("export PATH\n")
    monkeypatch.setenv("HOME", str(home))
    return home


def assert_no_destructive_hint(output: str) -> None:
    """A refusal to touch the user's files never suggests the flag (or the deletion) that would."""
    assert "--overwrite" not in output and "delete" not in output.lower() and "remove" not in output.lower(), output


# --------------------------------------------------------------------------- where a run may go


def refused_dir(tmp: Path, model: Path, monkeypatch, *, output: str, folder: Path | None = None, flags=("--overwrite",)):
    argv = setup(folder or tmp, model, text=with_output(recipe_text(model), output))
    return [*argv, *flags]


def case_symlink(tmp, model, monkeypatch):
    user_files(tmp / "mine")
    (tmp / "link").symlink_to(tmp / "mine")
    return refused_dir(tmp, model, monkeypatch, output="link")


def case_home(tmp, model, monkeypatch):
    fake_home(tmp, monkeypatch)
    return refused_dir(tmp, model, monkeypatch, output="~")


def case_home_parent(tmp, model, monkeypatch):
    home = fake_home(tmp, monkeypatch)
    (home / "project").mkdir()
    return refused_dir(tmp, model, monkeypatch, output="~/..", folder=home / "project")


def case_data_folder(tmp, model, monkeypatch):
    (tmp / "data").mkdir()
    write_jsonl(tmp / "data" / "train.jsonl", GOOD_ROWS)
    return setup(tmp, model, rows=None, text=with_output(recipe_text(model, data="data/train.jsonl"), "data")) + ["--overwrite"]


def case_data_ancestor(tmp, model, monkeypatch):
    (tmp / "corpus" / "2024").mkdir(parents=True)
    write_jsonl(tmp / "corpus" / "2024" / "train.jsonl", GOOD_ROWS)
    return setup(tmp, model, rows=None, text=with_output(recipe_text(model, data="corpus/2024/train.jsonl"), "corpus")) + ["--overwrite"]


def case_recipe_parent(tmp, model, monkeypatch):
    (tmp / "project").mkdir()
    return refused_dir(tmp, model, monkeypatch, output="..", folder=tmp / "project")


def case_smoke_user_files(tmp, model, monkeypatch):
    user_files(tmp / "results-smoke")
    return refused_dir(tmp, model, monkeypatch, output="results", flags=("--smoke",))


def case_base_model(tmp, model, monkeypatch):
    shutil.copytree(model, tmp / "base")
    return setup(tmp, model, text=with_output(recipe_text(tmp / "base"), "base")) + ["--overwrite"]


def case_init_from(tmp, model, monkeypatch):
    sft = sft_run_dir(tmp, status="completed", base=str(model))
    text = with_output(recipe_text(model, stage="dpo", extra=f"preference: {{method: dpo, init_from: {sft}}}\n"), str(sft))
    return setup(tmp, model, rows=PAIRS, text=text) + ["--overwrite"]


def case_output_is_a_file(tmp, model, monkeypatch):
    (tmp / "results").write_text("my results\n")
    return refused_dir(tmp, model, monkeypatch, output="results", flags=())


# name -> (build(tmp, model, monkeypatch) -> argv, substrings the message must contain)
DIR_CASES = {
    "dot": (lambda t, m, mp: refused_dir(t, m, mp, output="."), ["output.dir", "is the folder of the recipe"]),
    "dot-without-overwrite": (lambda t, m, mp: refused_dir(t, m, mp, output=".", flags=()), ["output.dir", "is the folder of the recipe"]),
    "home": (case_home, ["output.dir", "is your home directory"]),
    "home-parent": (case_home_parent, ["output.dir", "contains your home directory"]),
    "root": (lambda t, m, mp: refused_dir(t, m, mp, output="/"), ["output.dir", "is the filesystem root"]),
    "root-without-overwrite": (lambda t, m, mp: refused_dir(t, m, mp, output="/", flags=()), ["is the filesystem root"]),
    "data-folder": (case_data_folder, ["output.dir", "is the folder of the data file", "train.jsonl"]),
    "data-ancestor": (case_data_ancestor, ["output.dir", "contains the data file", "train.jsonl"]),
    "recipe-parent": (case_recipe_parent, ["output.dir", "contains the recipe", "recipe.yaml"]),
    "user-dir-overwrite": (lambda t, m, mp: refused_dir(t, m, mp, output=str(user_files(t / "mine"))),
                           ["output.dir", "holds files ftune did not write", "thesis.tex"]),
    "user-dir": (lambda t, m, mp: refused_dir(t, m, mp, output=str(user_files(t / "mine")), flags=()),
                 ["output.dir", "holds files ftune did not write"]),
    "symlink-to-user-dir": (case_symlink, ["output.dir", "mine holds files ftune did not write"]),
    "smoke-with-user-files": (case_smoke_user_files, ["output.dir", "results-smoke holds files ftune did not write"]),
    "base-model-folder": (case_base_model, ["output.dir", "is the base model"]),
    "dpo-into-its-init-from-run": (case_init_from, ["output.dir", "is the run in preference.init_from"]),
    "output-is-a-file": (case_output_is_a_file, ["output.dir", "results", "not a directory"]),
    "foreign-run-json": (lambda t, m, mp: with_file(t / "theirs" / "run.json", "{}", refused_dir(t, m, mp, output="theirs")),
                         ["holds files ftune did not write (run.json)"]),
}


def with_file(path: Path, text: str, argv: list[str]) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return argv


@pytest.mark.parametrize("name", DIR_CASES, ids=list(DIR_CASES))
def test_a_run_never_goes_where_it_would_replace_what_ftune_did_not_write(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = DIR_CASES[name]
    argv = build(tmp_path, tiny_model_dir, monkeypatch)
    before = snapshot(tmp_path)
    code, output = invoke(argv, monkeypatch, capsys)
    assert_refused(code, output, needles)
    assert_no_destructive_hint(output)
    assert snapshot(tmp_path) == before, "a refused command must leave the disk as it was"


# --------------------------------------------------------------------------- replacing ftune's own run


def trained_run(tmp: Path, model: Path, monkeypatch, capsys, *flags: str) -> list[str]:
    argv = setup(tmp, model)
    code, output = invoke([*argv, *flags], monkeypatch, capsys)
    assert code in (0, None), output
    return argv


def test_overwrite_replaces_an_ftune_run_and_deletes_the_old_one_only_after(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftune.train import outputs

    argv = trained_run(tmp_path, tiny_model_dir, monkeypatch, capsys)
    run_dir = tmp_path / "run"
    old = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    seen = []
    real = outputs.write_run_card

    def check_the_old_run_is_kept(*args, **kwargs):
        asides = runs.set_aside_runs(run_dir)
        seen.append(len(asides))
        assert {str(p.relative_to(asides[0])): p.read_bytes() for p in asides[0].rglob("*") if p.is_file()} == old
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "write_run_card", check_the_old_run_is_kept)
    code, output = invoke([*argv, "--overwrite", "--set", "training.seed=7"], monkeypatch, capsys)
    assert code in (0, None), output
    assert seen == [1], "while the new run was built, the old one was kept aside"
    assert runs.set_aside_runs(run_dir) == [] and not list(tmp_path.glob(".run.*")), "and deleted once the new one completed"
    assert runs.read_run(run_dir).completed and "seed: 7" in (run_dir / runs.RECIPE_FILE).read_text()
    assert not (run_dir / lock.LOCK_FILE).exists()


def test_a_crash_while_replacing_leaves_the_old_run_as_it_was(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftune.train import outputs

    argv = trained_run(tmp_path, tiny_model_dir, monkeypatch, capsys)
    before = snapshot(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "README.md"))

    monkeypatch.setattr(outputs, "write_run_card", disk_full)
    code, output = invoke([*argv, "--overwrite"], monkeypatch, capsys)
    assert code == 1 and "No space left on device" in output and "Traceback" not in output
    assert snapshot(tmp_path) == before, "the old run is back in place, byte for byte, and nothing else is left"


def test_a_replacement_killed_midway_is_put_back_by_the_next_command(tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = trained_run(tmp_path, tiny_model_dir, monkeypatch, capsys)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    # What SIGKILL during `--overwrite` leaves: the old run set aside, the new one begun (no checkpoint yet).
    aside = runs.set_aside(run_dir)
    run_dir.mkdir()
    (run_dir / ownership.RUN_FILE).write_text(json.dumps({"ftune_version": "0.1.0", "stage": "sft", "status": "running",
                                                     "base_model": {"name": str(tiny_model_dir)}}))
    code, output = invoke(argv, monkeypatch, capsys)
    assert_refused(code, output, ["put back the run set aside", "already holds a completed run", "--overwrite"])
    assert not aside.exists() and snapshot(run_dir) == before


def test_smoke_replaces_its_own_earlier_smoke_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = trained_run(tmp_path, tiny_model_dir, monkeypatch, capsys, "--smoke")
    first = runs.read_run(tmp_path / "run-smoke")
    code, output = invoke([*argv, "--smoke"], monkeypatch, capsys)
    assert code in (0, None), output
    assert runs.read_run(tmp_path / "run-smoke").completed and first.completed
    assert runs.set_aside_runs(tmp_path / "run-smoke") == []


# --------------------------------------------------------------------------- one process per run


def hold_lock(run_dir: Path) -> subprocess.Popen:
    code = f"import time; from ftune.artifacts.lock import RunLock; RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--resume",)], ids=["plain", "overwrite", "resume"])
def test_a_second_process_is_refused_with_the_holders_pid(flags, tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = setup(tmp_path, tiny_model_dir)
    holder = hold_lock(tmp_path / "run")
    try:
        before = snapshot(tmp_path)
        code, output = invoke([*argv, *flags], monkeypatch, capsys)
        assert_refused(code, output, [f"is in use by process {holder.pid}", str(tmp_path / "run" / lock.LOCK_FILE)])
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, tiny_model_dir, monkeypatch, capsys):
    argv = setup(tmp_path, tiny_model_dir)
    holder = hold_lock(tmp_path / "run")
    holder.kill()
    holder.wait()
    assert (tmp_path / "run" / lock.LOCK_FILE).is_file() and lock.lock_holder(tmp_path / "run") is None
    code, output = invoke(argv, monkeypatch, capsys)
    assert code in (0, None), output
    assert f"took over the lock of process {holder.pid}" in output
    assert runs.read_run(tmp_path / "run").completed and not (tmp_path / "run" / lock.LOCK_FILE).exists()


def test_processes_started_by_the_launcher_use_its_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    child = ("import os; from ftune.artifacts.lock import RunLock; lock = RunLock(os.environ['RUN_DIR']).acquire(); "
             "print(lock.inherited); lock.release()")
    with lock.RunLock(run_dir) as held:
        env = {**os.environ, "RUN_DIR": str(run_dir), "FTUNE_LAUNCHED": "1"}  # what `accelerate launch` children see
        result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
        assert (run_dir / lock.LOCK_FILE).is_file(), "a child leaves its launcher's lock alone"
        # An unrelated process (not launched by this one) is refused.
        env.pop("FTUNE_LAUNCHED")
        result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert result.returncode != 0 and f"in use by process {os.getpid()}" in result.stderr
        assert not held.inherited
    assert not (run_dir / lock.LOCK_FILE).exists()


# --------------------------------------------------------------------------- merge and export outputs


@pytest.fixture()
def adapter_run(tmp_path, tiny_model_dir) -> Path:
    """A finished run directory as `ftune sft` leaves it, with a LoRA adapter made by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    run = tmp_path / "work" / "run"
    model.save_pretrained(run / runs.ADAPTER_DIR)
    (run / ownership.RUN_FILE).write_text(json.dumps({
        "ftune_version": "0.1.0", "stage": "sft", "status": "completed",
        "base_model": {"name": str(tiny_model_dir), "path": str(tiny_model_dir), "revision": None, "trust_remote_code": False},
        "adapter": {"method": "lora"}, "quantization": {"load_in_4bit": False}, "dtype": "float32", "global_step": 1,
    }))
    return run


def merge_case(out: str, *, cwd: str | None = None, home: bool = False, overwrite: bool = True):
    def build(tmp: Path, run: Path, monkeypatch) -> list[str]:
        user_files(tmp / "work" / "mine")
        if home:
            fake_home(tmp, monkeypatch)
        if cwd is not None:
            (tmp / cwd).mkdir(parents=True, exist_ok=True)
            monkeypatch.chdir(tmp / cwd)
        target = {"RUN": str(run), "PARENT": str(run.parent)}.get(out, out)
        return ["merge", str(run), "--out", target, "--no-verify", *(["--overwrite"] if overwrite else [])]

    return build


MERGE_CASES = {
    "user-dir": (merge_case("work/mine", cwd="."), ["--out", "holds files ftune did not write"]),
    "user-dir-without-overwrite": (merge_case("work/mine", cwd=".", overwrite=False), ["--out", "holds files ftune did not write"]),
    "dot": (merge_case(".", cwd="work/mine"), ["--out", "is the current directory"]),
    "dot-in-an-empty-folder": (merge_case(".", cwd="empty"), ["--out", "is the current directory"]),
    "dot-without-overwrite": (merge_case(".", cwd="empty", overwrite=False), ["--out", "is the current directory"]),
    "the-run-itself": (merge_case("RUN"), ["--out", "run"]),
    "the-runs-parent": (merge_case("PARENT"), ["--out", "work"]),
    "home": (merge_case("~", home=True), ["--out", "is your home directory"]),
    "root": (merge_case("/"), ["--out", "is the filesystem root"]),
}


@pytest.mark.parametrize("name", MERGE_CASES, ids=list(MERGE_CASES))
def test_merge_never_replaces_what_ftune_did_not_write(name, tmp_path, adapter_run, monkeypatch, capsys):
    build, needles = MERGE_CASES[name]
    argv = build(tmp_path, adapter_run, monkeypatch)
    before = snapshot(tmp_path)
    code, output = invoke(argv, monkeypatch, capsys)
    assert_refused(code, output, needles)
    if name not in ("the-run-itself",):
        assert_no_destructive_hint(output)
    assert snapshot(tmp_path) == before


def test_merge_overwrite_replaces_its_own_earlier_output(tmp_path, adapter_run, monkeypatch, capsys):
    out = tmp_path / "merged"
    code, output = invoke(["merge", str(adapter_run), "--out", str(out), "--no-verify"], monkeypatch, capsys)
    assert code in (0, None), output
    assert (out / ownership.OUTPUT_MARKER).is_file()
    code, output = invoke(["merge", str(adapter_run), "--out", str(out), "--no-verify"], monkeypatch, capsys)
    assert_refused(code, output, ["already exists", "--overwrite"])  # ftune's own: the flag is the way
    code, output = invoke(["merge", str(adapter_run), "--out", str(out), "--no-verify", "--overwrite"], monkeypatch, capsys)
    assert code in (0, None), output
    assert not list(tmp_path.glob(".merged.*"))


def foreign_gguf(path: Path) -> Path:
    """A valid GGUF file that some other tool wrote."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("someone else's model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def export_case(prepare, needles):
    def build(tmp: Path, model: Path) -> list[str]:
        out = tmp / "exports" / "model.gguf"
        out.parent.mkdir()
        prepare(out)
        return ["export-gguf", str(model), "--out", str(out), "--type", "f16", "--no-verify", "--overwrite"]

    return build, needles


EXPORT_CASES = {
    "foreign-bytes": export_case(lambda out: out.write_bytes(b"keep me"), ["model.gguf", "not a GGUF file ftune exported"]),
    "foreign-gguf": export_case(foreign_gguf, ["model.gguf", "not a GGUF file ftune exported"]),
    "foreign-parity-report": export_case(lambda out: out.with_name("model.gguf.parity.json").write_text("{}"),
                                         ["model.gguf.parity.json", "ftune did not write"]),
    "both-modelfile-names-taken": export_case(
        lambda out: (out.with_name("Modelfile").write_text("FROM ./other.gguf\n"), out.with_name("model.Modelfile").write_text("FROM x\n")),
        ["Modelfile", "model.Modelfile", "not written by ftune"]),
    "out-is-a-directory": export_case(lambda out: out.mkdir(), ["model.gguf is a directory"]),
}


@pytest.mark.parametrize("name", EXPORT_CASES, ids=list(EXPORT_CASES))
def test_export_overwrite_never_replaces_a_file_ftune_did_not_write(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    build, needles = EXPORT_CASES[name]
    argv = build(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    code, output = invoke(argv, monkeypatch, capsys)
    assert_refused(code, output, ["--out", *needles])
    assert_no_destructive_hint(output)
    assert snapshot(tmp_path) == before


def test_export_keeps_another_models_modelfile_and_replaces_its_own_gguf(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "model.gguf"
    (tmp_path / "Modelfile").write_text("FROM ./llama3.gguf\nSYSTEM mine\n")
    argv = ["export-gguf", str(tiny_model_dir), "--out", str(out), "--type", "f16", "--no-verify"]
    code, output = invoke(argv, monkeypatch, capsys)
    assert code in (0, None), output
    assert (tmp_path / "Modelfile").read_text() == "FROM ./llama3.gguf\nSYSTEM mine\n"
    assert "FROM ./model.gguf" in (tmp_path / "model.Modelfile").read_text()
    code, output = invoke([*argv, "--overwrite"], monkeypatch, capsys)  # ftune's own export: replaced
    assert code in (0, None), output
    assert (tmp_path / "Modelfile").read_text() == "FROM ./llama3.gguf\nSYSTEM mine\n"


# --------------------------------------------------------------------------- code in a run directory


def test_chat_never_trusts_remote_code_because_a_run_directory_says_so(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A downloaded run whose base ships Python that runs on import, and whose files ask for trust.
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    ran = tmp_path / "code-ran"
    (base / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    run = tmp_path / "downloaded-run"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(run / "adapter")
    (run / ownership.RUN_FILE).write_text(json.dumps({
        "ftune_version": "0.1.0", "stage": "sft", "status": "completed",
        "base_model": {"name": str(base), "path": str(base), "revision": None, "trust_remote_code": True},
        "adapter": {"method": "lora"}, "quantization": {"load_in_4bit": False},
    }))
    recipe = recipe_text(base).replace(f"base_model: {{name: {base}}}", f"base_model: {{name: {base}, trust_remote_code: true}}")
    (run / runs.RECIPE_FILE).write_text(recipe)

    assert runs.read_run(run).recipe().base_model.trust_remote_code is False
    code, output = invoke(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"], monkeypatch, capsys)
    assert code in (0, None), output
    assert not ran.exists(), "the run directory's trust_remote_code: true was obeyed"

    # The user's own --trust-remote-code is what turns it on (this also shows the check above can fail).
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    invoke(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0", "--trust-remote-code"], monkeypatch, capsys)
    assert ran.exists()


def test_a_run_lock_that_is_a_link_is_refused_and_what_it_names_survives(tmp_path):
    """run.lock is written, truncated and removed by the lock: as a link it would do all that to the file it names."""
    mine = tmp_path / "notes.txt"
    mine.write_text("a user's file\n")
    run_dir = tmp_path / "held"
    run_dir.mkdir()
    (run_dir / lock.LOCK_FILE).symlink_to(mine)
    with pytest.raises(OSError):
        lock.RunLock(run_dir).acquire()
    assert mine.read_text() == "a user's file\n" and (run_dir / lock.LOCK_FILE).is_symlink()

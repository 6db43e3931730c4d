"""What a run directory must be before a command uses it: run.json whole and ftune's, of the kind
the command reads, and its trained weights present and readable.

A run directory is read back by many commands (an `init_from`, merge, eval, chat, label, score,
a GRPO reward model, export-gguf), and any of it may be damaged, copied from another machine or
user, or of the wrong stage: a reward model's adapter continued as a policy trains a model that
says it is a sequence classifier. Each command names its use (`USES`, one table); `runs.read_run`
checks run.json here and, for a use, the stage and the weights, so every reader inherits the
checks and each refusal names the file and what the command expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ftune.artifacts import kinds
from ftune.artifacts.ownership import read_json_object
from ftune.errors import FtuneError
from ftune.guards import textio
from ftune.guards.weights import read_header, tensor_index

STAGES = {  # what each stage's run is, in words
    "sft": "a supervised fine-tuning run (ftune sft)",
    "dpo": "a preference run (ftune dpo)",
    "rm": "a reward-model run (ftune rm)",
    "grpo": "a GRPO run (ftune grpo)",
}
STATUSES = ("running", "interrupted", "failed", "completed")
POLICY = ("sft", "dpo", "grpo")
POLICY_NEEDS = "a policy run from ftune sft, dpo or grpo"


@dataclass(frozen=True)
class Use:
    """How one command uses a run: which stages it reads, and whether the run must be finished."""

    stages: tuple[str, ...]
    needs: str  # what the command expected, in words
    completed: bool = True  # a finished run, its trained weights checked (merge reads checkpoints too)
    hint: str | None = None
    who: str | None = None  # the reader in words, when its key is not (default: the key, e.g. grpo.init_from)


USES = {
    "preference.init_from": Use(POLICY, POLICY_NEEDS),
    "rm.init_from": Use(POLICY, POLICY_NEEDS, hint="a reward model starts from a policy's adapter and trains a score head"),
    "grpo.init_from": Use(POLICY, POLICY_NEEDS),
    "merge": Use(tuple(STAGES), "a run of any stage", completed=False, who="ftune merge"),
    # eval, chat, label and a GGUF's parity check generate text: a reward model only scores it.
    "generate": Use(POLICY, POLICY_NEEDS + " (a model that writes answers)", completed=False, who="generating answers",
                    hint="a reward model scores answers and writes none: use `ftune score RUN --data FILE`, "
                         "or `ftune eval RUN --data PAIRS`"),
    "export-gguf": Use(POLICY, POLICY_NEEDS, completed=False, who="ftune export-gguf",
                       hint="llama.cpp does not run score heads; `ftune merge` writes a reward model as a transformers model"),
    "reward model": Use(("rm",), "a reward-model run from ftune rm", who="scoring with a reward model",
                        hint="train one with `ftune rm RECIPE`"),
}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def current_uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def not_a_run(path: Path, run_file: str, marker: str) -> FtuneError:
    """Why `path` (no run.json) is not a run, naming what it is when ftune can tell."""
    path = Path(path)
    if not path.exists():
        return FtuneError(f"{path} does not exist", hint="name an ftune run directory")
    if not path.is_dir():
        return FtuneError(f"{path} is a file, not an ftune run directory")
    written = read_json_object(path / marker) or {}
    kind, what = written.get("kind"), written.get("what")
    if isinstance(kind, str) and kind in kinds.KINDS:
        found = kinds.describe(kind)  # e.g. "a curated-data folder (written by ftune data)"
    elif (path / "merge.json").is_file():
        found = "a merged model (ftune merge)"
    elif isinstance(what, str) and what:
        found = f"ftune output ({what})"
    elif (path / ADAPTER_CONFIG).is_file():
        found = "a bare adapter folder"
    elif (path / "config.json").is_file():
        found = "a model directory"
    else:
        found = None
    return FtuneError(f"{path} is not an ftune run directory (no {run_file})" + (f": it is {found}" if found else ""))


def check_meta(data: object, meta: Path) -> dict:
    """run.json's fields with the types ftune writes; anything else is a damaged file, named."""
    from ftune import __version__

    def bad(text: str) -> FtuneError:
        return FtuneError(f"{text}; the file is damaged or was not written by ftune", place=str(meta),
                          hint="train the run again, or name another run")

    if not isinstance(data, dict):
        raise bad(f"a run.json is an object (stage, status, base model, ...), not {type(data).__name__}")
    if not isinstance(data.get("base_model"), dict) or not isinstance(data["base_model"].get("name"), str) or not data["base_model"]["name"]:
        raise bad("base_model.name is missing or not a string: the run does not name its base model")
    version = data.get("ftune_version")
    if not isinstance(version, str):
        raise bad("ftune_version is missing" if version is None else f"ftune_version is {version!r}, not a version string")
    newer = _newer(version, __version__)
    if newer is None:
        raise bad(f"ftune_version {version!r} is not a version")
    if newer:
        raise FtuneError(f"written by ftune {version}, newer than this ftune ({__version__}), whose runs it may not read right",
                         place=str(meta), hint="upgrade ftune to use this run")
    for key, types, what in (("stage", str, "a string"), ("status", str, "a string"), ("global_step", (int, type(None)), "a whole number"),
                             ("base_model", dict, "an object"), ("adapter", (dict, type(None)), "an object"),
                             ("quantization", (dict, type(None)), "an object"), ("dtype", (str, type(None)), "a string"),
                             ("summary", (dict, type(None)), "an object"), ("recipe_dir", (str, type(None)), "a string")):
        if key not in data and not isinstance(None, types):
            raise bad(f"{key} is missing")
        value = data.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise bad(f"{key} is {value!r}, not {what}")
    if data["stage"] not in STAGES:
        raise bad(f"stage {data['stage']!r} is not one of ftune's ({', '.join(STAGES)})")
    if data["status"] not in STATUSES:
        raise bad(f"status {data['status']!r} is not one of {', '.join(STATUSES)}")
    if (data.get("global_step") or 0) < 0:
        raise bad(f"global_step is {data['global_step']}")
    base = data["base_model"]
    for key in ("path", "revision"):
        if not isinstance(base.get(key), (str, type(None))):
            raise bad(f"base_model.{key} is {base.get(key)!r}, not a string")
    method = (data.get("adapter") or {}).get("method", "lora")
    if not isinstance(method, str):
        raise bad(f"adapter.method is {method!r}, not a string")
    return data


def check_owner(meta: Path) -> None:
    """A run is read from its owner's files only: run.json of another user's could say anything about
    the weights beside it, and the run would not be the user's to stand behind."""
    uid = current_uid()
    owner = meta.stat().st_uid
    if uid is not None and owner != uid:
        raise FtuneError(f"owned by another user (uid {owner}), so ftune does not trust it", place=str(meta),
                         hint="copy the run into a folder of yours (cp -r) if you trust it, and use the copy")


def check_use(run, expect: str, what: str | None = None) -> None:
    """The run fits `USES[expect]`: its stage, finished when the use needs it, and its weights readable."""
    check_kind(run, expect, what)
    if run.completed:
        check_weights(run)


def check_kind(run, expect: str, what: str | None = None) -> None:
    """The run is of a stage `USES[expect]` reads, and finished when it must be."""
    use = USES[expect]
    what = what or use.who or expect
    if run.stage not in use.stages:
        raise FtuneError(f"{run.dir} is {STAGES[run.stage]}; {what} needs {use.needs}", hint=use.hint)
    if use.completed and not run.completed:
        raise FtuneError(f"{what}: {run.dir} is not a completed run (status: {run.status})",
                         hint="finish it (the training command with --resume), or name a completed run")


def check_weights(run) -> None:
    """A completed run's trained weights: the whole model (full fine-tuning) or the adapter, readable."""
    if run.adapter_method == "none":
        config = run.model_dir / "config.json"
        if not config.is_file():
            raise FtuneError(f"the run's model folder {run.model_dir} is missing or has no config.json",
                             place=str(run.dir), hint="the run is damaged: train it again")
        _json_object(config)
        tensor_index(run.model_dir)
        return
    check_adapter(run.adapter_dir, run_dir=run.dir)


def check_adapter(adapter_dir: Path, *, run_dir: Path | None = None) -> None:
    """An adapter folder ftune can load: adapter_config.json an object naming its peft type, safetensors weights."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FtuneError(f"the run's adapter folder {adapter_dir} is missing", place=str(run_dir or adapter_dir),
                         hint="the run is damaged: train it again, or merge one of its checkpoints")
    config = adapter_dir / ADAPTER_CONFIG
    if not config.is_file():
        raise FtuneError(f"{adapter_dir} has no {ADAPTER_CONFIG}", place=str(run_dir or adapter_dir),
                         hint="the run is damaged: train it again")
    data = _json_object(config)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = " (only pickle-based adapter_model.bin, which ftune does not load)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise FtuneError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}{pickled}; ftune does not load pickle-based weights",
                         place=str(run_dir or adapter_dir))
    if not read_header(weights):
        raise FtuneError("holds no tensors", place=str(weights))
    if not isinstance(data.get("peft_type"), str):
        raise FtuneError("does not name its peft_type; the file is damaged or not peft's", place=str(config))


def json_file(path: Path, what: str = "file") -> object:
    """A JSON file of a run, parsed with ftune's bounds; a damaged one is refused with its name."""
    try:
        return textio.load_file(path, what)
    except FtuneError as exc:
        message = exc.message if exc.message.startswith("unreadable") else f"unreadable: {exc.message}"
        raise FtuneError(f"{message}; the file is damaged", place=exc.place or str(path),
                         hint="train the run again, or name another run") from None


def _json_object(path: Path) -> dict:
    data = json_file(path, "config file")
    if not isinstance(data, dict):
        raise FtuneError(f"expected a JSON object, not {type(data).__name__}; the file is damaged", place=str(path))
    return data


def _newer(version: str, ours: str) -> bool | None:
    """Whether run.json's ftune_version is newer than this ftune; None when it is not a version at all."""
    from packaging.version import InvalidVersion, Version

    if version == "unknown":  # what ftune records when its own metadata is missing (a source checkout)
        return False
    try:
        return Version(version) > Version(ours)
    except InvalidVersion:
        return None

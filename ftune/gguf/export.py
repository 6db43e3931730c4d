"""`ftune export-gguf`: a model as one GGUF file for llama.cpp, Ollama and LM Studio, proven right.

`run_types` (and `run`, its one-type form) reads top to bottom:
1. resolve the input: a Hugging Face model directory (a merged model, or any), a hub id,
   `demo`, or an ftune run / adapter directory, which is merged into a temporary directory.
2. convert: stream the safetensors into a GGUF in a work directory beside the output. Types
   the gguf package writes (f32, f16, bf16, q8_0, legacy q4/q5) are written directly; K-quants
   are written lossless first (the checkpoint's own precision) and run through llama.cpp's
   quantizer.
3. verify: llama.cpp loads the file; tokenization, next-token distributions and greedy
   continuations are compared with transformers on the source (verify.py). The report goes
   next to the output as FILE.gguf.parity.json.
4. publish: a file that passed is renamed into place in one step; one that failed is kept as
   FILE.rejected.gguf for inspection and the command fails. Then the Ollama Modelfile.

Several types in one command (`--type q4_k_m,q8_0`, `run_types`) share the lossless conversion
and transformers' side of the parity check; each type gets its own file named from --out
(model.gguf -> model.q4_k_m.gguf). With --report, report.py then measures every file against
the lossless one on held-out data and picks the smallest within a perplexity budget.

Every file the export may replace (FILE.gguf, its report, FILE.rejected.gguf, the Modelfile)
is checked before any work: ftune replaces only what it wrote, so a file it did not write
there is refused, and --overwrite only ever replaces an earlier ftune export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ftune.artifacts.file_targets import check_file_target
from ftune.artifacts.ownership import parents_made
from ftune.artifacts.ownership import RUN_FILE, read_json_object, write_json
from ftune.artifacts.runs import read_run
from ftune.errors import FtuneError
from ftune.gguf import report as quant_report
from ftune.gguf.quant_types import TYPES, OutputType, parse_type
from ftune.guards import signals, textio
from ftune.guards.weights import check_weights

DEMO_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Exported:
    path: Path
    modelfile: Path
    report: dict | None
    bytes: int
    seconds: float


@dataclass
class Batch:
    """What one command exported: a file per type, and with --report the quantization report (report.py)."""

    exported: list[Exported]
    report: dict | None = None
    report_files: list[Path] = field(default_factory=list)


def run(
    model: str,
    out: Path,
    type_name: str,
    *,
    overwrite: bool = False,
    verify: bool = True,
    echo: Callable[[str], None] | None = None,
) -> Exported:
    """Export MODEL to `out` as `type_name` (see the module docstring for the steps)."""
    return run_types(model, out, [parse_type(type_name).name], overwrite=overwrite, verify=verify, echo=echo).exported[0]


def run_types(
    model: str,
    out: Path,
    type_names: str | Sequence[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    report: quant_report.Request | None = None,
    echo: Callable[[str], None] | None = None,
) -> Batch:
    """Export MODEL as every type of `type_names` (a comma list): one conversion, one reference.

    With one type the file is `out`; with several, one file per type named from it
    (model.gguf -> model.q4_k_m.gguf, model.q8_0.gguf). A file that fails its parity check
    does not stop the others; the command fails at the end, naming it.
    """
    from ftune.gguf.convert import convert, source_precision
    from ftune.gguf.ollama import modelfile_target, write_modelfile
    from ftune.gguf.quantize import quantize_gguf
    from ftune.gguf.verify import first_problem, reference_outputs, render_report, require_llama_cpp, verify_gguf

    say = echo or (lambda _text: None)
    out_types = parse_types(type_names)
    refuse_reward_model(model)
    if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "config.json").is_file():
        from ftune.merge.source import refuse_unmergeable_source

        refuse_unmergeable_source(Path(model).expanduser(), "export-gguf")  # virtual tokens: nothing a GGUF can hold
    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise FtuneError(f"{out} does not end in .gguf", place="--out", hint="llama.cpp, Ollama and LM Studio look for .gguf files")
    out = out.resolve()  # a symlink: the rules below apply to the file that would be replaced
    targets = output_paths(out, out_types)
    inputs = [("the model", Path(model).expanduser())] if model != "demo" and Path(model).expanduser().exists() else []
    inputs += [("the --data file", Path(report.data))] if report is not None and report.data is not None else []
    for target in targets.values():
        check_outputs(target, overwrite=overwrite, verify=verify, inputs=inputs)
        modelfile_target(target)  # refuses here, before the work, when no Modelfile name is free
    report_files = quant_report.check_paths(out, overwrite=overwrite) if report is not None else ()
    # Fail before minutes of conversion, not after.
    for out_type in out_types:
        if out_type.made_by == "llama.cpp":
            require_llama_cpp(f"--type {out_type.name}")
    if verify:
        require_llama_cpp("checking the written file (skip with --no-verify)")
    if report is not None:
        require_llama_cpp("--report")
    eval_data = quant_report.prepare(model, report) if report is not None else None

    published: dict[str, Exported] = {}
    failures: list[tuple[str, Path, Path, str]] = []  # (type, parity report, rejected file, first problem)
    result = None
    # An f32 export among the types keeps a run's merge in float32 for all of them.
    merge_type = TYPES["f32"] if "f32" in targets else out_types[0]
    # The folders made for --out go again when the export fails before anything is in them.
    with parents_made(out), _source_model(model, out, merge_type, say) as (model_dir, name):
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as work_dir:
            # One lossless conversion (the checkpoint's own precision) feeds every K-quant and is the report's reference.
            lossless_type = TYPES[source_precision(model_dir)]
            lossless, lossless_conversion = Path(work_dir) / f"lossless.{lossless_type.name}.gguf", None
            if report is not None or any(t.made_by == "llama.cpp" for t in out_types):
                say(f"converting {model_dir} to {lossless_type.name}")
                lossless_conversion = convert(model_dir, lossless, lossless_type, name=name)
                for note in lossless_conversion.notes:
                    say(f"warning: {note}")
            reference = reference_outputs(model_dir) if verify else None  # transformers' side once, for every file
            for out_type in out_types:
                started = time.perf_counter()
                target = targets[out_type.name]
                work = Path(work_dir) / target.name
                if out_type.made_by == "llama.cpp":
                    say(f"quantizing to {out_type.name} with llama.cpp")
                    quantize_gguf(lossless, work, out_type)
                    conversion = lossless_conversion
                elif lossless_conversion is not None and out_type.name == lossless_type.name:
                    shutil.copyfile(lossless, work)
                    conversion = lossless_conversion
                else:
                    say(f"converting {model_dir} to {out_type.name}")
                    conversion = convert(model_dir, work, out_type, name=name)
                    for note in conversion.notes:
                        say(f"warning: {note}")

                parity = None
                parity_file = parity_path(target)
                # Written beside the work file and published with it: a stop before then leaves an earlier export whole.
                parity_work = Path(work_dir) / parity_file.name
                if verify:
                    say(f"checking {target.name} with llama.cpp against transformers")
                    parity = verify_gguf(work, model_dir, out_type, reference=reference)
                    rejected = rejected_path(target)
                    parity["gguf"] = str(target if parity["passed"] else rejected)
                    parity, nulls = textio.nulled(parity)  # a NaN difference is written as null, and said
                    if nulls:
                        say(textio.nulls_note(nulls))
                    write_json(parity_work, parity)
                    say(render_report(parity))
                    if not parity["passed"]:
                        with signals.deferred():
                            os.replace(work, rejected)
                            os.replace(parity_work, parity_file)
                        failures.append((out_type.name, parity_file, rejected, first_problem(parity)))
                        continue
                _fsync(work, target)
                with signals.deferred():  # the file and its report go into place together
                    os.replace(work, target)
                    if parity is None:
                        remove_quietly(parity_file)  # an earlier export's report (checked above) must not describe this one
                    else:
                        os.replace(parity_work, parity_file)
                modelfile = write_modelfile(target, conversion.vocab)
                size = target.stat().st_size
                say(f"wrote {target} ({size / 2**20:.1f} MiB, {out_type.name}) and {modelfile}")
                published[out_type.name] = Exported(target, modelfile, parity, size, time.perf_counter() - started)

            if report is not None and published:
                files = {type_name: exported.path for type_name, exported in published.items()}
                result = quant_report.measure(files, lossless, lossless_type.name, eval_data, report, model=model, say=say)
                quant_report.write(result, *report_files)
                say(quant_report.render(result))
                say(f"wrote {report_files[0]} and {report_files[1]}")
    if failures:
        raise _rejected(failures, targets, list(published.values()))
    return Batch(list(published.values()), result, list(report_files) if result is not None else [])


def refuse_reward_model(model: str) -> None:
    """A reward model (an `ftune rm` run, its adapter, a merged one) has no GGUF: refused before any work."""
    from ftune.modeling.reward_model import reward_model_kind

    what = reward_model_kind(Path(model).expanduser()) if model != "demo" else None
    if what:
        raise FtuneError(f"{model} is {what}; GGUF holds language models, and llama.cpp does not run a reward model's score head",
                         hint="score with it through transformers: `ftune score MODEL --data FILE` (or `ftune merge` it and load "
                              "it with AutoModelForSequenceClassification)")


def parse_types(type_names: str | Sequence[str]) -> list[OutputType]:
    """--type's comma list: each name known (else a 'did you mean'), none empty, none twice."""
    names = type_names.split(",") if isinstance(type_names, str) else list(type_names)
    found: list[OutputType] = []
    for position, name in enumerate(names, start=1):
        if not name.strip():
            raise FtuneError(f"--type {','.join(names)!r}: entry {position} is empty", place="--type",
                             hint="separate type names with single commas, e.g. q4_k_m,q5_k_m,q8_0")
        out_type = parse_type(name)
        if any(t.name == out_type.name for t in found):
            raise FtuneError(f"--type names {out_type.name} twice", place="--type", hint="name each type once")
        found.append(out_type)
    return found


def output_paths(out: Path, out_types: list[OutputType]) -> dict[str, Path]:
    """{type: file}: `out` itself for one type; for several, model.gguf -> model.q4_k_m.gguf, ..."""
    if len(out_types) == 1:
        return {out_types[0].name: out}
    return {t.name: out.with_name(f"{out.stem}.{t.name}{out.suffix}") for t in out_types}


def _rejected(failures: list[tuple[str, Path, Path, str]], targets: dict[str, Path], written: list[Exported]) -> FtuneError:
    """The error for files that failed their parity check: the first one's problem, and what was written."""
    type_name, parity_file, rejected, problem = failures[0]
    if len(targets) == 1:
        return FtuneError(f"the GGUF does not behave like the source model ({problem})", place=str(parity_file),
                          hint=f"the file is kept as {rejected} for inspection; it was not written to {targets[type_name]}")
    names = ", ".join(f[0] for f in failures)
    kept = ", ".join(str(f[2]) for f in failures)
    done = f"; written and proven: {', '.join(str(e.path) for e in written)}" if written else ""
    return FtuneError(f"the {names} GGUF does not behave like the source model ({type_name}: {problem})", place=str(parity_file),
                      hint=f"kept for inspection as {kept}{done}")


@contextlib.contextmanager
def _source_model(model: str, out: Path, out_type: OutputType, say: Callable[[str], None]) -> Iterator[tuple[Path, str]]:
    """(a Hugging Face model directory, a display name) for MODEL; run directories merged for the duration."""
    from ftune.modeling.models import resolve_model_path

    if model == "demo":
        yield Path(resolve_model_path("demo")), DEMO_NAME
        return
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        from ftune.merge import is_run_or_adapter, merge_to_dir

        if not is_run_or_adapter(path):
            raise FtuneError(f"{path} is neither a model directory (config.json) nor an ftune run or adapter directory")
        if (path / RUN_FILE).is_file():
            read_run(path, expect="export-gguf")  # a policy run, whole: a damaged or reward-model run is named here
        full_model = path / "model"  # a full fine-tuning run keeps a whole model, nothing to merge
        if (full_model / "config.json").is_file():
            _check_model_dir(full_model)
            yield full_model, path.resolve().name
            return
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
            merged = Path(tmp) / "merged"
            say(f"merging the adapter of {path} into its base model (temporary, in {tmp})")
            # A float32 merge keeps full precision for an f32 export; otherwise the base's dtype.
            merge_to_dir(path, merged, dtype="fp32" if out_type.name == "f32" else None, verify=False, echo=say)
            yield merged, path.resolve().name
        return
    resolved = Path(resolve_model_path(model))
    _check_model_dir(resolved)
    yield resolved, resolved.name if path.exists() else model.rsplit("/", 1)[-1]


def _check_model_dir(model_dir: Path) -> None:
    """A damaged config.json or cut-short weights named here, before the parity check or the converter reads them."""
    from ftune.modeling.models import model_config

    model_config(str(model_dir))
    check_weights(model_dir)


def check_outputs(out: Path, *, overwrite: bool, verify: bool, inputs: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse, before any work, to replace a file at the export's paths that ftune did not write
    (the shared rule, ownership.check_file_target: never an input, never inside another artifact)."""
    check_file_target(out, kind="gguf", ours=written_by_ftune, overwrite=overwrite, inputs=inputs,
                      foreign="is not a GGUF file ftune exported")
    # Its parity report and a rejected file are replaced with it, when they are ftune's.
    check_file_target(parity_path(out), kind="gguf-parity", ours=_is_report, overwrite=True, inputs=inputs,
                      foreign="is in the way: the export writes its parity report there, and ftune did not write that file")
    if verify:
        check_file_target(rejected_path(out), kind="gguf", ours=written_by_ftune, overwrite=True, inputs=inputs,
                          foreign="is in the way: a file that fails the parity check is kept there, and ftune did not write that file")


def written_by_ftune(path: Path) -> bool:
    """A GGUF file ftune exported: it carries ftune's metadata key (one exported before the key
    existed is named by the parity report beside it)."""
    from ftune.gguf.convert import WRITTEN_BY_KEY

    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return False
    try:
        import gguf

        if WRITTEN_BY_KEY in gguf.GGUFReader(str(path)).fields:
            return True
    except Exception:  # noqa: BLE001 (a file the gguf package cannot parse is not one ftune wrote)
        return False
    report = read_json_object(parity_path(path))
    return report is not None and report.get("gguf") == str(path)


def parity_path(out: Path) -> Path:
    return out.with_name(out.name + ".parity.json")


def rejected_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.rejected{out.suffix}")


def _is_report(path: Path) -> bool:
    report = read_json_object(path)
    return report is not None and "gguf" in report and "passed" in report


def _fsync(path: Path, final: Path) -> None:
    with open(path, "rb") as handle:
        try:
            os.fsync(handle.fileno())
        except OSError as exc:  # a full disk names the file being exported, not the work file (ftune.guards.oserrors)
            raise OSError(exc.errno, exc.strerror, str(final)) from exc


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

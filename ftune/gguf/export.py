"""`ftune export-gguf`: a model as one GGUF file for llama.cpp, Ollama and LM Studio, proven right.

`run` reads top to bottom:
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
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.gguf.formats import TYPES, OutputType, parse_type
from ftune.runs import write_json

DEMO_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Exported:
    path: Path
    modelfile: Path
    report: dict | None
    bytes: int
    seconds: float


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
    from ftune.gguf.convert import convert, source_precision
    from ftune.gguf.ollama import write_modelfile
    from ftune.gguf.quantize import quantize_gguf
    from ftune.gguf.verify import first_problem, render_report, require_llama_cpp, verify_gguf

    say = echo or (lambda _text: None)
    started = time.perf_counter()
    out_type = parse_type(type_name)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FtuneError(f"{out} already exists", place="--out", hint="choose another path, or pass --overwrite")
    if out.suffix.lower() != ".gguf":
        raise FtuneError(f"{out} does not end in .gguf", place="--out", hint="llama.cpp, Ollama and LM Studio look for .gguf files")
    # Fail before minutes of conversion, not after.
    if out_type.made_by == "llama.cpp":
        require_llama_cpp(f"--type {out_type.name}")
    if verify:
        require_llama_cpp("checking the written file (skip with --no-verify)")
    out.parent.mkdir(parents=True, exist_ok=True)

    with _source_model(model, out, out_type, say) as (model_dir, name):
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as work_dir:
            work = Path(work_dir) / out.name
            if out_type.made_by == "python":
                say(f"converting {model_dir} to {out_type.name}")
                conversion = convert(model_dir, work, out_type, name=name)
            else:
                lossless = TYPES[source_precision(model_dir)]
                say(f"converting {model_dir} to {lossless.name}, then quantizing to {out_type.name} with llama.cpp")
                conversion = convert(model_dir, Path(work_dir) / f"lossless.{lossless.name}.gguf", lossless, name=name)
                quantize_gguf(Path(work_dir) / f"lossless.{lossless.name}.gguf", work, out_type)
            for note in conversion.notes:
                say(f"warning: {note}")

            report = None
            parity_file = out.with_name(out.name + ".parity.json")
            remove_quietly(parity_file)  # a report left from an earlier file must not describe this one
            if verify:
                say("checking the file with llama.cpp against transformers")
                report = verify_gguf(work, model_dir, out_type)
                rejected = out.with_name(f"{out.stem}.rejected{out.suffix}")
                report["gguf"] = str(out if report["passed"] else rejected)
                write_json(parity_file, report)
                say(render_report(report))
                if not report["passed"]:
                    os.replace(work, rejected)
                    raise FtuneError(
                        f"the GGUF does not behave like the source model ({first_problem(report)})",
                        place=str(parity_file),
                        hint=f"the file is kept as {rejected} for inspection; it was not written to {out}",
                    )
            _fsync(work)
            os.replace(work, out)

    modelfile = write_modelfile(out, conversion.vocab, overwrite=overwrite)
    size = out.stat().st_size
    say(f"wrote {out} ({size / 2**20:.1f} MiB, {out_type.name}) and {modelfile}")
    return Exported(out, modelfile, report, size, time.perf_counter() - started)


@contextlib.contextmanager
def _source_model(model: str, out: Path, out_type: OutputType, say: Callable[[str], None]) -> Iterator[tuple[Path, str]]:
    """(a Hugging Face model directory, a display name) for MODEL; run directories merged for the duration."""
    from ftune.models import resolve_model_path

    if model == "demo":
        yield Path(resolve_model_path("demo")), DEMO_NAME
        return
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        from ftune.merge import is_run_or_adapter, merge_to_dir

        if not is_run_or_adapter(path):
            raise FtuneError(f"{path} is neither a model directory (config.json) nor an ftune run or adapter directory")
        full_model = path / "model"  # a full fine-tuning run keeps a whole model, nothing to merge
        if (full_model / "config.json").is_file():
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
    yield resolved, resolved.name if path.exists() else model.rsplit("/", 1)[-1]


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

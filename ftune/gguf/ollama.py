"""The Ollama Modelfile written next to a GGUF: FROM, a Go TEMPLATE, SYSTEM, stop tokens.

`ollama create NAME -f Modelfile` (run in the GGUF's directory) then serves the model with the
prompt format it was trained on. The TEMPLATE is the Go form of the chat style that
templates.py recognised and proved against the model's jinja template; without a recognised
style there is no TEMPLATE and Ollama falls back to guessing from the GGUF's chat template.
"""

from __future__ import annotations

from pathlib import Path

from ftune.artifacts.ownership import atomic_file
from ftune.errors import FtuneError
from ftune.gguf.vocab import Vocab
from ftune.guards import textio

MODELFILE = "Modelfile"
WRITTEN_BY = "# Written by ftune export-gguf."  # the first line: what makes a Modelfile ftune's


def modelfile_text(gguf_name: str, vocab: Vocab) -> str:
    match = vocab.template
    lines = [
        f"{WRITTEN_BY} In this directory: ollama create <name> -f {MODELFILE}",
        f"FROM ./{gguf_name}",
    ]
    if match.style is not None:
        if not match.exact:
            lines.append(f"# The model's chat template resembles {match.style.name} but differs in detail: check this TEMPLATE.")
        lines.append(f'TEMPLATE """{match.style.go_template}"""')
        if match.default_system:
            lines.append(f'SYSTEM """{match.default_system}"""')
    else:
        lines.append("# No TEMPLATE: the chat template matches no style ftune knows; Ollama reads the GGUF's own.")
    for stop in stop_strings(vocab):
        lines.append(f"PARAMETER stop {textio.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def stop_strings(vocab: Vocab) -> list[str]:
    """The style's turn markers, then every token that ends generation (EOS, end of turn)."""
    stops = list(vocab.template.style.stops) if vocab.template.style else []
    for text in vocab.stop_texts:
        if text not in stops:
            stops.append(text)
    return stops


def write_modelfile(gguf_path: Path, vocab: Vocab) -> Path:
    """Write the Modelfile beside `gguf_path` (where `modelfile_target` says); returns where it went."""
    target = modelfile_target(gguf_path)
    with atomic_file(target) as handle:
        handle.write(modelfile_text(gguf_path.name, vocab))
    return target


def modelfile_target(gguf_path: Path) -> Path:
    """`Modelfile`, or `<name>.Modelfile` when `Modelfile` belongs to something else.

    One directory may hold several exports (f16 and q4_k_m), and files ftune did not write.
    A Modelfile is replaced only when ftune wrote it for this same file, with or without
    --overwrite; when neither name is free, the export is refused before any work.
    """
    candidates = [gguf_path.parent / MODELFILE, gguf_path.with_name(f"{gguf_path.stem}.{MODELFILE}")]
    for target in candidates:
        if not target.exists() and not target.is_symlink():
            return target
        if written_for(target, gguf_path.name):
            return target
    raise FtuneError(
        f"{candidates[0]} and {candidates[1]} belong to another model or were not written by ftune",
        place="--out", hint="ftune replaces only a Modelfile it wrote for this file; export into another directory",
    )


def written_for(modelfile: Path, gguf_name: str) -> bool:
    """A Modelfile ftune wrote for `gguf_name`: ftune's first line, and FROM that file."""
    if modelfile.is_symlink() or not modelfile.is_file() or modelfile.stat().st_size > 2**20:
        return False
    text = modelfile.read_text(encoding="utf-8", errors="replace")
    return text.startswith(WRITTEN_BY) and f"\nFROM ./{gguf_name}\n" in text

"""The Ollama Modelfile written next to a GGUF: FROM, a Go TEMPLATE, SYSTEM, stop tokens.

`ollama create NAME -f Modelfile` (run in the GGUF's directory) then serves the model with the
prompt format it was trained on. The TEMPLATE is the Go form of the chat style that
templates.py recognised and proved against the model's jinja template; without a recognised
style there is no TEMPLATE and Ollama falls back to guessing from the GGUF's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftune.gguf.vocab import Vocab
from ftune.runs import atomic_file

MODELFILE = "Modelfile"


def modelfile_text(gguf_name: str, vocab: Vocab) -> str:
    match = vocab.template
    lines = [
        f"# Written by ftune export-gguf. In this directory: ollama create <name> -f {MODELFILE}",
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
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def stop_strings(vocab: Vocab) -> list[str]:
    """The style's turn markers, then every token that ends generation (EOS, end of turn)."""
    stops = list(vocab.template.style.stops) if vocab.template.style else []
    for text in vocab.stop_texts:
        if text not in stops:
            stops.append(text)
    return stops


def write_modelfile(gguf_path: Path, vocab: Vocab, *, overwrite: bool) -> Path:
    """Write the Modelfile beside `gguf_path`; returns where it went.

    One directory may hold several exports (f16 and q4_k_m): `Modelfile` is replaced when it
    was written for this same file (or with --overwrite); a Modelfile for another file is kept
    and this one is written as `<name>.Modelfile`.
    """
    target = gguf_path.parent / MODELFILE
    if target.exists() and not overwrite and f"FROM ./{gguf_path.name}\n" not in target.read_text(encoding="utf-8", errors="replace"):
        target = gguf_path.with_name(f"{gguf_path.stem}.{MODELFILE}")
    with atomic_file(target) as handle:
        handle.write(modelfile_text(gguf_path.name, vocab))
    return target

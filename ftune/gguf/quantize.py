"""K-quants through llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

K-quant types are mixes: llama.cpp gives attention V, FFN down and the output projection more
bits than the rest, by rules that change between its releases. Running its quantizer on a
lossless GGUF gives exactly the file `llama-quantize` would, without shipping a binary.
llama-cpp-python is an optional extra; a clear error says so when it is missing.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from ftune.errors import FtuneError
from ftune.gguf.quant_types import OutputType
from ftune.gguf.verify import captured_llama_log, require_llama_cpp, worker_threads
from ftune.guards import signals

LLAMACPP_UPGRADE = "pip install -U 'ftune[llamacpp]'"


def quantize_gguf(source: Path, target: Path, out_type: OutputType) -> None:
    """Quantize the f16/bf16/f32 GGUF `source` into `target` as `out_type` with llama.cpp."""
    llama_cpp = require_llama_cpp(f"--type {out_type.name}")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{out_type.ftype}", None)
    if ftype is None:
        raise FtuneError(f"this llama-cpp-python has no {out_type.name} quantizer", hint=f"upgrade it: {LLAMACPP_UPGRADE}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = worker_threads()
    with captured_llama_log() as log:
        status = signals.interruptible(llama_cpp.llama_model_quantize, str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        detail = "\n".join(line for line in log if line.strip())[-600:]
        raise FtuneError(f"llama.cpp could not quantize to {out_type.name} (status {status})", hint=detail or None)

"""The GGUF output types: what each costs, how it is made, and how close it must stay to the source.

Imported by the CLI to build `--help`, so nothing heavy here: no numpy, no gguf, no torch.

Two ways to make a type:
- "python": written directly by the `gguf` package while streaming (f32, f16, bf16, q8_0 and
  the legacy q4_0/q4_1/q5_0/q5_1 block formats). No extra dependency.
- "llama.cpp": K-quants mix block types per tensor (attention V and FFN down get more bits),
  which only llama.cpp's quantizer decides; we write a lossless GGUF first and run it through
  `llama_model_quantize` from llama-cpp-python.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ftune.errors import FtuneError
from ftune.modeling.compare import Tolerance as Tolerance  # how close llama.cpp must stay to transformers, per type

LLAMACPP_INSTALL = "pip install 'ftune[llamacpp]'  (llama-cpp-python)"


@dataclass(frozen=True)
class OutputType:
    name: str
    """The --type name, lower case as llama.cpp's tools spell it."""
    bits: float
    """Approximate bits per weight of the large matrices (what decides file size)."""
    made_by: str
    """"python" (gguf package, while streaming) or "llama.cpp" (quantizer after an f16/f32 file)."""
    ggml_type: str
    """gguf.GGMLQuantizationType member for the large matrices (python types)."""
    ftype: str
    """gguf.LlamaFileType / llama.cpp llama_ftype member name recorded in general.file_type."""
    advice: str
    """One line for --help: what it costs and when to pick it."""
    tolerance: Tolerance


# Tolerances separate a broken file from honest rounding. Measured on the demo model
# (SmolLM2-135M: small models are the most sensitive to rounding) over the parity prompts,
# top-1 agreement / mean KL: f16 100% / 1e-5, q8_0 96% / 6e-3, q4_k_m 91% / 0.08, q2_k 67% /
# 0.63. The same model with q/k rows left in transformers' rope order measures 50% / 1.2: every
# limit below fails it. Larger models agree more at every type.
# Even f32 is not bit-exact: llama.cpp keeps its KV cache in f16 by default, so a near tie
# between two next tokens can flip; greedy continuations from chat prompts must still agree.
_EXACT = Tolerance(top1_min=0.98, kl_max=1e-4, greedy_identical=True)
_HALF = Tolerance(top1_min=0.97, kl_max=2e-3, greedy_identical=True)

TYPES: dict[str, OutputType] = {
    t.name: t
    for t in [
        OutputType("f32", 32, "python", "F32", "ALL_F32", "lossless; for debugging", _EXACT),
        OutputType("f16", 16, "python", "F16", "MOSTLY_F16", "practically lossless; the master copy to quantize from", _HALF),
        OutputType(
            "bf16", 16, "python", "BF16", "MOSTLY_BF16", "lossless for bf16-trained models; slower than f16 on many CPUs",
            Tolerance(top1_min=0.95, kl_max=1e-2, greedy_identical=False),
        ),
        OutputType(
            "q8_0", 8.5, "python", "Q8_0", "MOSTLY_Q8_0", "near-lossless at half the size of f16",
            Tolerance(top1_min=0.90, kl_max=0.03, greedy_identical=False),
        ),
        OutputType(
            "q6_k", 6.6, "llama.cpp", "Q6_K", "MOSTLY_Q6_K", "close to q8_0, 20% smaller",
            Tolerance(top1_min=0.85, kl_max=0.1, greedy_identical=False),
        ),
        OutputType(
            "q5_k_m", 5.7, "llama.cpp", "Q5_K", "MOSTLY_Q5_K_M", "PICK THIS if it fits: very close to f16 at a third of its size",
            Tolerance(top1_min=0.80, kl_max=0.3, greedy_identical=False),
        ),
        OutputType(
            "q4_k_m", 4.9, "llama.cpp", "Q4_K", "MOSTLY_Q4_K_M", "PICK THIS otherwise: small loss; the usual Ollama / LM Studio file",
            Tolerance(top1_min=0.80, kl_max=0.3, greedy_identical=False),
        ),
        OutputType(
            "q3_k_m", 3.9, "llama.cpp", "Q3_K", "MOSTLY_Q3_K_M", "noticeable loss; only when q4_k_m does not fit",
            Tolerance(top1_min=0.65, kl_max=0.6, greedy_identical=False),
        ),
        OutputType(
            "q2_k", 3.4, "llama.cpp", "Q2_K", "MOSTLY_Q2_K", "large loss; a last resort",
            Tolerance(top1_min=0.55, kl_max=0.9, greedy_identical=False),
        ),
        OutputType(
            "q5_1", 6.0, "python", "Q5_1", "MOSTLY_Q5_1", "legacy block format; prefer q5_k_m",
            Tolerance(top1_min=0.70, kl_max=0.4, greedy_identical=False),
        ),
        OutputType(
            "q5_0", 5.5, "python", "Q5_0", "MOSTLY_Q5_0", "legacy block format; prefer q5_k_m",
            Tolerance(top1_min=0.80, kl_max=0.3, greedy_identical=False),
        ),
        OutputType(
            "q4_1", 5.0, "python", "Q4_1", "MOSTLY_Q4_1", "legacy block format; prefer q4_k_m",
            Tolerance(top1_min=0.70, kl_max=0.5, greedy_identical=False),
        ),
        OutputType(
            "q4_0", 4.5, "python", "Q4_0", "MOSTLY_Q4_0", "legacy block format; prefer q4_k_m",
            Tolerance(top1_min=0.60, kl_max=0.8, greedy_identical=False),
        ),
    ]
}

DEFAULT_TYPE = "q8_0"


def parse_type(name: str) -> OutputType:
    """The OutputType called `name` (case and '-' tolerated), or an error with a 'did you mean'."""
    key = name.strip().lower().replace("-", "_")
    if key in TYPES:
        return TYPES[key]
    close = difflib.get_close_matches(key, list(TYPES), n=1, cutoff=0.5)
    raise FtuneError(
        f"unknown GGUF type '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""),
        place="--type",
        hint="one of: " + ", ".join(TYPES),
    )


def types_help() -> str:
    """The type table for `ftune export-gguf --help`, one line per type."""
    lines = []
    for t in TYPES.values():
        needs = "  [llama-cpp-python]" if t.made_by == "llama.cpp" else ""
        lines.append(f"{t.name:<7} {t.bits:>4g} bits/weight  {t.advice}{needs}")
    return "\n".join(lines)

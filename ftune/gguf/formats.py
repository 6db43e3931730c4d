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

LLAMACPP_INSTALL = "pip install 'ftune[llamacpp]'  (llama-cpp-python)"


@dataclass(frozen=True)
class Tolerance:
    """How close llama.cpp running the file must stay to transformers running the source."""

    top1_min: float
    """Least share of positions whose most likely next token is the same on both sides."""
    kl_max: float
    """Largest mean KL divergence (nats) between the two next-token distributions."""
    greedy_identical: bool
    """Whether greedy continuations must be token-for-token identical."""


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


# Tolerances were measured on the demo model (SmolLM2-135M, the smallest and so the most
# sensitive to rounding) over the parity prompts, with headroom: a 135M model at q4_k_m agrees
# on about 85% of next tokens, larger models agree more.
_EXACT = Tolerance(top1_min=1.0, kl_max=1e-4, greedy_identical=True)
_HALF = Tolerance(top1_min=0.97, kl_max=2e-3, greedy_identical=True)

TYPES: dict[str, OutputType] = {
    t.name: t
    for t in [
        OutputType("f32", 32, "python", "F32", "ALL_F32", "lossless, 4 bytes/weight; for debugging or your own quantizing", _EXACT),
        OutputType("f16", 16, "python", "F16", "MOSTLY_F16", "practically lossless, 2 bytes/weight; the master copy to quantize from", _HALF),
        OutputType(
            "bf16", 16, "python", "BF16", "MOSTLY_BF16", "lossless for bf16-trained models, 2 bytes/weight; slower than f16 on many CPUs",
            Tolerance(top1_min=0.95, kl_max=5e-3, greedy_identical=False),
        ),
        OutputType(
            "q8_0", 8.5, "python", "Q8_0", "MOSTLY_Q8_0", "near-lossless at half of f16; the safe choice when size is no concern",
            Tolerance(top1_min=0.93, kl_max=1e-2, greedy_identical=False),
        ),
        OutputType(
            "q6_k", 6.6, "llama.cpp", "Q6_K", "MOSTLY_Q6_K", "close to q8_0, 20% smaller",
            Tolerance(top1_min=0.90, kl_max=3e-2, greedy_identical=False),
        ),
        OutputType(
            "q5_k_m", 5.7, "llama.cpp", "Q5_K", "MOSTLY_Q5_K_M", "RECOMMENDED when it fits: very close to f16 at about a third of its size",
            Tolerance(top1_min=0.85, kl_max=6e-2, greedy_identical=False),
        ),
        OutputType(
            "q4_k_m", 4.9, "llama.cpp", "Q4_K", "MOSTLY_Q4_K_M", "RECOMMENDED default for Ollama / LM Studio: small loss, a quarter of f16 weights' size",
            Tolerance(top1_min=0.75, kl_max=0.15, greedy_identical=False),
        ),
        OutputType(
            "q3_k_m", 3.9, "llama.cpp", "Q3_K", "MOSTLY_Q3_K_M", "noticeable quality loss; only when q4_k_m does not fit",
            Tolerance(top1_min=0.60, kl_max=0.40, greedy_identical=False),
        ),
        OutputType(
            "q2_k", 3.4, "llama.cpp", "Q2_K", "MOSTLY_Q2_K", "large quality loss; a last resort for big models on small machines",
            Tolerance(top1_min=0.40, kl_max=1.0, greedy_identical=False),
        ),
        OutputType(
            "q5_1", 6.0, "python", "Q5_1", "MOSTLY_Q5_1", "legacy block format; prefer q5_k_m",
            Tolerance(top1_min=0.85, kl_max=6e-2, greedy_identical=False),
        ),
        OutputType(
            "q5_0", 5.5, "python", "Q5_0", "MOSTLY_Q5_0", "legacy block format; prefer q5_k_m",
            Tolerance(top1_min=0.85, kl_max=8e-2, greedy_identical=False),
        ),
        OutputType(
            "q4_1", 5.0, "python", "Q4_1", "MOSTLY_Q4_1", "legacy block format; prefer q4_k_m",
            Tolerance(top1_min=0.70, kl_max=0.25, greedy_identical=False),
        ),
        OutputType(
            "q4_0", 4.5, "python", "Q4_0", "MOSTLY_Q4_0", "legacy block format; prefer q4_k_m",
            Tolerance(top1_min=0.65, kl_max=0.30, greedy_identical=False),
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
        lines.append(f"{t.name:<7} ~{t.bits:>4g} bits/weight  {t.advice}{needs}")
    return "\n".join(lines)

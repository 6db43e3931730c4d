"""Write a Hugging Face model directory as one GGUF file, streaming one tensor at a time.

A GGUF file starts with a header that lists every tensor's name, shape and type, so the
conversion runs in two passes over the safetensors files: the first reads only their headers
(shapes, no data) to plan each tensor's output type and size; the second loads, reshapes and
encodes one tensor at a time and appends it. Peak memory is the largest single tensor in
float32 (the embedding: 128k tokens x 4096 x 4 bytes = 2 GB for Llama 3 8B), never the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune import __version__
from ftune.errors import FtuneError
from ftune.gguf import arch as archs
from ftune.gguf.quant_types import OutputType
from ftune.gguf.vocab import Vocab, llamacpp_model_name, read_vocab, write_vocab
from ftune.guards.weights import tensor_index

if TYPE_CHECKING:
    import numpy as np
    import torch

WRITTEN_BY_KEY = "ftune.version"  # kept by llama.cpp's quantizer, which copies every key


F16_MAX = 65504.0


@dataclass
class TensorJob:
    name: str
    """llama.cpp's tensor name."""
    shape: tuple[int, ...]
    """Shape in numpy order (rows, columns)."""
    qtype: str
    """gguf.GGMLQuantizationType member written for it."""
    load: Callable[[], Any]
    """Returns the tensor, laid out for llama.cpp, as a torch tensor or numpy array."""


@dataclass
class Conversion:
    """What was written, for the report and the later steps."""

    arch: archs.Architecture
    vocab: Vocab
    tensors: int
    bytes: int
    types: dict[str, int]
    """GGML type name -> number of tensors written in it."""
    notes: list[str]


def read_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise FtuneError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise FtuneError(f"cannot read the model config: {exc}", place=str(model_dir / "config.json")) from None


def convert(model_dir: Path, out_file: Path, out_type: OutputType, *, name: str) -> Conversion:
    """Write `model_dir` to `out_file` (a path that must not exist yet) in `out_type`."""
    import gguf

    if out_type.made_by != "python":
        raise ValueError(f"{out_type.name} is made by llama.cpp's quantizer, not here")
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    arch = archs.architecture_for(config, str(model_dir / "config.json"))
    vocab = read_vocab(model_dir, config.vocab_size)
    notes = list(vocab.notes)
    if note := archs.sliding_window_note(arch, config):
        notes.append(note)

    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(llamacpp_model_name(name, vocab))
    writer.add_string(WRITTEN_BY_KEY, f"ftune {__version__}")  # how a later --overwrite knows the file is ftune's
    writer.add_file_type(int(gguf.LlamaFileType[out_type.ftype]))
    if out_type.ggml_type not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    archs.write_hparams(writer, arch, config, config.vocab_size)
    write_vocab(writer, vocab)

    jobs = plan_tensors(model_dir, arch, config, out_type)
    counts: dict[str, int] = {}
    for job in jobs:
        qtype = gguf.GGMLQuantizationType[job.qtype]
        writer.add_tensor_info(job.name, job.shape, _dummy_dtype(), _nbytes(job.shape, qtype), raw_dtype=qtype)
        counts[job.qtype] = counts.get(job.qtype, 0) + 1
    total = sum(_nbytes(job.shape, gguf.GGMLQuantizationType[job.qtype]) for job in jobs)

    writer.write_header_to_file(path=out_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    scratch: dict = {}
    try:
        for job in jobs:
            writer.write_tensor_data(encode(job, scratch))
    finally:
        writer.close()
    return Conversion(arch, vocab, len(jobs), total, counts, notes)


def plan_tensors(model_dir: Path, arch: archs.Architecture, config: Any, out_type: OutputType) -> list[TensorJob]:
    """Every tensor of the output, in llama.cpp's names, with its shape and type (no data read)."""
    name_map = archs.tensor_name_map(arch, config)
    jobs: list[TensorJob] = []
    for hf_name, info in tensor_index(model_dir).items():
        gguf_name = archs.gguf_tensor_name(arch, config, name_map, hf_name)
        if gguf_name is None:
            continue
        kind = _tensor_type(gguf_name, info.shape, out_type, config)
        jobs.append(TensorJob(gguf_name, info.shape, kind, _loader(info.file, hf_name, arch, config)))
    names = {job.name for job in jobs}
    if "token_embd.weight" not in names or ("output.weight" not in names and not getattr(config, "tie_word_embeddings", False)):
        raise FtuneError(
            "the checkpoint lacks the token embedding or the output projection (lm_head) its config calls for",
            place=str(model_dir),
        )
    for gguf_name, array in archs.extra_tensors(arch, config).items():
        jobs.append(TensorJob(gguf_name, tuple(array.shape), "F32", lambda a=array: a))
    return sorted(jobs, key=_file_order)


def source_precision(model_dir: Path) -> str:
    """The lossless output type for the checkpoint's own float precision: "f32", "bf16" or "f16"."""
    dtypes = {info.dtype for info in tensor_index(model_dir).values()}
    for dtype, name in (("F32", "f32"), ("BF16", "bf16"), ("F16", "f16")):
        if dtype in dtypes:
            return name
    return "f16"


def _file_order(job: TensorJob) -> tuple[int, int, str]:
    """Embedding first, blocks in order, output last: the order llama.cpp's own files use."""
    if job.name.startswith("blk."):
        return (1, int(job.name.split(".")[1]), job.name)
    return (0 if job.name.startswith(("token_embd", "rope_")) else 2, 0, job.name)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: OutputType, config: Any) -> str:
    """The GGML type a tensor is written in for `out_type`.

    Vectors (norms, biases) stay float32: llama.cpp computes them in float32 and they are
    tiny. Matrices take the output type; a block type needs rows that split into whole blocks
    (32 values), else the matrix falls back to f16 as llama.cpp's converter does. The legacy
    4/5-bit types keep the output projection at q8_0 (llama.cpp's quantizer would use q6_k,
    which Python cannot write): it decides every token's probability and dominates the loss.
    """
    if len(shape) < 2 or gguf_name.endswith("_norm.weight"):
        return "F32"
    qtype = out_type.ggml_type
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and getattr(config, "tie_word_embeddings", False))
    if qtype.startswith(("Q4", "Q5")) and is_output:
        qtype = "Q8_0"
    return qtype if shape[-1] % 32 == 0 else "F16"


def _loader(file: Path, hf_name: str, arch: archs.Architecture, config: Any) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            tensor = handle.get_tensor(hf_name)
        return archs.prepare_tensor(arch, config, hf_name, tensor)

    return load


def encode(job: TensorJob, scratch: dict) -> np.ndarray:
    """Load one tensor and encode it in its GGML type, as the bytes the file stores.

    Conversions run in numpy into buffers reused from tensor to tensor (`scratch`): fresh
    allocations for every tensor cost more in page faults than the conversion itself.
    """
    import gguf
    import numpy as np
    import torch

    data = job.load()
    if isinstance(data, torch.Tensor):
        if job.qtype == "BF16" and data.dtype == torch.bfloat16:
            return data.contiguous().view(torch.int16).numpy().view(np.uint16)  # bf16 stays bit-identical
        data = (data if data.dtype == torch.float32 else data.float()).contiguous().numpy()
    data = np.ascontiguousarray(data, dtype=np.float32)
    if job.qtype == "F32":
        return data
    if job.qtype == "F16":
        if data.size and max(-float(data.min()), float(data.max())) > F16_MAX:
            raise FtuneError(
                f"{job.name} has values beyond float16's range ({F16_MAX:g})",
                hint="export with --type bf16 or --type f32, or quantize from one of those",
            )
        half = _buffer(scratch, np.float16, data.size).reshape(data.shape)
        np.copyto(half, data, casting="same_kind")
        return half
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[job.qtype])


def _buffer(scratch: dict, dtype: Any, size: int) -> np.ndarray:
    """A reusable flat buffer of at least `size` elements of `dtype`."""
    import numpy as np

    current = scratch.get(dtype)
    if current is None or current.size < size:
        current = scratch[dtype] = np.empty(size, dtype=dtype)
    return current[:size]


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * (shape[-1] // block) * size


def _dummy_dtype() -> Any:
    # GGUFWriter reads the byte shape from the array dtype only for uint8 data; any float dtype
    # makes it take `shape` as the logical shape, which is what is passed.
    import numpy as np

    return np.float32

"""A model directory's safetensors weights, read from the file headers: no tensor data, no torch.

A safetensors file starts with 8 bytes (little-endian header length) and a JSON header naming
every tensor's dtype, shape and byte range; a sharded checkpoint adds
model.safetensors.index.json, mapping each tensor to its shard. Merge and GGUF export both
plan their outputs from this before reading any tensor. A guard like the others here: a file's
header is checked (`check_weights`) before any library is trusted to load it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.guards import textio

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_KINDS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint is stored, in what dtype and shape."""

    file: Path
    dtype: str  # safetensors' name: F32, BF16, I64, ...
    shape: tuple[int, ...]


def tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in `model_dir`: one file, or the shards an index lists."""
    model_dir = Path(model_dir)
    index_file = model_dir / INDEX_FILE
    if index_file.is_file():
        weight_map = _weight_map(index_file)
        headers = {file: read_header(model_dir / file) for file in dict.fromkeys(weight_map.values())}
        index = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise FtuneError(f"the index puts {name} in {file}, which does not hold it", place=str(index_file))
            index[name] = headers[file][name]
        return index
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return read_header(single)
    if any(model_dir.glob("*.bin")):
        raise FtuneError(
            f"{model_dir} has no safetensors weights; ftune does not load pickle-based .bin files",
            hint="convert the checkpoint to safetensors first",
        )
    raise FtuneError(f"{model_dir} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def check_weights(model_dir: Path) -> None:
    """Every safetensors file of a local model directory is whole, checked from its header before
    a loader reads it (the safetensors library's own error for a cut-short file names no file)."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file() or (model_dir / SINGLE_FILE).is_file():
        tensor_index(model_dir)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors one safetensors file holds, with a clear error for a file that is not one."""
    try:
        with open(file, "rb") as handle:
            start = handle.read(8)
            size = file.stat().st_size
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError("truncated, or not a safetensors file")
            try:
                header = textio.loads(handle.read(length), str(file))  # depth-bounded: a header is a flat object
            except FtuneError as exc:
                raise ValueError(exc.message) from None
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        tensors, data_end = {}, 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape, offsets = entry["shape"], entry["data_offsets"]
            if (not isinstance(entry["dtype"], str) or not all(isinstance(n, int) and n >= 0 for n in shape)
                    or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets))):
                raise ValueError(f"tensor {name} has a malformed entry")
            data_end = max(data_end, offsets[1])
            tensors[name] = TensorInfo(Path(file), entry["dtype"], tuple(shape))
        if 8 + length + data_end > size:  # a copy cut short: its header is whole, its tensors are not
            raise ValueError(f"cut short: its header describes {8 + length + data_end:,} bytes, the file holds {size:,}")
        return tensors
    except FileNotFoundError:
        raise FtuneError(f"{file} does not exist") from None
    except OSError as exc:
        raise FtuneError(f"cannot read it ({exc.strerror})", place=str(file)) from None
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FtuneError(f"not a readable safetensors file ({exc})", place=str(file)) from None


def _weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = textio.load_file(index_file, "safetensors index")["weight_map"]
    except FtuneError as exc:
        raise FtuneError(f"unreadable safetensors index ({exc.message})", place=exc.place or str(index_file)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FtuneError(f"unreadable safetensors index ({type(exc).__name__}: {exc})", place=str(index_file)) from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise FtuneError("the safetensors index's weight_map must map tensor names to file names", place=str(index_file))
    if any(Path(name).name != name for name in weight_map.values()):  # a shard outside the model directory
        raise FtuneError("the safetensors index names a shard outside the model directory", place=str(index_file))
    return weight_map

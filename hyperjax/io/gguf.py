"""GGUF files: a validating, memory-mapped reader over the `gguf` package, and a small writer for tests and tools.

Every problem a damaged or foreign file can cause — wrong magic, truncation, a tensor type or architecture hyperjax
does not run, a tensor whose bytes disagree with its shape — becomes a named `GGUFError` saying what and where.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hyperjax.errors import GGUFError, ModelNotFoundError, UnsupportedArchitectureError, UnsupportedTensorTypeError

SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}
_MISSING = object()


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: shape in row-major order (GGUF lists dims fastest-first), data memory-mapped from the file.

    `data` is uint8 block bytes (rows, bytes per row) for quantized types, a float32/float16 array of `shape` else.
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        value = self.metadata.get(key, _MISSING)
        if value is _MISSING:
            raise GGUFError(f"{self.path}: metadata key '{key}' is missing")
        return value


def _field_value(field: gguf.ReaderField) -> Any:
    """A metadata field as plain Python: str, int, float, bool, or a list of those."""
    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 4 or head[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {head[:4]!r} at offset 0, expected {MAGIC!r})")
    if len(head) < 8:
        raise GGUFError(f"{path}: truncated header ({size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")


def _tensor(path: Path, info: gguf.ReaderTensor, file_size: int) -> GGUFTensor:
    type_name = info.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise UnsupportedTensorTypeError(
            f"{path}: tensor '{info.name}' has type {type_name}; hyperjax imports {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(d) for d in reversed(info.shape.tolist()))
    if any(d <= 0 for d in shape):
        raise GGUFError(f"{path}: tensor '{info.name}' has an empty dimension in shape {shape}")
    block, block_bytes = gguf.GGML_QUANT_SIZES[info.tensor_type]
    if shape[-1] % block:
        raise GGUFError(
            f"{path}: tensor '{info.name}' of type {type_name} has {shape[-1]} columns, not a multiple of {block}"
        )
    nbytes = int(np.prod(shape)) // block * block_bytes
    offset = int(info.data_offset)
    if offset + nbytes > file_size:
        raise GGUFError(
            f"{path}: truncated: tensor '{info.name}' needs bytes {offset}..{offset + nbytes}, file has {file_size}"
        )
    raw = np.asarray(info.data)
    if raw.nbytes != nbytes:
        raise GGUFError(f"{path}: tensor '{info.name}' holds {raw.nbytes} bytes, its shape {shape} needs {nbytes}")
    if type_name in _FLOAT_DTYPES:
        data = raw.view(_FLOAT_DTYPES[type_name]).reshape(shape)
    else:
        data = raw.view(np.uint8).reshape(*shape[:-1], shape[-1] // block * block_bytes)
    return GGUFTensor(info.name, type_name, shape, offset, nbytes, data)


def read_gguf(path: str | os.PathLike, *, architectures: Collection[str] | None = None) -> GGUFFile:
    """Open and validate a GGUF file; tensor data stays memory-mapped (nothing is copied here).

    Raises ModelNotFoundError for a missing file, GGUFError for a damaged one, UnsupportedTensorTypeError and
    UnsupportedArchitectureError for what hyperjax does not run.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such model file: {path}")
    _check_header(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        raise GGUFError(f"{path}: damaged GGUF header or tensor table ({type(exc).__name__}: {exc})") from exc
    file_size = path.stat().st_size
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = _field_value(field)
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise GGUFError(f"{path}: metadata key '{key}' cannot be decoded ({exc})") from exc
    gguf_file = GGUFFile(path, metadata, {})
    if architectures is not None:
        arch = metadata.get("general.architecture")
        if arch not in architectures:
            raise UnsupportedArchitectureError(
                f"{path}: architecture {arch!r} is not supported (supported: {', '.join(sorted(architectures))})"
            )
    for info in reader.tensors:
        if info.name in gguf_file.tensors:
            raise GGUFError(f"{path}: tensor '{info.name}' appears twice")
        gguf_file.tensors[info.name] = _tensor(path, info, file_size)
    return gguf_file


def release_pages(tensor: GGUFTensor) -> None:
    """Drop a tensor's file pages from this process's resident set once its bytes have been copied elsewhere.

    The pages stay in the OS page cache, so a later read is a memory copy, not a disk read.
    """
    base = tensor.data
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if isinstance(base, mmap.mmap):
        start = tensor.offset - tensor.offset % mmap.PAGESIZE
        base.madvise(mmap.MADV_DONTNEED, start, tensor.offset + tensor.nbytes - start)


def describe(gguf_file: GGUFFile) -> dict[str, Any]:
    """Architecture, tensor count and bytes by GGML type, and total parameter count."""
    counts = Counter(t.ggml_type for t in gguf_file.tensors.values())
    sizes: Counter[str] = Counter()
    for t in gguf_file.tensors.values():
        sizes[t.ggml_type] += t.nbytes
    return {
        "architecture": gguf_file.get("general.architecture"),
        "tensors": len(gguf_file.tensors),
        "tensors_by_type": dict(counts),
        "bytes_by_type": dict(sizes),
        "parameters": sum(t.n_elements for t in gguf_file.tensors.values()),
        "tensor_bytes": sum(sizes.values()),
    }


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if value < 0:
            writer.add_int32(key, value) if value >= -(2**31) else writer.add_int64(key, value)
        else:
            writer.add_uint32(key, value) if value < 2**32 else writer.add_uint64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata '{key}': cannot store a {type(value).__name__} in GGUF")


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, tuple[str, np.ndarray]],
) -> Path:
    """Write a GGUF file. `tensors` maps name → (GGML type, array): float arrays for F32/F16, and for quantized
    types the raw uint8 block bytes (rows, bytes per row), as `hyperjax.kernels.quant.to_gguf_blocks` makes them."""
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if key != "general.architecture":
            _add_metadata(writer, key, value)
    for name, (type_name, array) in tensors.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        if type_name in _FLOAT_DTYPES:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=_FLOAT_DTYPES[type_name]))
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

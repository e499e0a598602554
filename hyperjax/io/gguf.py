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
from itertools import pairwise
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hyperjax.errors import GGUFError, ModelNotFoundError, UnsupportedArchitectureError, UnsupportedTensorTypeError

SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "I8", "I16", "I32")
MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}
# Integer tensors (hyperjax's sparse files keep CSR arrays in them) are read as arrays of their shape.
_INT_DTYPES = {"I8": np.int8, "I16": np.int16, "I32": np.int32}
_MISSING = object()
_VT = gguf.GGUFValueType
_ARRAY_ID = int(_VT.ARRAY)
# Fewest bytes one array item of each value type can occupy: bounds an array's declared length by the file size.
_MIN_ITEM_BYTES = {
    **{t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()},
    _VT.STRING: 8,
    _VT.ARRAY: 12,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: shape in row-major order (GGUF lists dims fastest-first), data memory-mapped from the file.

    `data` is uint8 block bytes (rows, bytes per row) for quantized types, a float32/float16 or int8/int16/int32
    array of `shape` else.
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
    """A validated GGUF file: metadata as plain Python values, tensors by name (file order)."""

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


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` made strict and fast; relies on three internals of gguf 0.19 (pinned below 0.20).

    `_get` refuses short reads past the end of the file (the base class returns short arrays and reads on) and
    slices a plain ndarray view of the map (slicing `np.memmap` is far slower: the base reader takes 6.5 s on
    SmolLM2's 49k-token vocabulary, this one 0.7 s). `_get_field_parts` bounds an array's declared length by the
    bytes left, so a corrupt length fails at once instead of looping. `_build_tensors` only keeps the tensor-info
    fields: `read_gguf` validates them and builds the views itself.
    """

    def __init__(self, path: Path, file_size: int):
        self._path = path
        self._size = file_size
        self._bytes: np.ndarray | None = None
        self.tensor_fields: list[gguf.ReaderField] = []
        super().__init__(path, "r")

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        if self._bytes is None:
            self._bytes = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        offset, count = int(offset), int(count)
        end = offset + dtype.itemsize * count
        if end > self._size:
            raise GGUFError(
                f"{self._path}: truncated: {end - offset} bytes needed at offset {offset}, file has {self._size}"
            )
        arr = self._bytes[offset:end].view(dtype)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if int(raw_type) == _ARRAY_ID:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            length = int(self._get(orig_offs + 4, np.uint64)[0])
            left = self._size - orig_offs - 12
            if length * _MIN_ITEM_BYTES.get(item_type, 1) > left:
                raise GGUFError(
                    f"{self._path}: array at offset {orig_offs} declares {length} items; only {left} bytes follow"
                )
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        self.tensor_fields = fields

    def bytes_at(self, offset: int, nbytes: int) -> np.ndarray:
        """A read-only uint8 view of the map (no copy); GGUFError past the end of the file."""
        return self._get(offset, np.uint8, nbytes)


def _check_header(path: Path, size: int) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc})") from exc
    if head[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file: magic {head[:4]!r} at offset 0, expected {MAGIC!r}")
    if len(head) < 8:
        raise GGUFError(f"{path}: truncated: the header needs 8 bytes, file has {size}")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0 and version:
        raise GGUFError(f"{path}: big-endian GGUF files are not supported (version field at offset 4)")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(
            f"{path}: GGUF version {version} at offset 4 is not supported (supported: {SUPPORTED_VERSIONS})"
        )


def _open(path: Path, size: int) -> _Reader:
    try:
        return _Reader(path, size)
    except (ValueError, IndexError, KeyError, OverflowError) as exc:
        # ValueError includes UnicodeDecodeError and unknown value types; KeyError is a duplicated key.
        raise GGUFError(f"{path}: damaged GGUF header or tensor table ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise GGUFError(f"{path}: cannot map the file ({exc})") from exc


def _metadata(path: Path, reader: _Reader) -> dict[str, Any]:
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except ValueError as exc:
            raise GGUFError(f"{path}: metadata key '{key}' at offset {field.offset} cannot be decoded ({exc})") from exc
    return metadata


def _check_architecture(path: Path, metadata: dict[str, Any], architectures: Collection[str]) -> None:
    arch = metadata.get("general.architecture")
    if arch not in architectures:
        found = "no 'general.architecture' key" if arch is None else f"architecture {arch!r}"
        raise UnsupportedArchitectureError(
            f"{path}: {found} is not supported (supported: {', '.join(sorted(architectures))})"
        )


def _tensor(path: Path, field: gguf.ReaderField, reader: _Reader, file_size: int) -> GGUFTensor:
    """Validate one tensor-info entry against the file and view its bytes (no copy)."""
    name = field.name
    _, _, _, dims, raw_type, rel_offset = field.parts
    where = f"{path}: tensor '{name}' (info at offset {field.offset})"
    shape = tuple(int(d) for d in reversed(dims.tolist()))
    if not 1 <= len(shape) <= MAX_DIMS:
        raise GGUFError(f"{where} has {len(shape)} dimensions; GGUF allows 1 to {MAX_DIMS}")
    try:
        qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise UnsupportedTensorTypeError(f"{where} has unknown GGML type id {int(raw_type[0])}") from None
    if qtype.name not in SUPPORTED_TYPES:
        raise UnsupportedTensorTypeError(
            f"{where} has type {qtype.name}; hyperjax imports {', '.join(SUPPORTED_TYPES)}"
        )
    if min(shape) <= 0:
        raise GGUFError(f"{where} has an empty dimension in shape {shape}")
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise GGUFError(f"{where} of type {qtype.name} has {shape[-1]} columns, not a multiple of {block}")
    nbytes = int(np.prod(shape, dtype=object)) // block * block_bytes
    if int(rel_offset[0]) % reader.alignment:
        raise GGUFError(f"{where}: data offset {int(rel_offset[0])} is not a multiple of {reader.alignment}")
    offset = reader.data_offset + int(rel_offset[0])
    if offset + nbytes > file_size:
        raise GGUFError(
            f"{where}: truncated or inconsistent: shape {shape} of {qtype.name} needs bytes "
            f"{offset}..{offset + nbytes}, file has {file_size}"
        )
    raw = reader.bytes_at(offset, nbytes)
    if qtype.name in _FLOAT_DTYPES or qtype.name in _INT_DTYPES:
        data = raw.view({**_FLOAT_DTYPES, **_INT_DTYPES}[qtype.name]).reshape(shape)
    else:
        data = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
    return GGUFTensor(name, qtype.name, shape, offset, nbytes, data)


def _check_overlaps(path: Path, tensors: Collection[GGUFTensor]) -> None:
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in pairwise(ordered):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(
                f"{path}: tensor '{a.name}' (shape {a.shape}, bytes {a.offset}..{a.offset + a.nbytes}) overlaps "
                f"tensor '{b.name}' at offset {b.offset}"
            )


def read_gguf(path: str | os.PathLike, *, architectures: Collection[str] | None = None) -> GGUFFile:
    """Open and validate a GGUF file; tensor data stays memory-mapped (nothing is copied here).

    Raises ModelNotFoundError for a missing file, GGUFError for a damaged one, UnsupportedArchitectureError and
    UnsupportedTensorTypeError for what hyperjax does not run (architecture checked first).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such model file: {path}")
    size = path.stat().st_size
    _check_header(path, size)
    reader = _open(path, size)
    metadata = _metadata(path, reader)
    if architectures is not None:
        _check_architecture(path, metadata, architectures)
    tensors: dict[str, GGUFTensor] = {}
    for field in reader.tensor_fields:
        if field.name in tensors:
            raise GGUFError(f"{path}: tensor '{field.name}' appears twice (second at offset {field.offset})")
        tensors[field.name] = _tensor(path, field, reader, size)
    _check_overlaps(path, tensors.values())
    return GGUFFile(path, metadata, tensors)


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


_INT_RANGES = {
    _VT.UINT32: (0, 2**32),
    _VT.INT32: (-(2**31), 2**31),
    _VT.UINT64: (0, 2**64),
    _VT.INT64: (-(2**63), 2**63),
}


def _int_type(values: list[int], candidates: tuple[Any, ...]) -> Any:
    """The first of `candidates` (GGUF integer value types) whose range holds every value, or None."""
    lo, hi = min(values), max(values)
    return next((t for t in candidates if _INT_RANGES[t][0] <= lo and hi < _INT_RANGES[t][1]), None)


def _value_type(key: str, value: Any) -> tuple[Any, Any, Any]:
    """(value, GGUF value type, array item type) for one metadata value."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return value, _VT.BOOL, None
    if isinstance(value, int):
        vtype = _int_type([value], (_VT.UINT32, _VT.INT32, _VT.UINT64, _VT.INT64))
        if vtype is None:
            raise GGUFError(f"metadata '{key}': {value} does not fit a 64-bit integer")
        return value, vtype, None
    if isinstance(value, float):
        return value, _VT.FLOAT32, None
    if isinstance(value, str):
        return value, _VT.STRING, None
    if isinstance(value, (list, tuple)):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        if not items:
            raise GGUFError(f"metadata '{key}': GGUF cannot store an empty array")
        if all(isinstance(v, str) for v in items):
            return items, _VT.ARRAY, _VT.STRING
        if all(isinstance(v, bool) for v in items):
            return items, _VT.ARRAY, _VT.BOOL
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            item_type = _int_type(items, (_VT.INT32, _VT.INT64))
            if item_type is None:
                raise GGUFError(f"metadata '{key}': an item does not fit a 64-bit signed integer")
            return items, _VT.ARRAY, item_type
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return [float(v) for v in items], _VT.ARRAY, _VT.FLOAT32
        raise GGUFError(f"metadata '{key}': array items must all be str, all bool, or all numbers")
    raise GGUFError(f"metadata '{key}': cannot store a {type(value).__name__} in GGUF")


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, tuple[str, np.ndarray]],
) -> Path:
    """Write a little-endian GGUF v3 file; returns its path.

    `tensors` maps name → (GGML type name, array): a float array for F32/F16 (cast to that type), and for any other
    type the raw uint8 block bytes (rows, bytes per row), as `hyperjax.kernels.quant.to_gguf_blocks` makes them.
    Metadata: str → STRING, bool → BOOL, int → UINT32 (INT32 if negative, 64-bit if large), float → FLOAT32;
    lists of str → STRING array, of ints → INT32 (INT64 if large), of floats → FLOAT32.
    """
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if key == "general.architecture":
            if value != arch:
                raise GGUFError(f"metadata 'general.architecture' is {value!r} but arch is {arch!r}")
            continue
        value, vtype, item_type = _value_type(key, value)
        if key == "general.alignment":
            writer.data_alignment = value
        writer.add_key_value(key, value, vtype, item_type)
    for name, (type_name, array) in tensors.items():
        if type_name not in gguf.GGMLQuantizationType.__members__:
            raise GGUFError(f"tensor '{name}': unknown GGML type {type_name!r}")
        qtype = gguf.GGMLQuantizationType[type_name]
        try:
            if type_name in _FLOAT_DTYPES:
                writer.add_tensor(name, np.ascontiguousarray(array, dtype=_FLOAT_DTYPES[type_name]))
            else:
                raw = np.ascontiguousarray(array)
                if raw.dtype != np.uint8:
                    raise GGUFError(f"tensor '{name}': {type_name} data must be raw uint8 block bytes, got {raw.dtype}")
                writer.add_tensor(name, raw, raw_dtype=qtype)
        except ValueError as exc:
            raise GGUFError(f"tensor '{name}' ({type_name}, shape {np.shape(array)}): {exc}") from exc
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

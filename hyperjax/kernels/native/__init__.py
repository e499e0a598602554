"""Native CPU kernels called from jitted JAX code through jax.ffi: matmul for GGUF block formats (Q4_0, Q4_1,
Q8_0), and one decoding step of attention over a KV cache.

The kernels live in `_qmatmul.so` beside this module (`python -m hyperjax.kernels.native.build` compiles it),
loaded on first use. Nothing here builds or raises at import: when the library is missing or unusable,
`available()` is False and `unavailable_reason()` says why in one line; callers fall back to the pure-JAX
`hyperjax.kernels.quant`.

    w = repack(qt)                  # once, at load time: QuantizedTensor → NativeWeight (numpy, lossless)
    y = native_qmatmul(x, w)        # x (..., cols) → y (..., rows) float32, inside or outside jax.jit
    y = native_qmatmul(x, ws, i)    # ws repacked from a stack (layers, rows, cols): layer i (traced or not)
    o = decode_attention(q, k, v, cache_k, cache_v, i, start)   # one query per sequence, cache read in place

The kernel quantizes x to int8 per 32-block (scale amax/127) and multiplies with integer dot products (AVX-512
VNNI, AVX2 or portable C++, chosen at run time), threaded over row groups on a persistent pool of
$HYPERJAX_NUM_THREADS threads (default: the cores this process may use). Each output differs from
x @ dequantize(qt).T by at most Σ_i |w_i|·scale_i/2 over its row (the activation rounding; Q4_1's minimum
meets the block sum of the rounded x, as in llama.cpp's Q8_1) plus float32 rounding: for Gaussian activations
about 0.5 % of the outputs' scale.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.errors import HyperjaxError, QuantizationError
from hyperjax.kernels.quant import GGUF_GROUP, QuantizedTensor

ABI_VERSION = 4  # must equal kAbiVersion in layout.h
GROUP_ROWS = 16  # rows interleaved in one group of the repacked layout
LIBRARY_GLOB = "_qmatmul*.so"
ISAS = ("scalar", "avx2", "avx512_vnni")
_QUANT_BYTES = {"q4_0": 16, "q4_1": 16, "q8_0": 32}  # per row and 32-weight block
_TARGETS = {kind: f"hyperjax_{kind}_matmul" for kind in _QUANT_BYTES}
_ATTENTION_TARGET = "hyperjax_decode_attention"

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


class NativeKernelError(HyperjaxError):
    """The native kernel library is unavailable, or a native call's arguments do not fit it."""


def library_path() -> Path | None:
    """The compiled library beside this module (a setuptools-built name such as _qmatmul.cpython-*.so too)."""
    found = sorted(Path(__file__).resolve().parent.glob(LIBRARY_GLOB))
    return found[0] if found else None


def load(path: Path | None = None) -> bool:
    """Load the library (default: `library_path()`) and register its FFI targets; returns `available()`.

    Runs by itself on first use; call it again after building. Never raises: failures set the reason.
    XLA keeps the first registration of each target for the process's lifetime, so a second successful load
    (of a rebuilt library) does not replace the kernels already registered.
    """
    global _lib, _reason, _tried
    _tried = True
    if _lib is not None:
        return True
    path = path or library_path()
    if path is None:
        _reason = "native kernel library not built (python -m hyperjax.kernels.native.build)"
        return False
    try:
        lib = ctypes.CDLL(str(path))
        lib.hyperjax_native_abi_version.restype = ctypes.c_int
        if (version := lib.hyperjax_native_abi_version()) != ABI_VERSION:
            _reason = f"{path.name} has ABI version {version}, this module needs {ABI_VERSION}: rebuild it"
            return False
        lib.hyperjax_native_isa.restype = ctypes.c_char_p
        lib.hyperjax_native_set_isa.argtypes = [ctypes.c_char_p]
        lib.hyperjax_native_set_isa.restype = ctypes.c_int
        lib.hyperjax_native_num_threads.restype = ctypes.c_int
        lib.hyperjax_native_set_num_threads.argtypes = [ctypes.c_int]
        lib.hyperjax_native_set_num_threads.restype = None
        for target in (*_TARGETS.values(), _ATTENTION_TARGET):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    except (OSError, AttributeError, RuntimeError, ValueError) as e:
        _reason = f"cannot load {path}: {e}"
        return False
    _lib, _reason = lib, None
    return True


def available() -> bool:
    """True when the native kernels are loaded and registered (loading them on first call)."""
    return _lib is not None or (not _tried and load())


def unavailable_reason() -> str | None:
    """One line saying why the native kernels are unavailable, or None when they are available."""
    available()
    return _reason


def _library() -> ctypes.CDLL:
    if not available():
        raise NativeKernelError(f"native kernels unavailable: {_reason}")
    return _lib


def isa() -> str:
    """The kernel family in use: "avx512_vnni", "avx2" or "scalar"."""
    return _library().hyperjax_native_isa().decode()


def set_isa(name: str) -> None:
    """Force a kernel family (one of ISAS, or "auto": the best this CPU runs); for tests and benchmarks."""
    if not _library().hyperjax_native_set_isa(name.encode()):
        raise NativeKernelError(f"kernel family {name!r} is unknown or needs more than this CPU has: {ISAS}")


def num_threads() -> int:
    """Threads each native call uses."""
    return _library().hyperjax_native_num_threads()


def set_num_threads(n: int | None = None) -> None:
    """Resize the thread pool; None restores the default ($HYPERJAX_NUM_THREADS, else the available cores)."""
    _library().hyperjax_native_set_num_threads(0 if n is None else max(1, int(n)))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class NativeWeight:
    """A weight (rows, cols) repacked for the native kernels; leaves may carry leading stack axes.

    data: uint8 (..., ceil(rows / 16), group_stride(kind, cols)): groups of 16 rows, each a run of blocks
    (quants interleaved 4 bytes per row, then fp16 scales, and mins for q4_1), padded to 64 bytes (layout.h).
    """

    data: jax.Array
    kind: str = field(metadata=dict(static=True))
    rows: int = field(metadata=dict(static=True))
    cols: int = field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def block_bytes(kind: str) -> int:
    """Bytes of one block of a group: 16 rows' quants, fp16 scales, and mins for q4_1."""
    return GROUP_ROWS * (_QUANT_BYTES[kind] + 2 + (2 if kind == "q4_1" else 0))


def group_stride(kind: str, cols: int) -> int:
    """Bytes per 16-row group: its blocks, rounded up to 64."""
    return -(-(cols // GGUF_GROUP) * block_bytes(kind) // 64) * 64


def repacked_nbytes(kind: str, rows: int, cols: int) -> int:
    """Bytes `repack` makes of a (rows, cols) weight: whole 16-row groups of group_stride bytes."""
    return -(-rows // GROUP_ROWS) * group_stride(kind, cols)


def _pad_rows(a: np.ndarray, axis: int, value: int = 0) -> np.ndarray:
    """Pad `axis` (rows) with `value` up to a multiple of GROUP_ROWS."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, -a.shape[axis] % GROUP_ROWS)
    return np.pad(a, pad, constant_values=value)


def _group_quants(quants: np.ndarray, pad_value: int) -> np.ndarray:
    """uint8 (..., rows, blocks, n) → (..., groups, blocks, 16·n): per block, n/4 chunks of 16 rows × 4 B."""
    q = _pad_rows(quants, -3, pad_value)
    *lead, rows, blocks, n = q.shape
    q = q.reshape(*lead, rows // GROUP_ROWS, GROUP_ROWS, blocks, n // 4, 4)
    return np.moveaxis(q, -4, -2).reshape(*lead, rows // GROUP_ROWS, blocks, -1)


def _group_halves(values: np.ndarray) -> np.ndarray:
    """float16 (..., rows, blocks) → uint8 (..., groups, blocks, 16·2): the group's 16 rows per block."""
    v = _pad_rows(np.asarray(values, np.float16), -2)
    *lead, rows, blocks = v.shape
    v = np.swapaxes(v.reshape(*lead, rows // GROUP_ROWS, GROUP_ROWS, blocks), -1, -2)
    return np.ascontiguousarray(v).view(np.uint8).reshape(*lead, rows // GROUP_ROWS, blocks, -1)


def repack(qt: QuantizedTensor) -> NativeWeight:
    """Repack a QuantizedTensor of GGUF blocks (group size 32) into the native layout: lossless, numpy."""
    if qt.group_size != GGUF_GROUP:
        raise QuantizationError(f"native kernels need {GGUF_GROUP}-weight blocks, not {qt.group_size}")
    if np.ndim(qt.packed) < 2:
        raise QuantizationError(f"expected a weight (..., rows, cols), got packed {qt.packed.shape}")
    rows, cols = qt.shape
    packed = np.asarray(qt.packed).view(np.uint8)
    quants = packed.reshape(*packed.shape[:-1], cols // GGUF_GROUP, _QUANT_BYTES[qt.kind])
    if qt.kind == "q8_0":
        quants = quants ^ np.uint8(0x80)  # q + 128: unsigned bytes for the u8 × s8 dot product
    parts = [_group_quants(quants, 0x80 if qt.kind == "q8_0" else 0), _group_halves(qt.scales)]
    if qt.kind == "q4_1":
        parts.append(_group_halves(qt.mins))
    blocks = np.concatenate(parts, axis=-1)
    data = blocks.reshape(*blocks.shape[:-2], -1)
    pad = [(0, 0)] * (data.ndim - 1) + [(0, group_stride(qt.kind, cols) - data.shape[-1])]
    return NativeWeight(np.pad(data, pad), qt.kind, rows, cols)


def unpack_rows(w: NativeWeight, ids: jax.Array) -> QuantizedTensor:
    """Rows `ids` (int (n,)) of a 2-D native weight as GGUF blocks: the inverse of `repack`, pure JAX, jit-able.

    Reads only the 16-row groups holding those rows (an embedding lookup on a tied output head needs no second,
    unpacked copy of the table). Out-of-range ids are clamped, as jitted indexing is.
    """
    if w.data.ndim != 2:
        raise NativeKernelError(f"unpack_rows needs a 2-D weight, got data of shape {w.data.shape}")
    ids = jnp.clip(jnp.asarray(ids, jnp.int32), 0, w.rows - 1)
    qbytes, blocks = _QUANT_BYTES[w.kind], w.cols // GGUF_GROUP
    rows_in_group = (ids % GROUP_ROWS)[:, None, None, None]
    group = w.data[ids // GROUP_ROWS, : blocks * block_bytes(w.kind)].reshape(len(ids), blocks, -1)

    def row_run(start: int, width: int) -> jax.Array:
        """Bytes [start, start + 16·width) of each block, as (n, blocks, width // 4, 4): the chosen row's run."""
        run = group[..., start : start + GROUP_ROWS * width].reshape(len(ids), blocks, -1, GROUP_ROWS, 4)
        return jnp.take_along_axis(run, rows_in_group[..., None], axis=3)[..., 0, :]

    def halves(start: int) -> jax.Array:
        run = group[..., start : start + 2 * GROUP_ROWS].reshape(len(ids), blocks, GROUP_ROWS, 2)
        pair = jnp.take_along_axis(run, rows_in_group, axis=2)[..., 0, :]
        return jax.lax.bitcast_convert_type(pair, jnp.float16)

    quants = row_run(0, qbytes).reshape(len(ids), -1)
    scales = halves(GROUP_ROWS * qbytes)
    mins = halves(GROUP_ROWS * (qbytes + 2)) if w.kind == "q4_1" else None
    if w.kind == "q8_0":
        quants = jax.lax.bitcast_convert_type(quants ^ jnp.uint8(0x80), jnp.int8)
    return QuantizedTensor(quants, scales, mins, w.kind, GGUF_GROUP)


def native_qmatmul(x: jax.Array, w: NativeWeight, layer: int | jax.Array | None = None) -> jax.Array:
    """x (..., cols) float → (..., rows) float32 ≈ x @ W.T, through the native kernel (jit-able).

    w: one matrix (data 2-D), or a stack of them (data (layers, groups, stride)) with `layer` an int32 scalar,
    traced or not, choosing one. Inside `lax.scan`, pass the stack and the layer index rather than scanning
    over the weights: XLA copies a sliced operand before a custom call (a second pass over the weights).
    """
    _library()
    if w.data.ndim not in (2, 3) or (w.data.ndim == 3) != (layer is not None):
        raise NativeKernelError(
            f"native_qmatmul takes a 2-D weight, or a 3-D stack with a layer index; got data of shape "
            f"{w.data.shape} and layer {layer!r}"
        )
    if x.ndim == 0 or x.shape[-1] != w.cols:
        raise NativeKernelError(f"activation shape {tuple(x.shape)} does not end in {w.cols} columns")
    return _ffi_matmul(x, w.data, 0 if layer is None else layer, w.kind, w.rows)


@partial(jax.jit, static_argnames=("kind", "rows"))
def _ffi_matmul(x: jax.Array, data: jax.Array, layer: jax.Array, kind: str, rows: int) -> jax.Array:
    """Flatten the batch axes and call the FFI target (jitted, so that the reshapes are never copies)."""
    x2 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    stack = data.reshape(-1, *data.shape[-2:])
    call = jax.ffi.ffi_call(
        _TARGETS[kind], jax.ShapeDtypeStruct((x2.shape[0], rows), jnp.float32), vmap_method="sequential"
    )
    y = call(x2, stack, jnp.asarray(layer, jnp.int32), rows=np.int64(rows))
    return y.reshape(*x.shape[:-1], rows)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache_keys: jax.Array,
    cache_values: jax.Array,
    layer: int | jax.Array,
    start: int | jax.Array,
) -> jax.Array:
    """One decoding step of causal grouped-query attention (jit-able): float32 (B, 1, H, D).

    q (B, 1, H, D) this token's queries; k, v (B, 1, K, D) its key and value; cache_keys/cache_values
    (L, B, S, K, D) float32 the cache before this token, of which layer `layer`'s first `start` slots are valid.
    The query sees those slots and its own key. Only the valid slots are read, in place (no copy of the cache).
    """
    _library()
    b, t, h, d = q.shape
    if t != 1 or cache_keys.ndim != 5 or k.shape != (b, 1, cache_keys.shape[3], d):
        raise NativeKernelError(
            f"decode_attention takes q (B, 1, H, D), k/v (B, 1, K, D) and a cache (L, B, S, K, D); got q {q.shape}, "
            f"k {k.shape}, cache {cache_keys.shape}"
        )
    call = jax.ffi.ffi_call(_ATTENTION_TARGET, jax.ShapeDtypeStruct((b, h, d), jnp.float32), vmap_method="sequential")
    out = call(
        q.reshape(b, h, d).astype(jnp.float32),
        k.reshape(b, -1, d).astype(jnp.float32),
        v.reshape(b, -1, d).astype(jnp.float32),
        cache_keys.astype(jnp.float32),
        cache_values.astype(jnp.float32),
        jnp.asarray(layer, jnp.int32),
        jnp.asarray(start, jnp.int32),
    )
    return out.reshape(b, 1, h, d)

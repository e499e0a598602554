"""Block-quantized weights in GGUF's formats (Q4_0, Q4_1, Q8_0): quantize, pack, dequantize, matmul.

A weight W (rows, cols) is cut into blocks of `group_size` consecutive weights along cols, the reduction axis of
y = x @ W.T. Each block stores an fp16 scale d (and, for Q4_1, an fp16 minimum m):

    q4_0: w = (q − 8)·d,  q ∈ 0..15      q4_1: w = q·d + m,  q ∈ 0..15      q8_0: w = q·d,  q ∈ −127..127

4-bit weights are packed two per byte in GGUF's order: inside a block of G weights, byte j (0 ≤ j < G/2) holds
weight j in its low nibble and weight j + G/2 in its high nibble. With G = 32 the packed bytes are exactly a GGUF
block's `qs` run, so a GGUF tensor loads by slicing its bytes, and dequantization is bit-exact with `gguf.quants`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.errors import QuantizationError

KINDS = ("q4_0", "q4_1", "q8_0")
GROUP_SIZES = (32, 64, 128)
GGUF_GROUP = 32
# GGUF block layout: bytes of (d, m) header and of the quant run, per 32 weights.
_GGUF_HEADER_BYTES = {"q4_0": 2, "q4_1": 4, "q8_0": 2}
_GGUF_QS_BYTES = {"q4_0": 16, "q4_1": 16, "q8_0": 32}
# From this many activation rows on, dequantize-then-dot (a fast GEMM) beats the per-block reduction.
_GEMM_MIN_ROWS = 16


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D weight (rows, cols) in blocks of `group_size` along cols; leaves may carry leading stack axes.

    packed: uint8 (..., rows, cols // 2) for q4_0/q4_1, int8 (..., rows, cols) for q8_0.
    scales: float16 (..., rows, cols // group_size).  mins: float16 like scales for q4_1, else None.
    """

    packed: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    kind: str = field(metadata=dict(static=True))
    group_size: int = field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.packed.shape[-2:]
        return rows, width if self.kind == "q8_0" else 2 * width

    @property
    def nbytes(self) -> int:
        """Exact bytes held: packed quants, scales and minimums (every stacked layer included)."""
        return sum(int(leaf.nbytes) for leaf in (self.packed, self.scales, self.mins) if leaf is not None)


def _check_kind(kind: str, group_size: int) -> None:
    if kind not in KINDS:
        raise QuantizationError(f"unknown block format {kind!r}; supported: {', '.join(KINDS)}")
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"group size {group_size} not supported; choose one of {GROUP_SIZES}")


def _unpack_nibbles(packed: jax.Array, group_size: int) -> jax.Array:
    """uint8 (..., rows, cols // 2) → uint8 quants (..., rows, cols // G, G) in weight order."""
    blocks = packed.reshape(*packed.shape[:-1], -1, group_size // 2)
    return jnp.concatenate([blocks & 0x0F, blocks >> 4], axis=-1)


def _block_values(qt: QuantizedTensor) -> jax.Array:
    """Integer-valued float32 quants (..., rows, nblocks, G), offset removed for q4_0."""
    if qt.kind == "q8_0":
        return qt.packed.reshape(*qt.packed.shape[:-1], -1, qt.group_size).astype(jnp.float32)
    q = _unpack_nibbles(qt.packed, qt.group_size)
    if qt.kind == "q4_0":
        return q.astype(jnp.int8).astype(jnp.float32) - 8.0
    return q.astype(jnp.float32)


def dequantize(qt: QuantizedTensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Float weights (..., rows, cols), computed as gguf.quants does: fp16 scale → fp32, then q·d (+ m)."""
    d = qt.scales.astype(jnp.float32)[..., None]
    w = _block_values(qt) * d
    if qt.kind == "q4_1":
        w = w + qt.mins.astype(jnp.float32)[..., None]
    return w.reshape(*w.shape[:-2], -1).astype(dtype)


def take_rows(qt: QuantizedTensor, ids: jax.Array) -> jax.Array:
    """float32 (len(ids), cols): the selected rows dequantized (an embedding lookup), not the whole table."""
    mins = None if qt.mins is None else qt.mins[ids]
    return dequantize(QuantizedTensor(qt.packed[ids], qt.scales[ids], mins, qt.kind, qt.group_size))


def qmatmul(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """x (..., cols) float → (..., rows) float32, equal to x @ dequantize(qt).T.

    4-bit, few activation rows (decode): per-block dot products against the integer-valued quants, then
    y = Σ_b d_b·(q·x)_b (+ m_b·Σ_b x for q4_1), about 2× XLA's float32 matvec. Many rows (prefill), and Q8_0 at any
    batch: dequantize-then-dot, which XLA:CPU fuses into its matvec for Q8_0 (no float matrix is written) and turns
    into a fast GEMM for prefill.
    """
    rows, cols = qt.shape
    if x.shape[-1] != cols:
        raise QuantizationError(f"activation width {x.shape[-1]} does not match weight columns {cols}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols).astype(jnp.float32)
    if x2.shape[0] >= _GEMM_MIN_ROWS or qt.kind == "q8_0":
        y = x2 @ dequantize(qt).T
    else:
        xb = x2.reshape(x2.shape[0], cols // qt.group_size, qt.group_size)
        partial = jnp.einsum("bnj,rnj->brn", xb, _block_values(qt))
        y = jnp.einsum("brn,rn->br", partial, qt.scales.astype(jnp.float32))
        if qt.kind == "q4_1":
            y = y + jnp.einsum("bn,rn->br", xb.sum(-1), qt.mins.astype(jnp.float32))
    return y.reshape(*lead, rows)


def _round_blocks(blocks: jax.Array, kind: str, inv_scale: jax.Array, low: jax.Array) -> jax.Array:
    """Integer quants of blocks (..., G) for a given 1/d (and minimum, q4_1), as llama.cpp rounds them."""
    if kind == "q4_0":
        return jnp.clip(jnp.trunc(blocks * inv_scale + 8.5), 0, 15)
    if kind == "q4_1":
        return jnp.clip(jnp.trunc((blocks - low) * inv_scale + 0.5), 0, 15)
    return jnp.clip(jnp.round(blocks * inv_scale), -127, 127)


def _rtn_params(blocks: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(d, m) of round-to-nearest: q4_0 d = signed extreme / −8, q4_1 d = (max − min)/15, q8_0 d = amax/127."""
    if kind == "q4_0":
        idx = jnp.argmax(jnp.abs(blocks), axis=-1, keepdims=True)
        extreme = jnp.take_along_axis(blocks, idx, axis=-1)[..., 0]
        return extreme / -8.0, jnp.zeros_like(extreme)
    if kind == "q4_1":
        low, high = blocks.min(-1), blocks.max(-1)
        return (high - low) / 15.0, low
    return jnp.abs(blocks).max(-1) / 127.0, jnp.zeros(blocks.shape[:-1], blocks.dtype)


def _inverse(d: jax.Array) -> jax.Array:
    return jnp.where(d != 0, 1.0 / jnp.where(d != 0, d, 1.0), 0.0)


def _encode(blocks: jax.Array, kind: str, d: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quants for (d, m) and the fp16-stored (d, m) actually used at dequantization."""
    q = _round_blocks(blocks, kind, _inverse(d)[..., None], m[..., None])
    return q, d.astype(jnp.float16), m.astype(jnp.float16)


def _reconstruct(q: jax.Array, kind: str, d16: jax.Array, m16: jax.Array) -> jax.Array:
    d, m = d16.astype(jnp.float32)[..., None], m16.astype(jnp.float32)[..., None]
    if kind == "q4_0":
        return (q - 8.0) * d
    return q * d + m if kind == "q4_1" else q * d


def _refit(blocks: jax.Array, q: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """Least-squares (d, m) for fixed quants: minimises Σ (w − ŵ)² over each block."""
    if kind == "q4_1":
        n = blocks.shape[-1]
        sq, sw = q.sum(-1), blocks.sum(-1)
        sqq, sqw = (q * q).sum(-1), (q * blocks).sum(-1)
        det = n * sqq - sq * sq
        safe = jnp.where(det != 0, det, 1.0)
        d = jnp.where(det != 0, (n * sqw - sq * sw) / safe, 0.0)
        m = jnp.where(det != 0, (sqq * sw - sq * sqw) / safe, sw / n)
        return d, m
    centred = q - 8.0 if kind == "q4_0" else q
    norm = (centred * centred).sum(-1)
    d = jnp.where(norm != 0, (centred * blocks).sum(-1) / jnp.where(norm != 0, norm, 1.0), 0.0)
    return d, jnp.zeros_like(d)


def _squared_error(blocks: jax.Array, encoded: tuple[jax.Array, jax.Array, jax.Array], kind: str) -> jax.Array:
    q, d16, m16 = encoded
    return jnp.sum((blocks - _reconstruct(q, kind, d16, m16)) ** 2, axis=-1)


def _search(blocks: jax.Array, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best of RTN and a grid of rescaled RTN scales, each refit by least squares; chosen by stored error."""
    d0, m0 = _rtn_params(blocks, kind)
    best = _encode(blocks, kind, d0, m0)
    best_err = _squared_error(blocks, best, kind)
    for factor in np.linspace(0.8, 1.2, 17):
        q, _, _ = _encode(blocks, kind, d0 * float(factor), m0)
        candidate = _encode(blocks, kind, *_refit(blocks, q, kind))
        err = _squared_error(blocks, candidate, kind)
        better = err < best_err
        q_best = jnp.where(better[..., None], candidate[0], best[0])
        best = (q_best, jnp.where(better, candidate[1], best[1]), jnp.where(better, candidate[2], best[2]))
        best_err = jnp.minimum(err, best_err)
    return best


def quantize(w: jax.Array, kind: str, group_size: int = GGUF_GROUP, method: str = "rtn") -> QuantizedTensor:
    """Quantize float weights (rows, cols) block-wise.

    method "rtn": round to nearest with llama.cpp's reference scales. "search": per block, a grid of scales around
    the RTN one, each refit by least squares, keeping whichever has the least squared error after fp16 storage
    (never worse than "rtn").
    """
    _check_kind(kind, group_size)
    if method not in ("rtn", "search"):
        raise QuantizationError(f"unknown quantization method {method!r}; use 'rtn' or 'search'")
    if w.ndim != 2:
        raise QuantizationError(f"expected a 2-D weight (rows, cols), got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % group_size:
        raise QuantizationError(f"{cols} columns are not a multiple of the group size {group_size}")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise QuantizationError("weights contain NaN or infinity; refusing to quantize")
    blocks = jnp.asarray(w, jnp.float32).reshape(rows, cols // group_size, group_size)
    if method == "rtn":
        q, d16, m16 = _encode(blocks, kind, *_rtn_params(blocks, kind))
    else:
        q, d16, m16 = _search(blocks, kind)
    if kind == "q8_0":
        packed = q.astype(jnp.int8).reshape(rows, cols)
    else:
        q = q.astype(jnp.uint8)
        half = group_size // 2
        packed = (q[..., :half] | (q[..., half:] << 4)).reshape(rows, cols // 2)
    return QuantizedTensor(packed, d16, m16 if kind == "q4_1" else None, kind, group_size)


def from_gguf_blocks(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedTensor:
    """Split a GGUF tensor's raw block bytes (uint8, row-major) into a QuantizedTensor of `shape`, losslessly.

    The result holds numpy arrays (copies of the relevant bytes); `jax.device_put` or `jnp.asarray` moves them.
    """
    if kind not in KINDS:
        raise QuantizationError(f"unknown block format {kind!r}; supported: {', '.join(KINDS)}")
    if len(shape) != 2:
        raise QuantizationError(f"expected a 2-D shape (rows, cols), got {tuple(shape)}")
    rows, cols = shape
    if cols % GGUF_GROUP:
        raise QuantizationError(f"{cols} columns are not a multiple of GGUF's block size {GGUF_GROUP}")
    header, qs = _GGUF_HEADER_BYTES[kind], _GGUF_QS_BYTES[kind]
    nblocks = cols // GGUF_GROUP
    expected = rows * nblocks * (header + qs)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != expected:
        raise QuantizationError(
            f"{kind} tensor of shape {shape} needs {expected} bytes of uint8 blocks, got {raw.size} of {raw.dtype}"
        )
    blocks = raw.reshape(rows, nblocks, header + qs)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if kind == "q4_1" else None
    packed = np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1)
    if kind == "q8_0":
        packed = packed.view(np.int8)
    return QuantizedTensor(packed, scales, mins, kind, GGUF_GROUP)


def to_gguf_blocks(qt: QuantizedTensor) -> np.ndarray:
    """The GGUF block bytes (uint8, rows × bytes per row) of a 2-D QuantizedTensor with group size 32."""
    if qt.group_size != GGUF_GROUP:
        raise QuantizationError(f"GGUF blocks hold {GGUF_GROUP} weights; this tensor uses {qt.group_size}")
    rows, _ = qt.shape
    parts = [np.asarray(qt.scales, np.float16)[..., None].view(np.uint8)]
    if qt.kind == "q4_1":
        parts.append(np.asarray(qt.mins, np.float16)[..., None].view(np.uint8))
    nblocks = parts[0].shape[1]
    parts.append(np.asarray(qt.packed).view(np.uint8).reshape(rows, nblocks, -1))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)

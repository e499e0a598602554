"""Block-quantized weights in GGUF's formats (Q4_0, Q4_1, Q8_0): quantize, pack, dequantize, matmul.

A weight W (rows, cols) is cut into blocks of `group_size` consecutive weights along cols, the reduction axis of
y = x @ W.T. Each block stores an fp16 scale d (and, for Q4_1, an fp16 minimum m):

    q4_0: w = (q − 8)·d,  q ∈ 0..15      q4_1: w = q·d + m,  q ∈ 0..15      q8_0: w = q·d,  q ∈ −127..127

4-bit weights are packed two per byte in GGUF's order: inside a block of G weights, byte j (0 ≤ j < G/2) holds
weight j in its low nibble and weight j + G/2 in its high nibble. With G = 32 the packed bytes are exactly a GGUF
block's `qs` run, so a GGUF tensor loads by slicing its bytes, and dequantization is bit-exact with `gguf.quants`:
q·d is exact in float32 (at most 4 or 8 bits times fp16's 11), so no operation order or fused multiply-add can
change the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.errors import QuantizationError

KINDS = ("q4_0", "q4_1", "q8_0")
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "search")
GGUF_GROUP = 32
# GGUF block layout: bytes of the (d, m) header and of the quant run, per 32 weights.
_GGUF_HEADER_BYTES = {"q4_0": 2, "q4_1": 4, "q8_0": 2}
_GGUF_QS_BYTES = {"q4_0": 16, "q4_1": 16, "q8_0": 32}
# Largest |quant| that multiplies d, and the round-to-nearest error in units of |d|: Q4_0 maps the block's signed
# extreme to −8, so values near the opposite extreme (up to +8) are clamped to +7, a full step.
_QMAX = {"q4_0": 8, "q4_1": 15, "q8_0": 127}
_RTN_STEP = {"q4_0": 1.0, "q4_1": 0.5, "q8_0": 0.5}
MATMULS = ("dot", "reduce")
REDUCE_MAX_ROWS = 4  # matmul="reduce" up to this many activation rows; more keep the dot


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D weight (rows, cols) in blocks of `group_size` along cols; leaves may carry leading stack axes.

    packed: uint8 (..., rows, cols // 2) for q4_0/q4_1, int8 (..., rows, cols) for q8_0.
    scales: float16 (..., rows, cols // group_size).  mins: float16 like scales for q4_1, else None.
    matmul: how `qmatmul` is formulated, "dot" (default; fast on XLA:CPU) or "reduce" (products of up to
    `REDUCE_MAX_ROWS` activation rows by `_block_reduce`, for compilers such as IREE that would otherwise write a
    float copy of the weight). Static, so a change is a new trace, never a stale cached one.
    """

    packed: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    kind: str = field(metadata=dict(static=True))
    group_size: int = field(metadata=dict(static=True))
    matmul: str = field(default="dot", metadata=dict(static=True))

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
    """float32 (*ids.shape, cols): rows `ids` dequantized (an embedding lookup), never the whole table.

    Out-of-range ids follow JAX's gather semantics (clamped), as any jitted indexing does.
    """
    if qt.packed.ndim != 2:
        raise QuantizationError(f"take_rows needs a 2-D table, got packed leaves of shape {qt.packed.shape}")
    mins = None if qt.mins is None else qt.mins[ids]
    return dequantize(QuantizedTensor(qt.packed[ids], qt.scales[ids], mins, qt.kind, qt.group_size))


def _nibble_dots(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """x (b, cols) → (b, rows) float32 for q4_0/q4_1, as two half-width dots, one per nibble of the packed bytes.

    Low nibbles are weights 0..G/2−1 of each block and high nibbles weights G/2..G−1, so each half is a
    (rows, cols/2) matrix q·d + m indexed exactly like `packed` (a cheap elementwise pass, no interleaving), met by
    the matching half of x in a dot that contracts both operands along their minor axis (no transpose).
    """
    rows, _ = qt.shape
    half = qt.group_size // 2
    blocks = qt.packed.reshape(rows, -1, half)
    d = qt.scales.astype(jnp.float32)[..., None]
    m = qt.mins.astype(jnp.float32)[..., None] if qt.kind == "q4_1" else -8.0 * d
    xb = x.reshape(x.shape[0], -1, 2, half)
    low, high = (
        jax.lax.dot_general(
            xb[:, :, i].reshape(x.shape[0], -1),
            (nibbles.astype(jnp.float32) * d + m).reshape(rows, -1),
            (((1,), (1,)), ((), ())),
        )
        for i, nibbles in enumerate((blocks & 0x0F, blocks >> 4))
    )
    return low + high


def _block_reduce(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """x (b, cols) → (b, rows) float32 as one multiply-reduce over each row's blocks, scales applied per block.

    The weights enter only through an integer-to-float conversion inside the reduction (for Q4_1 the minimum
    meets the block sum of x), so a compiler that fuses elementwise producers into reductions, as IREE does,
    never writes a float copy of the matrix.
    """
    rows, _ = qt.shape
    d = qt.scales.astype(jnp.float32)
    if qt.kind == "q8_0":
        q = qt.packed.reshape(rows, -1, qt.group_size).astype(jnp.float32)
        xb = x.reshape(x.shape[0], 1, -1, qt.group_size)
        return jnp.sum(xb * q * d[..., None], axis=(-2, -1))
    half = qt.group_size // 2
    blocks = qt.packed.reshape(rows, -1, half)
    xb = x.reshape(x.shape[0], 1, -1, 2, half)
    q_lo, q_hi = (blocks & 0x0F).astype(jnp.float32), (blocks >> 4).astype(jnp.float32)
    y = jnp.sum((xb[..., 0, :] * q_lo + xb[..., 1, :] * q_hi) * d[..., None], axis=(-2, -1))
    block_sums = jnp.sum(xb, axis=(-2, -1))  # (b, 1, nblocks)
    m = qt.mins.astype(jnp.float32) if qt.kind == "q4_1" else -8.0 * d
    return y + jnp.sum(block_sums * m, axis=-1)


def qmatmul(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """x (..., cols) float → (..., rows) float32, equal to x @ dequantize(qt).T up to float32 summation order.

    Q4_0/Q4_1: `_nibble_dots` (on 2 cores about 2× XLA's float32 matvec at batch 1, 1.1–2× at batch 8–256).
    Q8_0: dequantize-then-dot, which XLA:CPU fuses into its matvec (about 1.1× float32 at batch 1, no float matrix
    written) and turns into a GEMM for prefill. With `qt.matmul == "reduce"`, up to `REDUCE_MAX_ROWS` rows use
    `_block_reduce`; more keep the dot, whose one dequantization serves every row.
    """
    if qt.packed.ndim != 2:
        raise QuantizationError(f"qmatmul needs a 2-D weight, got packed leaves of shape {qt.packed.shape}")
    rows, cols = qt.shape
    if x.ndim == 0 or x.shape[-1] != cols:
        raise QuantizationError(f"activation shape {tuple(x.shape)} does not end in the weight's {cols} columns")
    x2 = x.reshape(-1, cols).astype(jnp.float32)
    if qt.matmul not in MATMULS:
        raise QuantizationError(f"unknown matmul formulation {qt.matmul!r}; choose one of {', '.join(MATMULS)}")
    if qt.matmul == "reduce" and x2.shape[0] <= REDUCE_MAX_ROWS:
        y = _block_reduce(x2, qt)
    else:
        y = x2 @ dequantize(qt).T if qt.kind == "q8_0" else _nibble_dots(x2, qt)
    return y.reshape(*x.shape[:-1], rows)


def quant_error_bound(qt: QuantizedTensor) -> jax.Array:
    """float32 (..., rows, cols // G): per block, a bound on |w − ŵ| when qt = quantize(w, method="rtn").

    Rounding to the nearest quant costs |d|/2 (a full |d| for q4_0, whose clamp at +7 can cost one step), and
    storing d (and m) in fp16 moves each weight by at most qmax·|Δd| (+ |Δm|), with |Δ| ≤ 2^-11·|value| for normal
    fp16 numbers and 2^-25 for subnormal ones. The bound doubles those fp16 terms to cover float32 arithmetic.
    """
    d = jnp.abs(qt.scales.astype(jnp.float32))
    bound = _RTN_STEP[qt.kind] * d + _QMAX[qt.kind] * (2.0**-10 * d + 2.0**-24)
    if qt.kind == "q4_1":
        bound = bound + 2.0**-10 * jnp.abs(qt.mins.astype(jnp.float32)) + 2.0**-24
    return bound


def _roundf(v: jax.Array) -> jax.Array:
    """C's roundf (halves away from zero), exactly: |v| = f + frac with f = floor(|v|), and 2·frac is exact."""
    a = jnp.abs(v)
    whole = jnp.floor(a)
    return jnp.copysign(whole + jnp.floor(2.0 * (a - whole)), v)


def _round_blocks(blocks: jax.Array, kind: str, inv_scale: jax.Array, low: jax.Array) -> jax.Array:
    """Integer-valued float quants of blocks (..., G) for a given 1/d (and minimum, q4_1), as llama.cpp rounds."""
    if kind == "q4_0":
        return jnp.clip(jnp.trunc(blocks * inv_scale + 8.5), 0, 15)
    if kind == "q4_1":
        return jnp.clip(jnp.trunc((blocks - low) * inv_scale + 0.5), 0, 15)
    return jnp.clip(_roundf(blocks * inv_scale), -127, 127)


def _rtn_params(blocks: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(d, m) of round-to-nearest: q4_0 d = signed extreme / −8, q4_1 d = (max − min)/15, q8_0 d = amax/127."""
    if kind == "q4_0":
        first = jnp.argmax(jnp.abs(blocks), axis=-1, keepdims=True)  # the first of equal magnitudes, as llama.cpp
        extreme = jnp.where(jnp.arange(blocks.shape[-1]) == first, blocks, 0.0).sum(-1)
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
    rtn = _encode(blocks, kind, d0, m0)

    def step(carry, factor):
        best, best_err = carry
        q, _, _ = _encode(blocks, kind, d0 * factor, m0)
        candidate = _encode(blocks, kind, *_refit(blocks, q, kind))
        err = _squared_error(blocks, candidate, kind)
        better = err < best_err
        (q_new, d_new, m_new), (q_old, d_old, m_old) = candidate, best
        chosen = (
            jnp.where(better[..., None], q_new, q_old),
            jnp.where(better, d_new, d_old),
            jnp.where(better, m_new, m_old),
        )
        return (chosen, jnp.minimum(err, best_err)), None

    factors = jnp.linspace(0.8, 1.2, 17, dtype=jnp.float32)
    (best, _), _ = jax.lax.scan(step, (rtn, _squared_error(blocks, rtn, kind)), factors)
    return best


@partial(jax.jit, static_argnames=("kind", "group_size", "method"))
def _quantize_blocks(w: jax.Array, kind: str, group_size: int, method: str) -> QuantizedTensor:
    """The numeric part of `quantize`, one compiled program per (shape, kind, group size, method)."""
    rows, cols = w.shape
    blocks = w.astype(jnp.float32).reshape(rows, cols // group_size, group_size)
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


def quantize(w: jax.Array, kind: str, group_size: int = GGUF_GROUP, method: str = "rtn") -> QuantizedTensor:
    """Quantize float weights (rows, cols) block-wise; jit-able (values are checked only when concrete).

    method "rtn": round to nearest with llama.cpp's reference formulas (the same scales and rounding as
    `gguf.quants.quantize`; XLA computes x/15 as x·(1/15) and fuses multiply-adds, so a value lying on a
    rounding boundary can land one quant or one fp16 ulp of d away from the reference). "search": per block, a grid
    of scales around the RTN one, each refit by least squares, keeping whichever has the least squared error after
    fp16 storage (never worse than "rtn").
    """
    _check_kind(kind, group_size)
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; use one of {METHODS}")
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise QuantizationError(f"expected a 2-D weight (rows, cols), got shape {tuple(w.shape)}")
    if w.shape[1] % group_size:
        raise QuantizationError(f"{w.shape[1]} columns are not a multiple of the group size {group_size}")
    concrete = not isinstance(w, jax.core.Tracer)
    if concrete and not bool(jnp.all(jnp.isfinite(w))):
        raise QuantizationError(f"{kind}: weights of shape {tuple(w.shape)} contain NaN or infinity")
    qt = _quantize_blocks(w, kind, group_size, method)
    stored = qt.scales if qt.mins is None else jnp.stack([qt.scales, qt.mins])
    if concrete and not bool(jnp.all(jnp.isfinite(stored))):
        raise QuantizationError(
            f"{kind}: block scales overflow float16 (largest |w| = {float(jnp.abs(w).max()):.6g} is too large)"
        )
    return qt


def from_gguf_blocks(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedTensor:
    """Split a GGUF tensor's raw block bytes (uint8, row-major, any shape) into a QuantizedTensor, losslessly.

    The result holds numpy arrays (copies of the relevant bytes); `jax.device_put` or `jnp.asarray` moves them.
    """
    if kind not in KINDS:
        raise QuantizationError(f"unknown block format {kind!r}; supported: {', '.join(KINDS)}")
    if len(shape) != 2 or min(shape) < 0:
        raise QuantizationError(f"expected a 2-D shape (rows, cols), got {tuple(shape)}")
    rows, cols = shape
    if cols % GGUF_GROUP:
        raise QuantizationError(f"{kind}: {cols} columns are not a multiple of GGUF's block size {GGUF_GROUP}")
    header, qs = _GGUF_HEADER_BYTES[kind], _GGUF_QS_BYTES[kind]
    nblocks = cols // GGUF_GROUP
    expected = rows * nblocks * (header + qs)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != expected:
        raise QuantizationError(
            f"{kind} tensor of shape {tuple(shape)} needs {expected} bytes of uint8 blocks, "
            f"got {raw.size} of {raw.dtype}"
        )
    blocks = raw.reshape(rows, nblocks, header + qs)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if kind == "q4_1" else None
    packed = np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1)
    if kind == "q8_0":
        packed = packed.view(np.int8)
    return QuantizedTensor(packed, scales, mins, kind, GGUF_GROUP)


def to_gguf_blocks(qt: QuantizedTensor) -> np.ndarray:
    """The GGUF block bytes (uint8, (rows, bytes per row)) of a 2-D QuantizedTensor with group size 32."""
    if qt.group_size != GGUF_GROUP:
        raise QuantizationError(f"GGUF blocks hold {GGUF_GROUP} weights; this tensor uses {qt.group_size}")
    if np.ndim(qt.packed) != 2:
        raise QuantizationError(f"to_gguf_blocks needs a 2-D tensor, got packed leaves of shape {qt.packed.shape}")
    rows, cols = qt.shape
    nblocks = cols // GGUF_GROUP
    parts = [np.asarray(qt.scales, np.float16).reshape(rows, nblocks, 1).view(np.uint8)]
    if qt.kind == "q4_1":
        parts.append(np.asarray(qt.mins, np.float16).reshape(rows, nblocks, 1).view(np.uint8))
    parts.append(np.asarray(qt.packed).view(np.uint8).reshape(rows, nblocks, -1))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)

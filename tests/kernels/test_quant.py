"""Block formats: error bounds, GGUF bit-exactness, nibble order, matmul, row lookup, jit, named errors."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperjax.errors import QuantizationError
from hyperjax.kernels.quant import (
    GROUP_SIZES,
    KINDS,
    REDUCE_MAX_ROWS,
    QuantizedTensor,
    dequantize,
    from_gguf_blocks,
    qmatmul,
    quant_error_bound,
    quantize,
    take_rows,
    to_gguf_blocks,
)

GGML = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
FAST = settings(max_examples=30, deadline=None)


def _weights(seed: int, rows: int, cols: int, log_scale: float = 0.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 10.0**log_scale + offset).astype(np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _random_blocks(seed: int, kind: str, rows: int, cols: int) -> np.ndarray:
    """Random GGUF block bytes whose fp16 header fields (d, and m for q4_1) are finite, subnormals included."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // 32, BLOCK_BYTES[kind]), dtype=np.uint8)
    for start in (0, 2) if kind == "q4_1" else (0,):
        field = blocks[:, start : start + 2].copy().view(np.uint16)
        non_finite = (field & 0x7C00) == 0x7C00
        blocks[:, start : start + 2] = np.where(non_finite, field & 0xBFFF, field).astype(np.uint16).view(np.uint8)
    return blocks.reshape(rows, -1)


# Shapes stay fixed per group size (3 rows, 2 blocks) so that eager ops compile once; values vary.
weights_cases = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from(GROUP_SIZES),
    st.floats(-6.0, 3.0),
    st.sampled_from([0.0, 0.5, -20.0]),
    st.integers(0, 2**31),
)


@FAST
@given(weights_cases)
def test_rtn_error_within_bound(case):
    kind, group, log_scale, offset, seed = case
    w = _weights(seed, 3, 2 * group, log_scale, offset * 10.0**log_scale)
    qt = quantize(w, kind, group)
    err = np.abs(np.asarray(dequantize(qt), np.float64) - w).reshape(3, 2, group).max(-1)
    assert np.all(err <= np.asarray(quant_error_bound(qt)))


@pytest.mark.parametrize("kind", KINDS)
def test_error_bound_is_nearly_attained(kind):
    """The bound is not vacuous: on Gaussian weights some block comes close to it."""
    w = _weights(0, 64, 256)
    qt = quantize(w, kind)
    err = np.abs(np.asarray(dequantize(qt)) - w).reshape(64, 8, 32).max(-1)
    ratio = err / np.asarray(quant_error_bound(qt))
    assert ratio.max() > (0.45 if kind == "q4_0" else 0.8)


@settings(max_examples=25, deadline=None)
@given(weights_cases)
def test_search_never_worse_than_rtn(case):
    kind, group, log_scale, offset, seed = case
    w = _weights(seed, 3, 2 * group, log_scale, offset * 10.0**log_scale)
    sse = {
        m: np.sum((np.asarray(dequantize(quantize(w, kind, group, m)), np.float64) - w) ** 2) for m in ("rtn", "search")
    }
    assert sse["search"] <= sse["rtn"] * (1 + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_search_improves_gaussian_weights(kind):
    w = _weights(1, 64, 256)
    sse = {m: float(np.sum((np.asarray(dequantize(quantize(w, kind, 32, m))) - w) ** 2)) for m in ("rtn", "search")}
    assert sse["search"] < 0.95 * sse["rtn"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUP_SIZES)
def test_stored_form_and_nbytes(kind, group):
    rows, cols = 5, 2 * group
    qt = quantize(_weights(2, rows, cols), kind, group)
    nblocks = cols // group
    assert qt.shape == (rows, cols)
    assert qt.packed.shape == ((rows, cols) if kind == "q8_0" else (rows, cols // 2))
    assert qt.packed.dtype == (jnp.int8 if kind == "q8_0" else jnp.uint8)
    assert qt.scales.shape == (rows, nblocks) and qt.scales.dtype == jnp.float16
    assert (qt.mins is not None) == (kind == "q4_1")
    quant_bytes = rows * cols if kind == "q8_0" else rows * cols // 2
    assert qt.nbytes == quant_bytes + rows * nblocks * 2 * (2 if kind == "q4_1" else 1)


@pytest.mark.parametrize("group", GROUP_SIZES)
def test_nibble_order(group):
    """Byte j of a block holds weight j (low nibble) and weight j + G/2 (high nibble)."""
    quants = np.tile(np.arange(group) % 16, (2, 1)).astype(np.float32)
    qt = quantize(quants, "q4_1", group)  # min 0, max 15: d = 1, m = 0, quants equal the weights
    half = group // 2
    expected = (np.arange(half) % 16) | ((np.arange(half, group) % 16) << 4)
    np.testing.assert_array_equal(np.asarray(qt.packed), np.tile(expected, (2, 1)).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), quants)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(KINDS), st.sampled_from([1, 2, 7]), st.integers(1, 4), st.integers(0, 2**31))
def test_gguf_blocks_dequantize_bit_exact(kind, rows, nblocks, seed):
    cols = 32 * nblocks
    raw = _random_blocks(seed, kind, rows, cols)
    qt = from_gguf_blocks(raw, kind, (rows, cols))
    reference = gguf.quants.dequantize(raw, GGML[kind])
    np.testing.assert_array_equal(_bits(dequantize(qt)), _bits(reference))
    np.testing.assert_array_equal(to_gguf_blocks(qt), raw)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_quantized_round_trip(kind):
    w = _weights(3, 16, 128, offset=0.3)
    raw = gguf.quants.quantize(w, GGML[kind])
    qt = from_gguf_blocks(raw, kind, w.shape)
    np.testing.assert_array_equal(_bits(dequantize(qt)), _bits(gguf.quants.dequantize(raw, GGML[kind])))
    np.testing.assert_array_equal(to_gguf_blocks(qt), raw)
    np.testing.assert_array_equal(to_gguf_blocks(from_gguf_blocks(raw.reshape(-1), kind, w.shape)), raw)


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_agrees_with_reference_quantizer(kind):
    """hyperjax's rtn follows llama.cpp's formulas: nearly every block is byte-identical to gguf.quants.quantize,
    and a block that is not (a value on a float32 rounding boundary) is off by at most one quant step."""
    w = _weights(4, 128, 256, offset=0.1)
    ours = to_gguf_blocks(quantize(w, kind))
    reference = gguf.quants.quantize(w, GGML[kind])
    per_block = (ours != reference).reshape(-1, BLOCK_BYTES[kind]).any(-1)
    assert per_block.mean() < 0.01
    qt = from_gguf_blocks(reference, kind, w.shape)
    step = np.abs(np.asarray(qt.scales, np.float32)).repeat(32, axis=1)
    ours_w = np.asarray(dequantize(from_gguf_blocks(ours, kind, w.shape)))
    assert np.all(np.abs(ours_w - gguf.quants.dequantize(reference, GGML[kind])) <= 1.01 * step)


def test_q8_0_rounds_halves_away_from_zero():
    """llama.cpp uses roundf: ±2.5 → ±3 (round-half-to-even would give ±2)."""
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [127.0, 2.5, -2.5, -127.0]
    qt = quantize(w, "q8_0")
    np.testing.assert_array_equal(np.asarray(qt.packed)[0, :4], [127, 3, -3, -127])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [(), (1,), (5,), (2, 3), (40,)])
def test_qmatmul_matches_dequantized_matmul(kind, batch):
    """Decode-sized and prefill-sized batches, odd row count, group size 64."""
    rows, cols, group = 37, 128, 64
    qt = quantize(_weights(5, rows, cols, offset=0.2), kind, group)
    x = jnp.asarray(_weights(6, int(np.prod(batch)), cols).reshape(*batch, cols))
    y = qmatmul(x, qt)
    expected = np.asarray(x, np.float64) @ np.asarray(dequantize(qt), np.float64).T
    assert y.shape == (*batch, rows) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@FAST
@given(
    st.sampled_from(KINDS), st.sampled_from(GROUP_SIZES), st.integers(1, 9), st.integers(1, 3), st.integers(0, 2**30)
)
def test_reduce_formulation_matches_dequantized_matmul(kind, group, rows, nblocks, seed):
    """The IREE-friendly multiply-reduce (a few activation rows) computes the same product as the default dot."""
    cols = group * nblocks
    qt = dataclasses.replace(quantize(_weights(seed, rows, cols, offset=0.3), kind, group), matmul="reduce")
    x = jnp.asarray(_weights(seed + 1, REDUCE_MAX_ROWS, cols))
    y = jax.jit(qmatmul)(x, qt)
    expected = np.asarray(x, np.float64) @ np.asarray(dequantize(qt), np.float64).T
    assert y.shape == (REDUCE_MAX_ROWS, rows) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_reduce_formulation_writes_no_float_weight_and_keeps_the_dot_for_batches():
    qt = quantize(_weights(0, 64, 256), "q8_0", 32)
    one, many = jnp.zeros((1, 256)), jnp.zeros((REDUCE_MAX_ROWS + 1, 256))
    assert "dot_general" in str(jax.make_jaxpr(qmatmul)(one, qt))  # the default
    reduce = dataclasses.replace(qt, matmul="reduce")
    reduce_one = str(jax.make_jaxpr(qmatmul)(one, reduce))  # a new trace: `matmul` is static
    assert "dot_general" not in reduce_one and "reduce_sum" in reduce_one
    assert str(jax.make_jaxpr(qmatmul)(many, reduce)) == str(jax.make_jaxpr(qmatmul)(many, qt))
    with pytest.raises(QuantizationError, match="unknown matmul formulation"):
        qmatmul(one, dataclasses.replace(qt, matmul="fast"))


@pytest.mark.parametrize("kind", KINDS)
def test_take_rows_matches_full_dequantize(kind):
    qt = quantize(_weights(7, 11, 96), kind)
    ids = jnp.asarray([3, 0, 10, 3])
    np.testing.assert_array_equal(np.asarray(take_rows(qt, ids)), np.asarray(dequantize(qt))[np.asarray(ids)])
    grid = jnp.asarray([[1, 2], [9, 1]])
    assert take_rows(qt, grid).shape == (2, 2, 96)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_jit_with_tensor_as_argument(kind):
    qt = jax.device_put(quantize(_weights(8, 9, 64), kind))
    x = jnp.asarray(_weights(9, 3, 64))
    np.testing.assert_allclose(np.asarray(jax.jit(qmatmul)(x, qt)), np.asarray(qmatmul(x, qt)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qt)), np.asarray(dequantize(qt)))
    ids = jnp.asarray([8, 2])
    np.testing.assert_array_equal(np.asarray(jax.jit(take_rows)(qt, ids)), np.asarray(take_rows(qt, ids)))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), qt, qt)
    assert jax.jit(jax.vmap(dequantize))(stacked).shape == (2, 9, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_under_jit_stays_within_bound(kind):
    w = _weights(10, 4, 64)
    qt = jax.jit(quantize, static_argnums=(1, 2, 3))(w, kind, 32, "rtn")
    err = np.abs(np.asarray(dequantize(qt)) - w).reshape(4, 2, 32).max(-1)
    assert np.all(err <= np.asarray(quant_error_bound(qt)))


def test_dequantize_dtype():
    qt = quantize(_weights(11, 2, 32), "q4_1")
    out = dequantize(qt, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(qt).astype(jnp.bfloat16)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros(64, np.float32), "q4_0"), "2-D"),
        ((np.zeros((2, 2, 64), np.float32), "q4_0"), "2-D"),
        ((np.zeros((2, 48), np.float32), "q4_1"), "multiple of the group size"),
        ((np.zeros((2, 64), np.float32), "q4_0", 48), "group size 48"),
        ((np.zeros((2, 64), np.float32), "q5_0"), "unknown block format"),
        ((np.zeros((2, 64), np.float32), "q8_0", 32, "gptq"), "unknown quantization method"),
        ((np.full((2, 64), np.nan, np.float32), "q8_0"), "NaN or infinity"),
        ((np.full((2, 64), -np.inf, np.float32), "q4_1"), "NaN or infinity"),
        ((np.full((2, 64), 1e6, np.float32), "q4_0"), "overflow float16"),
    ],
)
def test_quantize_rejects_bad_input(args, match):
    with pytest.raises(QuantizationError, match=match):
        quantize(*args)


@pytest.mark.parametrize(
    ("raw", "kind", "shape", "match"),
    [
        (np.zeros(35, np.uint8), "q8_0", (1, 32), "needs 34 bytes"),
        (np.zeros(18, np.float16), "q4_0", (1, 32), "needs 18 bytes of uint8 blocks, got 18 of float16"),
        (np.zeros(40, np.int8), "q4_1", (2, 32), "got 40 of int8"),
        (np.zeros(20, np.uint8), "q4_1", (1, 48), "multiple of GGUF's block size"),
        (np.zeros(18, np.uint8), "q2_k", (1, 32), "unknown block format"),
        (np.zeros(18, np.uint8), "q4_0", (32,), "2-D shape"),
    ],
)
def test_from_gguf_blocks_rejects_bad_input(raw, kind, shape, match):
    with pytest.raises(QuantizationError, match=match):
        from_gguf_blocks(raw, kind, shape)


def test_shape_errors_in_kernels():
    qt = quantize(_weights(12, 4, 64), "q4_0")
    with pytest.raises(QuantizationError, match="64 columns"):
        qmatmul(jnp.ones((2, 32)), qt)
    with pytest.raises(QuantizationError, match="64 columns"):
        qmatmul(jnp.float32(1.0), qt)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), qt, qt)
    for fn in (lambda: qmatmul(jnp.ones(64), stacked), lambda: take_rows(stacked, jnp.asarray([0]))):
        with pytest.raises(QuantizationError, match="2-D"):
            fn()
    with pytest.raises(QuantizationError, match="2-D tensor"):
        to_gguf_blocks(stacked)
    with pytest.raises(QuantizationError, match="GGUF blocks hold 32"):
        to_gguf_blocks(quantize(_weights(13, 2, 64), "q8_0", 64))


def test_quantized_tensor_is_a_pytree_with_static_format():
    qt = quantize(_weights(14, 2, 32), "q4_1")
    leaves, treedef = jax.tree.flatten(qt)
    assert len(leaves) == 3
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, QuantizedTensor) and rebuilt.kind == "q4_1" and rebuilt.group_size == 32
    assert len(jax.tree.leaves(quantize(_weights(14, 2, 32), "q4_0"))) == 2

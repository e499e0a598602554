"""Native jax.ffi matmul kernels against gguf's dequantization and a float64 matmul, on every kernel family.

Tolerance: the kernel rounds activations to int8 per 32-block, x̂ = round(x/s)·s with s = max|x_block|/127,
so |x − x̂| ≤ s/2 and each output may move by at most Σ_i |w_i|·s_i/2 (Q4_1's minimum included: its term uses
the block sum of x̂, as llama.cpp's Q8_1 does), plus float32 rounding (1e-5·Σ|w·x̂|). For Gaussian activations
the observed error is about 0.5 % of the outputs' scale, well inside that worst case, so each result is also
compared, to float32 rounding, with a float64 emulation of the kernel's own rounding."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperjax.errors import QuantizationError
from hyperjax.kernels import native
from hyperjax.kernels.quant import KINDS, QuantizedTensor, dequantize, from_gguf_blocks, qmatmul, quantize

GGML = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q8_0": GGMLQuantizationType.Q8_0,
}

Case = tuple[np.ndarray, np.ndarray, QuantizedTensor]  # x, GGUF block bytes, the weight


@pytest.fixture(scope="module", autouse=True)
def library(native_library):
    """Every test here runs on the loaded library and leaves the kernel family and thread count as it found them."""
    yield
    native.set_isa("auto")
    native.set_num_threads(None)


def _supported_isas() -> list[str]:
    best = native.ISAS.index(native.isa())
    return list(native.ISAS[: best + 1])


def _case(seed: int, kind: str, rows: int, cols: int, batch: int) -> Case:
    """x (batch, cols) float32, GGUF block bytes of a random weight, and their QuantizedTensor."""
    rng = np.random.default_rng(seed)
    raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), GGML[kind])
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    return x, raw, from_gguf_blocks(raw, kind, (rows, cols))


def _reference(x: np.ndarray, raw: np.ndarray, qt: QuantizedTensor) -> tuple[np.ndarray, ...]:
    """float64 references for x (batch, cols) @ W.T, W dequantized by gguf.

    Returns (exact, emulated, bound, slack): the exact product; the product the kernel computes, x rounded as
    it rounds (q = rint(x·(127/amax)) in float32, x̂ = q·amax/127, for the quants and Q4_1's minimum alike); the
    per-output bound on |kernel − exact| from int8 activations; and its float32 rounding part.
    """
    w = gguf.quants.dequantize(raw, GGML[qt.kind]).astype(np.float64)
    blocks = x.reshape(len(x), -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    step = (amax / np.float32(127)).astype(np.float64)
    x_hat = (np.rint(blocks * inv) * step).reshape(x.shape)
    slack = 1e-5 * (np.abs(x_hat) @ np.abs(w).T) + 1e-30
    bound = (np.repeat(step[..., 0], 32, axis=-1) / 2) @ np.abs(w).T + slack
    return x.astype(np.float64) @ w.T, x_hat @ w.T, bound, slack


def _assert_close(y: np.ndarray, x: np.ndarray, raw: np.ndarray, qt: QuantizedTensor) -> None:
    """Within the activation-rounding bound of the exact product, and float32 rounding of the emulation."""
    exact, emulated, bound, slack = _reference(x, raw, qt)
    assert y.shape == exact.shape and y.dtype == np.float32
    excess = np.abs(y - exact) / bound
    assert excess.max() <= 1.0, f"worst output off by {excess.max():.3g}× its activation-rounding bound"
    np.testing.assert_array_less(np.abs(y - emulated), slack)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 7, 33, 130])
@pytest.mark.parametrize("cols", [32, 96, 576])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_reference(kind: str, rows: int, cols: int, batch: int) -> None:
    x, raw, qt = _case(rows * cols + batch, kind, rows, cols, batch)
    y = native.native_qmatmul(jnp.asarray(x), native.repack(qt))
    _assert_close(np.asarray(y), x, raw, qt)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kernel_family(kind: str) -> None:
    """Each family this CPU runs agrees with the reference, and with the others (same integer sums)."""
    x, raw, qt = _case(5, kind, 37, 160, 6)
    w = native.repack(qt)
    results = {}
    for isa in _supported_isas():
        native.set_isa(isa)
        results[isa] = np.asarray(native.native_qmatmul(jnp.asarray(x), w))
        _assert_close(results[isa], x, raw, qt)
    native.set_isa("auto")
    first = next(iter(results.values()))
    for y in results.values():
        np.testing.assert_allclose(y, first, rtol=1e-5, atol=1e-5 * np.abs(first).max())


@pytest.mark.parametrize("kind", KINDS)
def test_arbitrary_block_bytes(kind: str) -> None:
    """Random GGUF bytes: every quant value (q8_0's −128 included) and fp16 scales from subnormal to large."""
    rows, cols = 21, 128
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (rows, cols // 32, {"q4_0": 18, "q4_1": 20, "q8_0": 34}[kind]), dtype=np.uint8)
    headers = raw[..., : 4 if kind == "q4_1" else 2].view(np.uint16)
    headers[(headers & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)  # infinities and NaNs become finite
    raw = raw.reshape(rows, -1)
    qt = from_gguf_blocks(raw, kind, (rows, cols))
    for isa in _supported_isas():
        native.set_isa(isa)
        x = rng.standard_normal((4, cols)).astype(np.float32)
        _assert_close(np.asarray(native.native_qmatmul(jnp.asarray(x), native.repack(qt))), x, raw, qt)
    native.set_isa("auto")


@pytest.mark.parametrize("kind", KINDS)
def test_large_batches_and_thread_counts(kind: str) -> None:
    """Prefill-sized batches (batch tiles, kernel tails, pool-parallel activation quantization) give
    bit-identical results for any number of threads: one thread computes each output, in a fixed order."""
    x, raw, qt = _case(11, kind, 50, 576, 259)
    w = native.repack(qt)
    f = jax.jit(native.native_qmatmul)
    results = []
    for threads in (1, 2, 3):
        native.set_num_threads(threads)
        assert native.num_threads() == threads
        results.append(np.asarray(f(jnp.asarray(x), w)))
    native.set_num_threads(None)
    _assert_close(results[0], x, raw, qt)
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


def test_thread_count_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("HYPERJAX_NUM_THREADS", "3")
    native.set_num_threads(None)  # a new pool reads the variable
    assert native.num_threads() == 3
    monkeypatch.delenv("HYPERJAX_NUM_THREADS")
    native.set_num_threads(None)
    assert native.num_threads() == len(os.sched_getaffinity(0))


def test_concurrent_callers() -> None:
    """Python threads calling at once (as XLA may run independent custom calls) share the pool safely."""
    x, _, qt = _case(8, "q4_0", 70, 192, 5)
    w = native.repack(qt)
    f = jax.jit(native.native_qmatmul)
    expected = np.asarray(f(jnp.asarray(x), w))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: np.asarray(f(jnp.asarray(x), w)), range(32)))
    for y in results:
        np.testing.assert_array_equal(y, expected)


def test_zero_activations() -> None:
    x, _, qt = _case(2, "q4_1", 9, 96, 2)
    x[0] = 0.0
    x[1, 32:64] = 0.0
    y = np.asarray(native.native_qmatmul(jnp.asarray(x), native.repack(qt)))
    assert np.all(y[0] == 0.0) and np.all(np.isfinite(y))


def test_jit_batch_axes_and_stacked_layers() -> None:
    """Leading batch axes are flattened; a stacked weight repacks per layer and is indexed by a traced layer
    inside lax.scan, or sliced by scan itself; both equal the per-layer calls."""
    rng = np.random.default_rng(7)
    layers, rows, cols = 3, 40, 64
    weights = rng.standard_normal((layers, rows, cols)).astype(np.float32)
    per_layer = [quantize(jnp.asarray(w), "q4_1") for w in weights]
    w = native.repack(jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer))
    assert w.data.shape[0] == layers and w.shape == (rows, cols)
    x = jnp.asarray(rng.standard_normal((2, 5, cols)), jnp.float32)

    @jax.jit
    def indexed(x, w):
        return jax.lax.scan(lambda c, i: (c, native.native_qmatmul(x, w, i)), 0.0, jnp.arange(layers))[1]

    @jax.jit
    def sliced(x, w):
        return jax.lax.scan(lambda c, wi: (c, native.native_qmatmul(x, wi)), 0.0, w)[1]

    ys = indexed(x, w)
    assert ys.shape == (layers, 2, 5, rows)
    np.testing.assert_array_equal(np.asarray(sliced(x, w)), np.asarray(ys))
    for i, qt in enumerate(per_layer):
        flat = native.native_qmatmul(x.reshape(-1, cols), native.repack(qt)).reshape(2, 5, rows)
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(flat))
        np.testing.assert_array_equal(np.asarray(native.native_qmatmul(x, w, i)), np.asarray(flat))
        # and the pure-JAX twin, within the activation-rounding error's typical size
        np.testing.assert_allclose(ys[i], qmatmul(x, qt), atol=0.05 * float(jnp.abs(ys[i]).max()))
    with pytest.raises(Exception, match=r"layer 3 outside 0\.\.2"):
        jax.block_until_ready(jax.jit(native.native_qmatmul)(x, w, layers))


def test_repack_layout() -> None:
    """Group g, block k: chunk c, row r holds bytes 4c..4c+3 of row 16g+r, block k; then scales and mins."""
    qt = _case(4, "q4_1", 20, 64, 1)[2]
    data = np.asarray(native.repack(qt).data)
    step = native.block_bytes("q4_1")
    assert step == 320 and data.shape == (2, native.group_stride("q4_1", 64)) and data.shape[1] % 64 == 0
    quants = np.asarray(qt.packed).reshape(20, 2, 16)
    for g, r, k, c in [(0, 0, 0, 0), (0, 5, 1, 3), (1, 3, 1, 2)]:
        offset = k * step + c * 64 + r * 4
        np.testing.assert_array_equal(data[g, offset : offset + 4], quants[16 * g + r, k, 4 * c : 4 * c + 4])
    tail = data[0, step + 256 : 2 * step].view(np.float16).reshape(2, 16)
    np.testing.assert_array_equal(tail[0], np.asarray(qt.scales)[:16, 1])
    np.testing.assert_array_equal(tail[1], np.asarray(qt.mins)[:16, 1])
    assert np.all(data[1, 4 * 4 : 4 * 16] == 0)  # padded rows 20..31 of the last group are zero


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 40),
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_unpack_rows_inverts_repack(kind: str, rows: int, blocks: int, seed: int, data) -> None:
    """unpack_rows(repack(W), ids) returns exactly W's GGUF blocks for those rows (ids past the end clamp)."""
    _, _, qt = _case(seed, kind, rows, 32 * blocks, 1)
    ids = np.array(data.draw(st.lists(st.integers(0, rows + 2), min_size=1, max_size=6)))
    back = jax.jit(native.unpack_rows)(jax.tree.map(jnp.asarray, native.repack(qt)), jnp.asarray(ids))
    kept = np.minimum(ids, rows - 1)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(qt), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[kept])
    np.testing.assert_array_equal(np.asarray(dequantize(back)), np.asarray(dequantize(qt))[kept])


def test_named_errors() -> None:
    x, _, qt = _case(1, "q8_0", 8, 64, 1)
    w = native.repack(qt)
    with pytest.raises(native.NativeKernelError, match="in 64 columns"):
        native.native_qmatmul(jnp.ones((1, 32)), w)
    stacked = native.repack(jax.tree.map(lambda a: np.stack([a, a]), qt))
    with pytest.raises(native.NativeKernelError, match="with a layer index"):
        native.native_qmatmul(jnp.asarray(x), stacked)
    with pytest.raises(native.NativeKernelError, match="with a layer index"):
        native.native_qmatmul(jnp.asarray(x), w, 0)
    with pytest.raises(QuantizationError, match="32-weight blocks"):
        native.repack(quantize(jnp.ones((4, 64)), "q4_0", group_size=64))
    with pytest.raises(native.NativeKernelError, match="unknown or needs more"):
        native.set_isa("neon")


@pytest.mark.model
def test_real_model_weights(smollm2_path) -> None:
    """SmolLM2's first-layer projection (Q4_1) and tied output head (Q8_0), with a heavy-tailed activation."""
    reader = gguf.GGUFReader(smollm2_path)
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(0)
    for name in ("blk.0.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        kind, rows, cols = t.tensor_type.name.lower(), int(t.shape[1]), int(t.shape[0])
        raw = np.asarray(t.data)
        qt = from_gguf_blocks(raw, kind, (rows, cols))
        x = (rng.standard_t(3, (2, cols))).astype(np.float32)
        _assert_close(np.asarray(native.native_qmatmul(jnp.asarray(x), native.repack(qt))), x, raw, qt)


@pytest.mark.parametrize(("batch", "slots", "kv_heads", "groups", "dim"), [(1, 16, 3, 3, 64), (2, 33, 2, 1, 8)])
def test_decode_attention_matches_reference(batch: int, slots: int, kv_heads: int, groups: int, dim: int) -> None:
    """The native decoding step equals the pure-JAX attention for every layer of a stacked cache and every number
    of valid slots, from an empty cache (the token sees only itself) to a full one."""
    from hyperjax.models.llama import attention

    rng = np.random.default_rng(slots)
    layers, heads = 3, kv_heads * groups
    cache_k, cache_v = (
        jnp.asarray(rng.standard_normal((layers, batch, slots, kv_heads, dim)), jnp.float32) * 2 for _ in range(2)
    )
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim)), jnp.float32) * 2
    k, v = (jnp.asarray(rng.standard_normal((batch, 1, kv_heads, dim)), jnp.float32) for _ in range(2))
    step = jax.jit(native.decode_attention)
    for layer in range(layers):
        for start in (0, 1, slots // 2, slots):
            got = step(q, k, v, cache_k, cache_v, layer, start)
            want = attention(q, k, v, cache_k[layer], cache_v[layer], start)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_decode_attention_errors() -> None:
    cache = jnp.zeros((2, 1, 8, 2, 4))
    q, kv = jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 2, 4))
    with pytest.raises(native.NativeKernelError, match="decode_attention takes"):
        native.decode_attention(jnp.zeros((1, 2, 4, 4)), kv, kv, cache, cache, 0, 0)
    with pytest.raises(native.NativeKernelError, match="decode_attention takes"):
        native.decode_attention(q, jnp.zeros((1, 1, 3, 4)), kv, cache, cache, 0, 0)
    with pytest.raises(Exception, match="outside the cache"):
        jax.block_until_ready(native.decode_attention(q, kv, kv, cache, cache, 2, 0))
    with pytest.raises(Exception, match="outside the cache"):
        jax.block_until_ready(native.decode_attention(q, kv, kv, cache, cache, 0, 9))

"""Sparse 4-bit CSR against scipy.sparse: structure, quantization bound, pruning patterns, kernels, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hyperjax.errors import QuantizationError
from hyperjax.kernels.sparse import (
    Q4CSR,
    from_arrays,
    from_dense,
    index_dtype,
    magnitude_mask,
    n_m_mask,
    spmm,
    spmv,
    to_dense,
    values,
)

SETTINGS = settings(max_examples=40, deadline=None)

_spmv = jax.jit(spmv)
_spmm = jax.jit(spmm)
_values = jax.jit(values)


def _floats(bound: float) -> st.SearchStrategy[float]:
    """float32 values whose products stay normal (XLA:CPU flushes subnormals to zero), a quarter of them zero."""
    value = st.floats(-bound, bound, width=32).map(lambda v: v if abs(v) > 1e-12 else 0.0)
    return st.one_of(st.just(0.0), value, value, value)


@st.composite
def weights(draw, max_rows: int = 9, max_cols: int = 40) -> np.ndarray:
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    return draw(arrays(np.float32, (rows, cols), elements=_floats(100.0)))


@st.composite
def masked_weights(draw) -> tuple[np.ndarray, np.ndarray]:
    """A weight and a pruning mask of one of the three kinds (per-row, global, N:M)."""
    w = draw(weights())
    kind = draw(st.sampled_from(["row", "global", "n_m"]))
    if kind == "n_m":
        m = draw(st.integers(1, 8))
        return w, n_m_mask(w, draw(st.integers(1, m)), m)
    return w, magnitude_mask(w, draw(st.floats(0.0, 1.0)), kind)


def _scipy(t: Q4CSR) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix((np.asarray(_values(t)), np.asarray(t.indices), np.asarray(t.row_ptr)), t.shape)


def _arrays(t: Q4CSR) -> dict:
    return dict(
        packed=t.packed, indices=t.indices, row_ptr=t.row_ptr, scales=t.scales, offsets=t.offsets, shape=t.shape
    )


def _assert_close_products(got: np.ndarray, a: scipy.sparse.csr_matrix, x: np.ndarray) -> None:
    """got ≈ x @ A.T up to float32 summation-order error."""
    want = (a @ x.T).T
    scale = (abs(a) @ np.abs(x).T).T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(scale.max(initial=0.0)) + 1e-30)


@jax.jit
def _everything(x: jax.Array, t: Q4CSR) -> tuple[jax.Array, ...]:
    """values, to_dense, spmv of x[0] and spmm of x: one compilation per example."""
    return values(t), to_dense(t), spmv(x[0], t), spmm(x, t)


@SETTINGS
@given(masked_weights(), st.integers(1, 3), st.randoms(use_true_random=False))
def test_matches_scipy_within_the_4bit_bound(case, batch, rnd):
    w, mask = case
    t = from_dense(w, mask)
    x = np.random.default_rng(rnd.getrandbits(32)).standard_normal((batch, w.shape[1])).astype(np.float32)
    vals, dense, y, y_batch = (np.asarray(a) for a in _everything(x, t))
    kept = np.where(mask, w, 0.0)
    ref = scipy.sparse.csr_matrix(kept)
    ref.eliminate_zeros()
    ref.sort_indices()
    np.testing.assert_array_equal(np.asarray(t.row_ptr), ref.indptr)
    np.testing.assert_array_equal(np.asarray(t.indices), ref.indices)
    assert t.indices.dtype == index_dtype(w.shape[1]) and t.row_ptr.dtype == jnp.int32
    a = scipy.sparse.csr_matrix((vals, np.asarray(t.indices), np.asarray(t.row_ptr)), t.shape)
    np.testing.assert_array_equal(dense, a.toarray())
    step = np.asarray(t.scales, np.float32)[:, None]
    assert np.all(np.abs(dense - kept) <= step / 2 * (1 + 1e-6) + 1e-6 * np.abs(kept))
    assert np.all(dense * kept >= 0)  # a sign never flips (a tiny weight may round to zero)
    _assert_close_products(y[None], a, x[:1])
    _assert_close_products(y_batch, a, x)


@SETTINGS
@given(weights(), st.floats(0.0, 1.0), st.sampled_from(["row", "global"]))
def test_magnitude_mask_keeps_the_largest(w, sparsity, scope):
    mask = magnitude_mask(w, sparsity, scope)
    groups = w.shape[0] if scope == "row" else 1
    mag, keep = np.abs(w).reshape(groups, -1), mask.reshape(groups, -1)
    n = mag.shape[1]
    assert np.all(keep.sum(axis=1) == n - round(sparsity * n))
    for m, k in zip(mag, keep, strict=True):
        assert m[k].min(initial=np.inf) >= m[~k].max(initial=-np.inf)


@SETTINGS
@given(weights(), st.integers(1, 8), st.data())
def test_n_m_pattern_respected(w, m, data):
    n = data.draw(st.integers(1, m))
    mask = n_m_mask(w, n, m)
    t = from_dense(w, mask)
    cols = w.shape[1]
    for start in range(0, cols, m):
        group_mask, group_mag = mask[:, start : start + m], np.abs(w[:, start : start + m])
        assert np.all(group_mask.sum(axis=1) == min(n, group_mask.shape[1]))
        for gm, gk in zip(group_mag, group_mask, strict=True):
            assert gm[gk].min(initial=np.inf) >= gm[~gk].max(initial=-np.inf)
    pattern = np.ones(t.nnz), np.asarray(t.indices), np.asarray(t.row_ptr)
    stored = scipy.sparse.csr_matrix(pattern, t.shape).toarray() != 0
    counts = np.add.reduceat(stored.astype(int), np.arange(0, cols, m), axis=1)
    assert counts.max(initial=0) <= n


@SETTINGS
@given(masked_weights())
def test_from_arrays_round_trip_and_nbytes(case):
    w, mask = case
    t = from_dense(w, mask)
    again = from_arrays(**_arrays(t))
    assert jax.tree.structure(again) == jax.tree.structure(t)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(t), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows, cols = w.shape
    expected = (t.nnz + 1) // 2 + t.nnz * index_dtype(cols).itemsize + 4 * (rows + 1) + 2 * 2 * rows
    assert t.nbytes == expected


def test_empty_rows_all_zero_single_row_and_column():
    x = np.arange(1, 6, dtype=np.float32)
    zero = from_dense(np.zeros((4, 5), np.float32))
    assert zero.nnz == 0 and zero.nbytes == 4 * 5 + 2 * 2 * 4
    np.testing.assert_array_equal(np.asarray(_spmv(x, zero)), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(_spmm(x[None], zero)), np.zeros((1, 4)))
    np.testing.assert_array_equal(np.asarray(to_dense(zero)), np.zeros((4, 5)))
    w = np.array([[0, 0, 0, 0, 0], [1, -2, 0, 8, 0], [0, 0, 0, 0, 0], [0, 0, -4, 0, 11]], np.float32)  # on the grid
    t = from_dense(w)
    np.testing.assert_array_equal(np.asarray(t.row_ptr), [0, 0, 3, 3, 5])
    np.testing.assert_allclose(np.asarray(_spmv(x, t)), w @ x, rtol=1e-6)
    row = from_dense(w[1:2])
    np.testing.assert_allclose(np.asarray(_spmv(x, row)), w[1:2] @ x, rtol=1e-6)
    column = from_dense(w[:, 3:4])
    assert column.indices.dtype == np.uint8
    np.testing.assert_allclose(np.asarray(_spmm(x[:, None], column)), x[:, None] @ w[:, 3:4].T, rtol=1e-6)


def test_split_rows_and_several_chunks_match_scipy():
    rng = np.random.default_rng(0)
    skewed = np.zeros((32, 200), np.float32)
    skewed[5] = rng.standard_normal(200)
    skewed[np.arange(32), rng.integers(0, 200, 32)] = 1.0
    t = from_dense(skewed)
    assert t.windows > t.shape[0]  # the long row spans several windows
    x = rng.standard_normal((2, 200)).astype(np.float32)
    _assert_close_products(np.asarray(_spmv(x[0], t))[None], _scipy(t), x[:1])
    _assert_close_products(np.asarray(_spmm(x, t)), _scipy(t), x)
    big = rng.standard_normal((151, 1000)).astype(np.float32)  # 151 windows of 900: two chunks, one padded
    t = from_dense(big, magnitude_mask(big, 0.1))
    x = rng.standard_normal((1, 1000)).astype(np.float32)
    _assert_close_products(np.asarray(_spmv(x[0], t))[None], _scipy(t), x)


def test_sign_magnitude_code_is_finer_than_symmetric_after_pruning():
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    mask = magnitude_mask(w, 0.9)
    t = from_dense(w, mask)
    symmetric_step = np.abs(np.where(mask, w, 0)).max(axis=1) * 2 / 15
    assert np.all(np.asarray(t.scales, np.float32) < 0.8 * symmetric_step)


@pytest.mark.parametrize(
    ("cols", "dtype"), [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.int32)]
)
def test_index_dtype_is_the_narrowest(cols, dtype):
    t = from_arrays(
        np.zeros(1, np.uint8), np.array([0, cols - 1])[: min(cols, 2)], [0, min(cols, 2)], [0.5], [0.0], (1, cols)
    )
    assert t.indices.dtype == dtype and index_dtype(cols) == dtype


def _valid() -> dict:
    """3×4 matrix, rows of 2, 0 and 2 nonzeros."""
    return dict(
        packed=np.array([0x21, 0x9A], np.uint8),
        indices=np.array([0, 3, 1, 2]),
        row_ptr=np.array([0, 2, 2, 4]),
        scales=np.array([0.5, 0.0, 1.0], np.float16),
        offsets=np.array([0.25, 0.0, 0.0], np.float16),
        shape=(3, 4),
    )


def test_from_arrays_accepts_the_valid_case():
    t = from_arrays(**_valid())
    np.testing.assert_array_equal(np.asarray(_values(t)), [0.75, 1.25, -2.0, -1.0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(indices=np.array([0, 4, 1, 2])), "outside 0..3"),
        (dict(indices=np.array([0, 3, -1, 2])), "outside 0..3"),
        (dict(indices=np.array([3, 0, 1, 2])), "row 0 are not strictly increasing"),
        (dict(indices=np.array([0, 3, 2, 2])), "row 2 are not strictly increasing"),
        (dict(row_ptr=np.array([0, 2, 4])), "rows \\+ 1 = 4"),
        (dict(row_ptr=np.array([0, 3, 2, 4])), "decreases at row 1"),
        (dict(row_ptr=np.array([0, 2, 2, 3])), "from 0 to nnz = 4"),
        (dict(row_ptr=np.array([1, 2, 2, 4])), "from 0 to nnz = 4"),
        (dict(row_ptr=np.array([0.0, 2, 2, 4])), "row_ptr must be a 1-D integer array"),
        (dict(packed=np.array([0x21], np.uint8)), "packed codes"),
        (dict(packed=np.array([0x21, 0x1A], np.int8)), "packed codes"),
        (dict(scales=np.array([0.5, -1.0, 1.0], np.float16)), "scales must be finite and non-negative"),
        (dict(offsets=np.array([0.0, np.inf, 0.0], np.float16)), "offsets must be finite"),
        (dict(scales=np.array([0.5, 1.0], np.float16)), "scales must be floats of shape"),
        (dict(shape=(3, 0)), "positive sizes"),
    ],
)
def test_from_arrays_rejects_bad_structure(change, message):
    with pytest.raises(QuantizationError, match=message):
        from_arrays(**{**_valid(), **change})


def test_bad_dense_inputs_and_activations_rejected():
    w = np.ones((2, 4), np.float32)
    with pytest.raises(QuantizationError, match="NaN"):
        from_dense(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(QuantizationError, match="2-D"):
        from_dense(np.ones(4, np.float32))
    with pytest.raises(QuantizationError, match="float16's range"):
        from_dense(np.array([[1e5]], np.float32))
    with pytest.raises(QuantizationError, match="mask must be bool"):
        from_dense(w, np.ones((2, 3), bool))
    with pytest.raises(QuantizationError, match="sparsity"):
        magnitude_mask(w, 1.5)
    with pytest.raises(QuantizationError, match="scope"):
        magnitude_mask(w, 0.5, "column")
    with pytest.raises(QuantizationError, match="N:M"):
        n_m_mask(w, 3, 2)
    t = from_dense(w)
    with pytest.raises(QuantizationError, match="cols = 4"):
        spmv(jnp.ones(3), t)
    with pytest.raises(QuantizationError, match="batch, cols"):
        spmm(jnp.ones(4), t)

"""Poincaré-ball kernels: float64 references and identities by hypothesis, gradients at 0 and at the boundary.

Error model (the module docstring's): ‖result − exact‖ ≤ K·eps·Λ/√c with Λ the largest conformal factor
λ = 2/(1 − c‖p‖²) among the points involved (2 at the origin; 250 at the float32 projection limit, 1e5 at
float64's). One map against a float64 numpy reference of its textbook formula: K = 16 (observed ≤ 5), plus the
reference's own error eps64·Λ², which matters only for float64 points at float64's limit. Round trips and
compositions amplify the first map's error by the second's conditioning: K·eps·Λ²/√c. Points are sampled
anywhere up to the projection limit (exactly on it, and ulps beyond it, included), c in [0.05, 5].
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hyperjax.kernels import poincare as P

SETTINGS = settings(max_examples=30, deadline=None)
B, D = 6, 5  # rows per example: one compiled executable per function and dtype
DTYPES = [np.float32, np.float64]
EPS = {np.float32: float(np.finfo(np.float32).eps), np.float64: float(np.finfo(np.float64).eps)}
BALL_EPS = {np.float32: 4e-3, np.float64: 1e-5}
K = 16.0

F = {name: jax.jit(getattr(P, name)) for name in P.__all__ if name not in ("gyromidpoint", "max_norm")}
F["gyromidpoint"] = jax.jit(P.gyromidpoint, static_argnames="axis")


def x64(dtype) -> AbstractContextManager:
    """Context in which `dtype` arrays keep their dtype (float64 needs x64 on)."""
    return jax.enable_x64(dtype == np.float64)


def limit(c, dtype) -> float:
    return (1.0 - BALL_EPS[dtype]) / np.sqrt(c)


def arr(a, dtype) -> np.ndarray:
    """float64 numpy values, back to float64 after a round trip through `dtype`."""
    return np.asarray(a, dtype).astype(np.float64)


# ---- textbook formulas in numpy float64 --------------------------------------------------------------------


def norm(a):
    return np.linalg.norm(a, axis=-1, keepdims=True)


def ratio(f, t):
    """f(t)/t with its limit 1 at t = 0."""
    safe = np.where(t > 0, t, 0.5)
    return np.where(t > 0, f(safe) / safe, 1.0)


def ref_project(x, c, dtype):
    n, lim = norm(x), limit(c, dtype)
    return np.where(n > lim, x * lim / np.where(n > 0, n, 1.0), x)


def ref_lambda(x, c):
    return 2.0 / (1.0 - c * np.sum(x * x, axis=-1, keepdims=True))


def ref_add(x, y, c):
    xy, x2, y2 = (np.sum(a * b, axis=-1, keepdims=True) for a, b in ((x, y), (x, x), (y, y)))
    return ((1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y) / (1 + 2 * c * xy + c * c * x2 * y2)


def ref_expmap0(v, c):
    return ratio(np.tanh, np.sqrt(c) * norm(v)) * v


def ref_logmap0(y, c):
    return ratio(np.arctanh, np.sqrt(c) * norm(y)) * y


def ref_expmap(x, v, c):
    lam = ref_lambda(x, c)
    return ref_add(x, ratio(np.tanh, np.sqrt(c) * lam * norm(v) / 2) * lam / 2 * v, c)


def ref_logmap(x, y, c):
    u = ref_add(-x, y, c)
    return 2 / ref_lambda(x, c) * ratio(np.arctanh, np.sqrt(c) * norm(u)) * u


def ref_distance(x, y, c):
    return 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * norm(ref_add(-x, y, c)))[..., 0]


def ref_scalar_mul(r, x, c):
    t = np.sqrt(c) * norm(x)
    return np.tanh(r * np.arctanh(t)) / np.sqrt(c) * np.divide(x, norm(x), out=np.zeros_like(x), where=t > 0)


def ref_matvec(m, x, c):
    mx, sc = x @ m.T, np.sqrt(c)
    xn, mxn = norm(x), norm(mx)
    ok = (xn > 0) & (mxn > 0)
    gain = np.tanh(mxn / np.where(ok, xn, 1.0) * np.arctanh(sc * xn)) / (sc * np.where(ok, mxn, 1.0))
    return np.where(ok, gain * mx, 0.0)


def ref_midpoint(x, w, c):
    """x (B, k, d), w (B, k), c scalar."""
    lam = ref_lambda(x, c)
    inner = np.sum(w[..., None] * lam * x, axis=-2) / np.sum(w[..., None] * (lam - 1), axis=-2)
    return ref_scalar_mul(0.5, inner, c)


def bound(c, dtype, *points, power: int = 1, k: float = K) -> np.ndarray:
    """Per row: k·(eps·Λ^power + eps64·Λ²)/√c, Λ the largest conformal factor of the (projected) points."""
    lam = np.max([ref_lambda(ref_project(p, c, dtype), c)[..., 0] for p in points], axis=0)
    return k * (EPS[dtype] * lam**power + EPS[np.float64] * lam**2) / np.sqrt(c)


def assert_rows_close(out, ref, tol, mask=None):
    """Per row: |out − ref| (scalars, tol of out's shape) or ‖out − ref‖ (vectors, tol of out.shape[:-1])."""
    out = np.asarray(out, np.float64)
    err = np.abs(out - ref) if out.shape == np.shape(tol) else np.linalg.norm(out - ref, axis=-1)
    bad = ~(err <= tol) if mask is None else mask & ~(err <= tol)
    msg = f"rows {np.flatnonzero(bad)}: error {err[bad]} > bound {np.broadcast_to(tol, err.shape)[bad]}"
    assert not bad.any(), msg


# ---- strategies -------------------------------------------------------------------------------------------

CURVATURE = st.one_of(st.sampled_from([0.05, 1.0, 5.0]), st.floats(0.05, 5.0))
# Fractions of the projection limit: anywhere, at 0, on the limit, just inside it, and tiny.
ANYWHERE, AT_EDGE, TINY = st.floats(0.0, 1.0), st.floats(0.999, 1.0), st.floats(1e-12, 1e-4)
RHO = st.one_of(ANYWHERE, st.sampled_from([0.0, 1.0]), AT_EDGE, TINY)


def unit_rows(a):
    n = norm(a)
    return np.divide(a, n, out=np.zeros_like(a), where=n > 0)


@st.composite
def points(draw, c, dtype, shape=(B,)):
    """float64 points of the `dtype` grid with norms up to the projection limit."""
    dirs = draw(arrays(np.float64, (*shape, D), elements=st.floats(-1.0, 1.0)))
    rho = draw(arrays(np.float64, (*shape, 1), elements=RHO))
    return arr(unit_rows(dirs) * rho * limit(c, dtype), dtype)


@st.composite
def partners(draw, x, c, dtype):
    """Points unrelated to x, or near x, or near −x (the ill-conditioned cases near the boundary)."""
    kind = draw(st.sampled_from(["free", "near", "opposite"]))
    if kind == "free":
        return draw(points(c, dtype))
    noise = draw(arrays(np.float64, x.shape, elements=st.floats(-1.0, 1.0)))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1e-1]))
    y = (x if kind == "near" else -x) + noise * scale / np.sqrt(c)
    return arr(ref_project(y, c, dtype), dtype)


@st.composite
def pair_cases(draw, dtype):
    c = draw(CURVATURE)
    x = draw(points(c, dtype))
    return c, x, draw(partners(x, c, dtype))


@st.composite
def tangents(draw, c, dtype, max_t: float):
    """Tangent vectors with √c‖v‖ up to max_t (and tiny)."""
    dirs = draw(arrays(np.float64, (B, D), elements=st.floats(-1.0, 1.0)))
    t = draw(arrays(np.float64, (B, 1), elements=st.one_of(st.floats(0.0, max_t), st.floats(1e-12, 1e-4))))
    return arr(unit_rows(dirs) * t / np.sqrt(c), dtype)


# ---- one map against its float64 reference ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_expmap0_logmap0_match_reference(dtype, data):
    c = data.draw(CURVATURE)
    v, y = data.draw(tangents(c, dtype, 12.0)), data.draw(points(c, dtype))
    with x64(dtype):
        exp, log = F["expmap0"](v.astype(dtype), dtype(c)), F["logmap0"](y.astype(dtype), dtype(c))
    assert exp.dtype == log.dtype == dtype
    ref = ref_project(ref_expmap0(v, c), c, dtype)
    assert_rows_close(exp, ref, bound(c, dtype, ref))
    assert_rows_close(log, ref_logmap0(ref_project(y, c, dtype), c), bound(c, dtype, y))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_mobius_add_expmap_logmap_distance_match_reference(dtype, data):
    c, x, y = data.draw(pair_cases(dtype))
    v = data.draw(tangents(c, dtype, 3.0))
    with x64(dtype):
        xd, yd, vd, cd = x.astype(dtype), y.astype(dtype), v.astype(dtype), dtype(c)
        add, exp = F["mobius_add"](xd, yd, cd), F["expmap"](xd, vd, cd)
        log, dist = F["logmap"](xd, yd, cd), F["distance"](xd, yd, cd)
    ref_a, ref_e = ref_project(ref_add(x, y, c), c, dtype), ref_project(ref_expmap(x, v, c), c, dtype)
    assert_rows_close(add, ref_a, bound(c, dtype, x, y, ref_a))
    assert_rows_close(exp, ref_e, bound(c, dtype, x, ref_e))
    assert_rows_close(log, ref_logmap(x, y, c), bound(c, dtype, x, y))
    assert_rows_close(dist, ref_distance(x, y, c), bound(c, dtype, x, y))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_scalar_mul_matvec_conformal_match_reference(dtype, data):
    c = data.draw(CURVATURE)
    x = data.draw(points(c, dtype))
    r = data.draw(arrays(np.float64, (B, 1), elements=st.floats(-3.0, 3.0)))
    m = data.draw(arrays(np.float64, (D, D), elements=st.floats(-1.0, 1.0)))
    with x64(dtype):
        xd, cd = x.astype(dtype), dtype(c)
        mul, mv = F["mobius_scalar_mul"](r.astype(dtype), xd, cd), F["mobius_matvec"](m.astype(dtype), xd, cd)
        lam = F["conformal_factor"](xd, cd)
    r, m = arr(r, dtype), arr(m, dtype)
    ref_s, ref_m = ref_project(ref_scalar_mul(r, x, c), c, dtype), ref_project(ref_matvec(m, x, c), c, dtype)
    assert_rows_close(mul, ref_s, bound(c, dtype, x, ref_s))
    assert_rows_close(mv, ref_m, bound(c, dtype, x, ref_m))
    ref_l = ref_lambda(x, c)[..., 0]
    assert_rows_close(lam, ref_l, K * (EPS[dtype] + EPS[np.float64] * ref_l) * ref_l**2)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_gyromidpoint_matches_reference(dtype, data):
    c, n = data.draw(CURVATURE), 4
    x = data.draw(points(c, dtype, (B, n)))
    if data.draw(st.booleans()):  # a tight cluster, possibly at the boundary
        noise = data.draw(arrays(np.float64, x.shape, elements=st.floats(-1.0, 1.0)))
        x = arr(ref_project(x[:, :1] + noise * 1e-3 / np.sqrt(c), c, dtype), dtype)
    w = data.draw(arrays(np.float64, (B, n), elements=st.one_of(st.just(0.0), st.floats(1e-3, 1.0))))
    w[:, 0] += 1e-3
    with x64(dtype):
        out = F["gyromidpoint"](x.astype(dtype), w.astype(dtype), dtype(c))
    ref = ref_project(ref_midpoint(x, arr(w, dtype), c), c, dtype)
    assert_rows_close(out, ref, bound(c, dtype, ref, *np.moveaxis(x, 1, 0)))


# ---- identities -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_exp_log_round_trips(dtype, data):
    c, x, y = data.draw(pair_cases(dtype))
    v0 = data.draw(tangents(c, dtype, math.atanh(1 - BALL_EPS[dtype])))  # exp₀ stays inside the limit
    v = arr(ref_logmap(x, y, c), dtype)  # a tangent vector at x whose exp stays inside the ball
    with x64(dtype):
        xd, yd, cd = x.astype(dtype), y.astype(dtype), dtype(c)
        back0 = F["logmap0"](F["expmap0"](v0.astype(dtype), cd), cd)
        there0 = F["expmap0"](F["logmap0"](yd, cd), cd)
        back = F["logmap"](xd, F["expmap"](xd, v.astype(dtype), cd), cd)
        there = F["expmap"](xd, F["logmap"](xd, yd, cd), cd)
    tol = bound(c, dtype, x, y, power=2)
    assert_rows_close(back0, v0, bound(c, dtype, ref_expmap0(v0, c), power=2))
    assert_rows_close(there0, y, bound(c, dtype, y, power=2))
    assert_rows_close(back, v, tol)
    assert_rows_close(there, y, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_mobius_add_identities(dtype, data):
    c, x, y = data.draw(pair_cases(dtype))
    with x64(dtype):
        xd, yd, cd, zero = x.astype(dtype), y.astype(dtype), dtype(c), np.zeros((B, D), dtype)
        right, left = F["mobius_add"](xd, zero, cd), F["mobius_add"](zero, xd, cd)
        inverse = F["mobius_add"](F["mobius_neg"](xd), xd, cd)
        cancel = F["mobius_add"](-xd, F["mobius_add"](xd, yd, cd), cd)
    tol = bound(c, dtype, x)
    assert_rows_close(right, x, tol)
    assert_rows_close(left, x, tol)
    assert_rows_close(inverse, 0.0 * x, tol)  # exactly 0 unless XLA rounds the two projections differently
    # Left cancellation holds while x ⊕ y stays inside the projection limit.
    s = ref_add(x, y, c)
    inside = norm(s)[..., 0] < limit(c, dtype) * (1 - 1e-3)
    assert_rows_close(cancel, y, bound(c, dtype, x, y, s, power=2), mask=inside)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_distance_is_a_metric(dtype, data):
    c, x, y = data.draw(pair_cases(dtype))
    z = data.draw(partners(y, c, dtype))
    with x64(dtype):
        xd, yd, zd, cd = x.astype(dtype), y.astype(dtype), z.astype(dtype), dtype(c)
        pairs = ((xd, yd), (yd, xd), (yd, zd), (xd, zd))
        dxy, dyx, dyz, dxz = (np.asarray(F["distance"](a, b, cd), np.float64) for a, b in pairs)
        dxx, d0x = F["distance"](xd, xd, cd), F["distance"](np.zeros_like(xd), xd, cd)
        log_norm = np.linalg.norm(F["logmap"](xd, yd, cd), axis=-1) * F["conformal_factor"](xd, cd)
    tol = bound(c, dtype, x, y, z)
    assert (dxy >= 0).all()
    assert_rows_close(dxx, 0.0 * tol, tol)
    assert_rows_close(dxy, dyx, tol)
    assert (dxz <= dxy + dyz + tol).all()
    assert_rows_close(d0x, 2 / np.sqrt(c) * np.arctanh(np.sqrt(c) * norm(x)[..., 0]), bound(c, dtype, x))
    assert_rows_close(log_norm, dxy, bound(c, dtype, x, y, power=2))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_scalar_mul_and_matvec_identities(dtype, data):
    c = data.draw(CURVATURE)
    x = data.draw(points(c, dtype))
    r = data.draw(st.floats(0.1, 3.0))
    with x64(dtype):
        xd, cd = x.astype(dtype), dtype(c)
        doubled, sum_xx = F["mobius_scalar_mul"](dtype(2), xd, cd), F["mobius_add"](xd, xd, cd)
        one, neg = F["mobius_scalar_mul"](dtype(1), xd, cd), F["mobius_scalar_mul"](dtype(-1), xd, cd)
        ident = F["mobius_matvec"](np.eye(D, dtype=dtype), xd, cd)
        scaled, mul = (
            F["mobius_matvec"](dtype(r) * np.eye(D, dtype=dtype), xd, cd),
            F["mobius_scalar_mul"](dtype(r), xd, cd),
        )
    tol = bound(c, dtype, x)
    inside = norm(ref_scalar_mul(2.0, x, c))[..., 0] < limit(c, dtype) * (1 - 1e-3)
    assert_rows_close(doubled, np.asarray(sum_xx, np.float64), bound(c, dtype, x, 2 * x), mask=inside)
    assert_rows_close(one, x, tol)
    assert_rows_close(neg, -x, tol)
    assert_rows_close(ident, x, tol)
    assert_rows_close(scaled, np.asarray(mul, np.float64), bound(c, dtype, x, np.asarray(mul, np.float64)))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_gyromidpoint_identities(dtype, data):
    c = data.draw(CURVATURE)
    x = data.draw(points(c, dtype))
    w = data.draw(arrays(np.float64, (B, 3), elements=st.floats(1e-3, 1.0)))
    with x64(dtype):
        xd, cd = x.astype(dtype), dtype(c)
        same = F["gyromidpoint"](np.stack([xd] * 3, axis=1), w.astype(dtype), cd)
        opposite = F["gyromidpoint"](np.stack([xd, -xd], axis=1), np.ones((B, 2), dtype), cd)
        alone = F["gyromidpoint"](np.stack([xd, -xd, 0 * xd], axis=1), np.eye(3, dtype=dtype)[[0] * B], cd)
    assert_rows_close(same, x, bound(c, dtype, x))
    assert_rows_close(opposite, 0.0 * x, bound(c, dtype, x))
    assert_rows_close(alone, x, bound(c, dtype, x))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_pairwise_distance_matches_distance(dtype, data):
    c, q, k = data.draw(pair_cases(dtype))
    with x64(dtype):
        qd, kd, cd = q.astype(dtype), k.astype(dtype), dtype(c)
        pair = np.asarray(F["pairwise_distance"](qd, kd, cd), np.float64)
        full = np.asarray(F["distance"](qd[:, None], kd[None], cd), np.float64)
    assert pair.shape == (B, B)
    # The documented cancellation bound of ‖q‖² + ‖k‖² − 2⟨q, k⟩ (with 4 → 8 for margin), plus distance's.
    cq, ck = c * np.sum(q * q, axis=-1), c * np.sum(k * k, axis=-1)
    bq, bk = 1 - cq[:, None], 1 - ck[None]
    cancel = 2 * np.sqrt(8 * EPS[dtype] * (cq[:, None] + ck[None]) / (bq * bk)) / np.sqrt(c)
    allowed = cancel + 2 * K * EPS[dtype] * np.maximum(2 / bq, 2 / bk) / np.sqrt(c)
    assert (np.abs(pair - full) <= allowed).all()


# ---- gradients --------------------------------------------------------------------------------------------


def special_points(c: np.ndarray, dtype) -> np.ndarray:
    """(len(c), 11, D): 0, tiny norms (1e-30 … 1e-4), inside, exactly on the limit, ulps and far beyond it."""
    u = np.linspace(-1.0, 1.0, D) + 0.3
    u /= np.linalg.norm(u)
    lim = limit(c, dtype)[:, None, None]
    scales = np.array([0.0, 1e-30, 1e-20, 1e-12, 1e-7, 1e-4, 0.5, 1.0, 1.0 + 1e-7, 2.0, 1e3])[None, :, None]
    return (np.where(scales < 1e-3, scales, scales * lim) * u).astype(dtype)


M0 = np.linspace(-1.0, 1.0, D * D).reshape(D, D)


def _matrix(y):
    """A (D, D) matrix that depends on y (its gradient flows to y): outer product of y's first two rows."""
    return y[0, 0, :, None] * y[0, 1, None, :]


def _weights(y):
    """Positive midpoint weights (..., 2) that depend on y."""
    return jnp.abs(y[..., :2]) + 0.1


# name → function of (x, y, c), all three differentiated; y is a point, a tangent vector or parameters.
GRAD_CASES = {
    "project": lambda x, y, c: P.project(x, c),
    "expmap0": lambda x, y, c: P.expmap0(x, c),
    "logmap0": lambda x, y, c: P.logmap0(x, c),
    "mobius_add": lambda x, y, c: P.mobius_add(x, y, c),
    "expmap": lambda x, y, c: P.expmap(x, y, c),
    "logmap": lambda x, y, c: P.logmap(x, y, c),
    "distance": lambda x, y, c: P.distance(x, y, c),
    "pairwise_distance": lambda x, y, c: P.pairwise_distance(x, y, c[:, :1]),
    "conformal_factor": lambda x, y, c: P.conformal_factor(x, c),
    "mobius_scalar_mul": lambda x, y, c: P.mobius_scalar_mul(y[..., :1] + 0.5, x, c),
    "mobius_matvec": lambda x, y, c: P.mobius_matvec(M0.astype(y.dtype) + _matrix(y), x, c),
    "mobius_matvec_near_zero": lambda x, y, c: P.mobius_matvec(_matrix(y), x, c),
    "gyromidpoint": lambda x, y, c: P.gyromidpoint(jnp.stack([x, y], -2), _weights(y), c[..., None]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_finite_at_origin_tiny_norms_and_boundary(name, dtype):
    """Every pair of special points (0, 1e-30 … 1e-4, on the limit, beyond it) for c ∈ {0.05, 1, 5}."""
    c = np.array([0.05, 1.0, 5.0])
    pts = special_points(c, dtype)  # (3, S, D)
    s = pts.shape[1]
    x = np.concatenate([np.repeat(pts, s, axis=1), pts], axis=1)  # all ordered pairs, and (x, −x)
    y = np.concatenate([np.tile(pts, (1, s, 1)), -pts], axis=1)
    cc = np.broadcast_to(c[:, None, None], (3, x.shape[1], 1)).astype(dtype)
    f = GRAD_CASES[name]
    with x64(dtype):
        loss = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))
        value, grads = jax.jit(loss)(x, y, cc)
    assert np.isfinite(value)
    for g in grads:
        assert g.dtype == dtype and np.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobians_at_origin_and_at_x_are_exact(dtype):
    """The double-where norms give the true derivative at 0, not just a finite one."""
    c, r = dtype(0.7), dtype(1.5)
    zero, eye = np.zeros(D, dtype), np.eye(D, dtype=dtype)
    x = (np.linspace(-1.0, 1.0, D) * 0.3).astype(dtype)
    m = np.arange(D * D, dtype=dtype).reshape(D, D) / 10
    t = math.sqrt(c) * np.linalg.norm(x)
    cases = [  # (function, argnums, args, expected Jacobian)
        (P.expmap0, 0, (zero, c), eye),
        (P.logmap0, 0, (zero, c), eye),
        (P.mobius_scalar_mul, 1, (r, zero, c), r * eye),
        (P.mobius_matvec, 1, (m, zero, c), m),
        (P.expmap, 1, (x, zero, c), eye),
        (P.logmap, 1, (x, x, c), eye),
        # M ⊗ x at M = 0: d/dM = artanh(√c‖x‖)/(√c‖x‖)·x, with no special case for Mx = 0.
        (P.mobius_matvec, 0, (np.zeros((D, D), dtype), x, c), math.atanh(t) / t * eye[:, :, None] * x),
    ]
    tol = 1e-6 if dtype == np.float32 else 1e-12
    with x64(dtype):
        jacobians = jax.jit(lambda: [jax.jacobian(f, argnums=i)(*args) for f, i, args, _ in cases])()
    for (f, _, _, expected), jac in zip(cases, jacobians, strict=True):
        np.testing.assert_allclose(jac, expected, rtol=tol, atol=tol, err_msg=f.__name__)


def interior(n: int, seed: int, c: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit_rows(rng.standard_normal((n, D))) * rng.uniform(0.05, 0.9, (n, 1)) / np.sqrt(c)


@pytest.mark.parametrize("name", sorted(set(GRAD_CASES) - {"project", "mobius_matvec_near_zero"}))
def test_gradients_match_finite_differences(name):
    """float64 at interior points: reverse and forward mode against central differences, d/dc included."""
    f = GRAD_CASES[name]
    rng = np.random.default_rng(0)
    args = (interior(3, 0, 0.8)[None], interior(3, 1, 0.8)[None], np.full((1, 3, 1), 0.8))
    direction = tuple(rng.standard_normal(a.shape) for a in args)
    h = 1e-6
    with jax.enable_x64(True):
        g = lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
        grads = [np.asarray(gr) for gr in jax.jit(jax.grad(g, argnums=(0, 1, 2)))(*args)]
        jvp = jax.jit(lambda a: jax.jvp(g, a, direction))  # (value, forward-mode derivative)
        forward = float(jvp(args)[1])
        plus = float(jvp(tuple(a + h * u for a, u in zip(args, direction, strict=True)))[0])
        minus = float(jvp(tuple(a - h * u for a, u in zip(args, direction, strict=True)))[0])
    numeric = (plus - minus) / (2 * h)
    reverse = sum(np.sum(gr * u) for gr, u in zip(grads, direction, strict=True))
    np.testing.assert_allclose(reverse, numeric, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(forward, numeric, rtol=1e-6, atol=1e-8)


# ---- structure: jit, vmap, broadcasting, dtypes, projection -----------------------------------------------


def test_jit_vmap_and_per_row_curvature():
    c = np.array([0.1, 1.0, 4.0], np.float32)[:, None]
    x, y = (interior(3, 0, 1.0) / np.sqrt(c)).astype(np.float32), interior(3, 1, 4.0).astype(np.float32)
    for name in ("mobius_add", "expmap", "logmap", "distance"):
        f = getattr(P, name)
        np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, y, c), F[name](x, y, c), rtol=1e-6, atol=1e-7)
    grads = jax.jit(jax.vmap(jax.grad(P.distance, argnums=2)))(x, y, c)
    assert grads.shape == (3, 1) and np.isfinite(grads).all()


def test_per_head_curvature_broadcasts():
    h, n, m = 3, 4, 5
    c = np.array([0.2, 1.0, 3.0], np.float32)[:, None, None]
    q = interior(h * n, 0, 3.0).reshape(h, n, D).astype(np.float32)
    k = interior(h * m, 1, 3.0).reshape(h, m, D).astype(np.float32)
    a = np.random.default_rng(2).uniform(size=(h, n, m)).astype(np.float32)
    add, pair = F["mobius_add"](q, q, c), F["pairwise_distance"](q, k, c)
    mid = F["gyromidpoint"](k[:, None], a, c[..., None])  # attention over values: (h, n, D)
    assert pair.shape == (h, n, m) and mid.shape == (h, n, D)
    for i in range(h):
        ci = c[i, 0, 0]
        np.testing.assert_allclose(add[i], F["mobius_add"](q[i], q[i], ci), rtol=1e-6)
        full = F["distance"](q[i, :, None], k[i, None], ci)
        np.testing.assert_allclose(pair[i], full, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(mid[i], F["gyromidpoint"](k[i][None], a[i], ci), rtol=1e-5, atol=1e-6)


def test_gyromidpoint_axis_and_errors():
    x = interior(12, 0, 1.0).reshape(3, 4, D).astype(np.float32)
    w = np.random.default_rng(1).uniform(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        F["gyromidpoint"](np.moveaxis(x, 1, 0), w.T, 1.0, axis=0), F["gyromidpoint"](x, w, 1.0), rtol=1e-6
    )
    np.testing.assert_array_equal(F["gyromidpoint"](x, np.zeros((3, 4), np.float32), 1.0), 0.0)
    with pytest.raises(ValueError, match="other than the last"):
        P.gyromidpoint(x, w, 1.0, axis=-1)
    with pytest.raises(ValueError, match="size 1 along the points axis"):
        P.gyromidpoint(x, w, np.ones((4, 1), np.float32))


def test_project_limits_and_dtypes():
    x = np.array([[3.0, 4.0], [0.1, 0.0], [0.0, 0.0]])
    for dtype, eps in ((np.float32, 4e-3), (np.float64, 1e-5)):
        with x64(dtype):
            out = np.asarray(P.project(x.astype(dtype), dtype(4.0)))
            assert out.dtype == dtype
            assert P.max_norm(4.0, dtype) == pytest.approx((1 - eps) / 2, rel=1e-7)
        np.testing.assert_allclose(np.linalg.norm(out[0]), (1 - eps) / 2, rtol=1e-7)
        np.testing.assert_allclose(out[0] / np.linalg.norm(out[0]), [0.6, 0.8], rtol=1e-6)
        np.testing.assert_array_equal(out[1:], x[1:].astype(dtype))
    assert P.expmap0(jnp.ones(3, jnp.bfloat16), 1.0).dtype == jnp.float32
    assert P.distance(np.zeros(3, np.float32), np.ones(3, np.float32), np.float64(2.0)).dtype == jnp.float32
    assert P.mobius_neg(np.ones(2, np.float32)).tolist() == [-1.0, -1.0]

"""Poincaré-ball maps and Möbius operations (curvature −c, ball of radius 1/√c), numerically safe in float32.

Conventions. Points and tangent vectors lie on the last axis; leading axes broadcast. `c` > 0 is a scalar
or an array broadcastable against `x[..., :1]` (one curvature per head: shape (H, 1, 1) for x of shape
(H, n, d)); it may be traced and learnt: every function is differentiable in it. Inputs are promoted to at
least float32, c is cast to their dtype. Everything is pure and jit/vmap/grad-safe. Below,
b_x = 1 − c‖x‖² = 2/λ_x.

Safety.
* Every point argument is projected onto the ball first (a point left outside when c grew, or one on the
  boundary, still gives finite values and gradients), and every point result is projected: max norm
  (1 − ε)/√c, ε = 4e-3 in float32, 1e-5 in float64 (geoopt's convention; see `max_norm`).
* Norms use the "double where": where ‖x‖² ≤ floor², the norm is a constant (the floor, or 0 for distances)
  and no gradient flows through the square root, so gradients at 0 are finite and exact. The floor is 1e-15
  in float64 and 1e-10 in float32: there, ratios such as tanh(√c‖v‖)/(√c‖v‖) equal their limit 1 to working
  precision for any c < 1e10, and their backward pass, which divides by (√c·floor)², stays finite for
  c > 1e-18 (a float32 floor of 1e-15 would overflow for c below about 1e-8).
* artanh arguments are clamped to ≤ 1 − machine epsilon.

Stable forms (equal to the textbook formulas, better conditioned near the boundary, where float32 loses most):
* x ⊕ y = [(1 + 2c⟨x,y⟩ + c‖y‖²) x + b_x y] / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖²) is evaluated as
  (b_x s + c‖s‖² x) / (b_x b_y + c‖s‖²) with s = x + y: the denominator is a sum of non-negative terms and
  no longer cancels (to 0.3 % in float32) for nearby points on the boundary.
* distance 2/√c · artanh(√c‖(−x) ⊕ y‖) is evaluated as 2/√c · asinh(w), w = √c‖x − y‖ / √(b_x b_y), the
  same number (c‖(−x) ⊕ y‖² = w² / (1 + w²)): artanh next to 1 would amplify float32 rounding up to
  1/(1 − σ²) ≈ 6e4 times for far-apart points at the projection limit; asinh does not.
* logmap(x, y) = b_x · asinh(w) √(1 + w²) / w · ((−x) ⊕ y) with the same w: λ_x‖logmap(x, y)‖ = distance.
* ½ ⊗ y = y / (1 + √(1 − c‖y‖²)) in the midpoint (no artanh).

Accuracy. In float32 each map is as accurate as its inputs allow: against float64 references of the textbook
formulas, for points anywhere up to the projection limit and c in [0.05, 5], the error (Euclidean norm of
the difference; absolute for distances) is ≤ 16·eps·Λ/√c, observed ≤ 5·eps·Λ/√c, where eps = 2⁻²³ and Λ is
the largest conformal factor among the inputs and the result (2 at the origin, 250 at the float32 limit,
where one ulp of a point moves a distance by ~λ·eps/√c): 4e-6/√c near the origin, 5e-4/√c at the limit.
conformal_factor: relative error ≤ 16·eps·λ. Round trips (log∘exp, left cancellation) stay within
16·eps·Λ²/√c. float64 is held to the same bounds with eps = 2⁻⁵² (plus its float64 reference's own error,
eps·Λ², near float64's limit). Asserted in tests/kernels/test_poincare.py.
pairwise_distance trades accuracy for nearby pairs for speed: see its docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "conformal_factor",
    "distance",
    "expmap",
    "expmap0",
    "gyromidpoint",
    "logmap",
    "logmap0",
    "max_norm",
    "mobius_add",
    "mobius_matvec",
    "mobius_neg",
    "mobius_scalar_mul",
    "pairwise_distance",
    "project",
]


def _ball_eps(dtype: jnp.dtype) -> float:
    """Relative margin ε of the projection: max norm (1 − ε)/√c."""
    return 1e-5 if dtype == jnp.float64 else 4e-3


def _norm_floor(dtype: jnp.dtype) -> float:
    """Smallest norm used as a divisor (module docstring: Safety)."""
    return 1e-15 if dtype == jnp.float64 else 1e-10


def _prepare(c: ArrayLike, *arrays: ArrayLike) -> tuple[jax.Array, ...]:
    """c and the arrays cast to the arrays' common dtype, at least float32."""
    arrays = tuple(jnp.asarray(a) for a in arrays)
    dtype = jnp.result_type(jnp.float32, *arrays)
    return jnp.asarray(c).astype(dtype), *(a.astype(dtype) for a in arrays)


def _safe_sqrt(sq: jax.Array, fill: float) -> jax.Array:
    """√sq where sq > floor², else the constant `fill`; the gradient is finite everywhere (0 below)."""
    floor = _norm_floor(sq.dtype)
    ok = sq > floor * floor
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), fill)


def _norm(x: jax.Array, fill: float | None = None) -> jax.Array:
    """‖x‖ over the last axis, kept as a length-1 axis; below the floor it is `fill` (default: the floor)."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return _safe_sqrt(sq, _norm_floor(x.dtype) if fill is None else fill)


def _artanh(t: jax.Array) -> jax.Array:
    """artanh(t) for 0 ≤ t, clamped to t ≤ 1 − machine epsilon."""
    return jnp.arctanh(jnp.minimum(t, 1.0 - jnp.finfo(t.dtype).eps))


def _project(x: jax.Array, c: jax.Array) -> jax.Array:
    n = _norm(x)
    limit = (1.0 - _ball_eps(x.dtype)) / jnp.sqrt(c)
    return jnp.where(n > limit, x * (limit / n), x)


def _add(x: jax.Array, y: jax.Array, c: jax.Array) -> jax.Array:
    """x ⊕ y of points inside the ball as (b_x s + c‖s‖² x) / (b_x b_y + c‖s‖²), s = x + y; not projected."""
    s = x + y
    bx = 1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True)
    by = 1.0 - c * jnp.sum(y * y, axis=-1, keepdims=True)
    cs = c * jnp.sum(s * s, axis=-1, keepdims=True)
    return (bx * s + cs * x) / (bx * by + cs)


def max_norm(c: ArrayLike, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Largest norm a projected point of `dtype` has: (1 − ε)/√c, ε = 4e-3 (float32) or 1e-5 (float64)."""
    dtype = jnp.promote_types(dtype, jnp.float32)
    return (1.0 - _ball_eps(dtype)) / jnp.sqrt(jnp.asarray(c).astype(dtype))


def project(x: ArrayLike, c: ArrayLike) -> jax.Array:
    """x (..., d) pulled radially into the ball of norm ≤ `max_norm(c)`; points inside are unchanged."""
    c, x = _prepare(c, x)
    return _project(x, c)


def expmap0(v: ArrayLike, c: ArrayLike) -> jax.Array:
    """exp₀(v) = tanh(√c‖v‖) v / (√c‖v‖): tangent vector v (..., d) at the origin → point (..., d)."""
    c, v = _prepare(c, v)
    t = jnp.sqrt(c) * _norm(v)
    return _project(jnp.tanh(t) / t * v, c)


def logmap0(y: ArrayLike, c: ArrayLike) -> jax.Array:
    """log₀(y) = artanh(√c‖y‖) y / (√c‖y‖): point y (..., d) → tangent vector at the origin (..., d)."""
    c, y = _prepare(c, y)
    y = _project(y, c)
    t = jnp.sqrt(c) * _norm(y)
    return _artanh(t) / t * y


def mobius_neg(x: ArrayLike) -> jax.Array:
    """⊖x = −x, the Möbius inverse: (−x) ⊕ x = 0."""
    return -jnp.asarray(x)


def mobius_add(x: ArrayLike, y: ArrayLike, c: ArrayLike) -> jax.Array:
    """x ⊕ y = [(1 + 2c⟨x,y⟩ + c‖y‖²) x + (1 − c‖x‖²) y] / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖²), points (..., d).

    Evaluated in the stable form of the module docstring. Not commutative; (−x) ⊕ (x ⊕ y) = y.
    """
    c, x, y = _prepare(c, x, y)
    return _project(_add(_project(x, c), _project(y, c), c), c)


def expmap(x: ArrayLike, v: ArrayLike, c: ArrayLike) -> jax.Array:
    """expₓ(v) = x ⊕ (tanh(√c λ_x‖v‖/2) v / (√c‖v‖)), λ_x = 2/(1 − c‖x‖²): tangent v (..., d) at x → point."""
    c, x, v = _prepare(c, x, v)
    x = _project(x, c)
    sqrt_c = jnp.sqrt(c)
    bx = 1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True)
    n = _norm(v)
    step = jnp.tanh(sqrt_c * n / bx) / (sqrt_c * n) * v
    return _project(_add(x, step, c), c)


def logmap(x: ArrayLike, y: ArrayLike, c: ArrayLike) -> jax.Array:
    """logₓ(y) = 2/(√c λ_x) · artanh(√c‖u‖) u/‖u‖, u = (−x) ⊕ y: point y (..., d) → tangent vector at x.

    Evaluated as b_x · asinh(w) √(1 + w²)/w · u with w = √c‖x − y‖/√(b_x b_y) (module docstring).
    """
    c, x, y = _prepare(c, x, y)
    x, y = _project(x, c), _project(y, c)
    bx = 1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True)
    by = 1.0 - c * jnp.sum(y * y, axis=-1, keepdims=True)
    w = jnp.sqrt(c) * _norm(y - x) / jnp.sqrt(bx * by)
    return bx * (jnp.arcsinh(w) * jnp.sqrt(1.0 + w * w) / w) * _add(-x, y, c)


def distance(x: ArrayLike, y: ArrayLike, c: ArrayLike) -> jax.Array:
    """d(x, y) = 2/√c · artanh(√c‖(−x) ⊕ y‖) = 2/√c · asinh(√c‖x − y‖ / √(b_x b_y)): points (..., d) → (...).

    d(x, x) = 0, exactly unless x lies beyond the limit and XLA rounds its two projections differently (then
    a few λ·eps/√c); the gradient at x = y is 0 (d is not differentiable there).
    """
    c, x, y = _prepare(c, x, y)
    x, y = _project(x, c), _project(y, c)
    sqrt_c = jnp.sqrt(c)
    bx = 1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True)
    by = 1.0 - c * jnp.sum(y * y, axis=-1, keepdims=True)
    w = sqrt_c * _norm(y - x, fill=0.0) / jnp.sqrt(bx * by)
    return (2.0 * jnp.arcsinh(w) / sqrt_c)[..., 0]


def pairwise_distance(q: ArrayLike, k: ArrayLike, c: ArrayLike) -> jax.Array:
    """All distances between q (..., n, d) and k (..., m, d) → (..., n, m); c broadcastable to (..., 1, 1).

    d = 2/√c · asinh(√c‖q − k‖ / √(b_q b_k)) with ‖q − k‖² = ‖q‖² + ‖k‖² − 2⟨q, k⟩ from one matmul, so no
    (n, m, d) intermediate. The expansion cancels for nearby pairs: its absolute error is a few
    eps·(‖q‖² + ‖k‖²), so |error| ≲ 2·√(4·eps·(c‖q‖² + c‖k‖²) / (b_q b_k)) / √c on top of `distance`'s:
    in float32 about 3e-3/√c for nearby points at norm 0.7/√c and 0.25/√c for (nearly) coincident points at
    the projection limit, shrinking as pairs separate. For exact small distances use
    `distance(q[..., :, None, :], k[..., None, :, :], c)`, which materializes the differences.
    """
    c, q, k = _prepare(c, q, k)
    q, k = _project(q, c), _project(k, c)
    sqrt_c = jnp.sqrt(c)
    qq = jnp.sum(q * q, axis=-1, keepdims=True)
    kk = jnp.swapaxes(jnp.sum(k * k, axis=-1, keepdims=True), -1, -2)
    sq = jnp.maximum(qq + kk - 2.0 * jnp.einsum("...nd,...md->...nm", q, k), 0.0)
    w = sqrt_c * _safe_sqrt(sq, 0.0) / jnp.sqrt((1.0 - c * qq) * (1.0 - c * kk))
    return 2.0 * jnp.arcsinh(w) / sqrt_c


def conformal_factor(x: ArrayLike, c: ArrayLike) -> jax.Array:
    """λ_x = 2 / (1 − c‖x‖²): points (..., d) → (...)."""
    c, x = _prepare(c, x)
    x = _project(x, c)
    return (2.0 / (1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True)))[..., 0]


def mobius_scalar_mul(r: ArrayLike, x: ArrayLike, c: ArrayLike) -> jax.Array:
    """r ⊗ x = tanh(r · artanh(√c‖x‖)) x / (√c‖x‖): r scalar or broadcastable to x[..., :1], x (..., d)."""
    c, x, r = _prepare(c, x, r)
    x = _project(x, c)
    t = jnp.sqrt(c) * _norm(x)
    return _project(jnp.tanh(r * _artanh(t)) / t * x, c)


def mobius_matvec(m: ArrayLike, x: ArrayLike, c: ArrayLike) -> jax.Array:
    """M ⊗ x = tanh(‖Mx‖/‖x‖ · artanh(√c‖x‖)) Mx / (√c‖Mx‖), m (d_out, d_in), x (..., d_in) → (..., d_out).

    Mx = 0 (M = 0, x = 0, x in M's kernel) gives 0, with finite gradients (floored norms, no special case).
    """
    c, x, m = _prepare(c, x, m)
    x = _project(x, c)
    mx = jnp.einsum("...i,oi->...o", x, m)
    sqrt_c = jnp.sqrt(c)
    x_norm, mx_norm = _norm(x), _norm(mx)
    scale = jnp.tanh(mx_norm / x_norm * _artanh(sqrt_c * x_norm)) / (sqrt_c * mx_norm)
    return _project(scale * mx, c)


def gyromidpoint(x: ArrayLike, weights: ArrayLike, c: ArrayLike, axis: int = -2) -> jax.Array:
    """Weighted Möbius gyromidpoint m = ½ ⊗ (Σᵢ wᵢ λᵢ xᵢ / Σᵢ wᵢ (λᵢ − 1)) of the points of x along `axis`.

    x: (..., k, d) for axis=-2 (`axis` is any axis but the last); weights ≥ 0, not all 0, broadcastable to
    x.shape[:-1]; c broadcastable to x[..., :1] with size 1 along `axis`. Returns x's shape without `axis`.
    The sums are one einsum, so attention over values v (..., m, d) with probabilities a (..., n, m) is
    `gyromidpoint(v[..., None, :, :], a, c)` → (..., n, d): a batched matmul, no (n, m, d) intermediate.
    The inner quotient is a convex combination of the points 2 ⊗ xᵢ, hence inside the ball; ½ ⊗ y is evaluated
    as y / (1 + √(1 − c‖y‖²)).
    """
    c, x, w = _prepare(c, x, weights)
    ax = axis if axis < 0 else axis - x.ndim
    if not -x.ndim <= ax <= -2:
        raise ValueError(f"gyromidpoint: axis {axis} must be an axis of x {x.shape} other than the last")
    c_nd = c.reshape((1,) * max(0, -ax - c.ndim) + c.shape)
    if c_nd.shape[ax] != 1:
        raise ValueError(f"gyromidpoint: c {c.shape} must have size 1 along the points axis {axis}")
    x = _project(x, c)
    lam = 2.0 / (1.0 - c * jnp.sum(x * x, axis=-1, keepdims=True))
    lam_x = jnp.moveaxis(lam * x, ax, -2)
    lam_1 = jnp.moveaxis(lam - 1.0, ax, -2)[..., 0]
    w = w.reshape((1,) * max(0, -ax - 1 - w.ndim) + w.shape)
    w = jnp.moveaxis(w, ax + 1, -1)
    w = jnp.broadcast_to(w, (*w.shape[:-1], lam_1.shape[-1]))
    num = jnp.einsum("...k,...kd->...d", w, lam_x)
    den = jnp.einsum("...k,...k->...", w, lam_1)[..., None]
    y = num / jnp.maximum(den, jnp.finfo(x.dtype).tiny)
    c_out = jnp.squeeze(c_nd, ax)
    half = y / (1.0 + _safe_sqrt(1.0 - c_out * jnp.sum(y * y, axis=-1, keepdims=True), 0.0))
    return _project(half, c_out)

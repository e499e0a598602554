"""Gradient statistics and non-finite step skipping as optax transformations.

``gradient_stats`` passes updates through and records their global norm, how many of their elements are not finite,
and, given a threshold, how often the norm exceeded it; ``clip_and_record`` also clips to that threshold.
``skip_nonfinite`` wraps an optimizer so that a step whose gradients (or loss) are NaN/inf changes nothing.

``optax.apply_if_finite`` is close to ``skip_nonfinite`` but does not look at the loss and gives up (applies the
non-finite update) after ``max_consecutive_errors`` bad steps in a row; ``skip_nonfinite`` never applies one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GradientStatsState(NamedTuple):
    """Statistics of the latest updates and counters over all steps."""

    global_norm: jax.Array  # float32: global norm of the latest incoming updates
    nonfinite: jax.Array  # int32: NaN/inf elements in the latest incoming updates
    nonfinite_steps: jax.Array  # int32: steps whose updates had a NaN/inf element
    clip_scale: jax.Array  # float32: factor that clipping to the threshold applies (1 when within it)
    clipped_steps: jax.Array  # int32: steps whose global norm exceeded the threshold
    count: jax.Array  # int32: steps seen

    @property
    def clip_fraction(self) -> jax.Array:
        """Fraction of the steps seen whose global norm exceeded the threshold."""
        return self.clipped_steps / jnp.maximum(self.count, 1)


def _stats(max_norm: float | None, clip: bool) -> optax.GradientTransformation:
    def init_fn(params: optax.Params) -> GradientStatsState:
        del params
        zero = jnp.zeros((), jnp.int32)
        return GradientStatsState(jnp.zeros((), jnp.float32), zero, zero, jnp.ones((), jnp.float32), zero, zero)

    def update_fn(
        updates: optax.Updates, state: GradientStatsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, GradientStatsState]:
        del params
        norm = optax.tree.norm(updates).astype(jnp.float32)
        nonfinite = sum((jnp.sum(~jnp.isfinite(u)) for u in jax.tree.leaves(updates)), jnp.zeros((), jnp.int32))
        if max_norm is None:
            exceeded, scale = jnp.asarray(False), jnp.ones((), jnp.float32)
        else:
            exceeded = norm > max_norm
            scale = jnp.where(exceeded, max_norm / norm, 1.0).astype(jnp.float32)
        if clip:
            updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        return updates, GradientStatsState(
            global_norm=norm,
            nonfinite=nonfinite.astype(jnp.int32),
            nonfinite_steps=state.nonfinite_steps + (nonfinite > 0),
            clip_scale=scale,
            clipped_steps=state.clipped_steps + exceeded,
            count=optax.safe_increment(state.count),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def gradient_stats(max_norm: float | None = None) -> optax.GradientTransformation:
    """Identity transformation recording gradient statistics; with ``max_norm``, also how often it is exceeded."""
    return _stats(max_norm, clip=False)


def clip_and_record(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm(max_norm)`` that also records :class:`GradientStatsState`."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    return _stats(max_norm, clip=True)


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`."""

    skipped_steps: jax.Array  # int32: steps skipped because a gradient or the loss was NaN/inf
    inner_state: optax.OptState


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Skips steps with a non-finite gradient, or loss when one is passed as the ``loss`` extra argument.

    A skipped step returns all-zero updates, leaves ``inner``'s state unchanged and increments ``skipped_steps``.
    Extra arguments are passed on to ``inner``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipNonfiniteState:
        return SkipNonfiniteState(jnp.zeros((), jnp.int32), inner.init(params))

    def update_fn(
        updates: optax.Updates, state: SkipNonfiniteState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, SkipNonfiniteState]:
        finite = jnp.asarray(True)
        for x in [*jax.tree.leaves(updates), *([extra_args["loss"]] if "loss" in extra_args else [])]:
            finite &= jnp.all(jnp.isfinite(x))
        new_updates, inner_state = jax.lax.cond(
            finite,
            lambda: inner.update(updates, state.inner_state, params, **extra_args),
            lambda: (optax.tree.zeros_like(updates), state.inner_state),
        )
        return new_updates, SkipNonfiniteState(state.skipped_steps + (~finite).astype(jnp.int32), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

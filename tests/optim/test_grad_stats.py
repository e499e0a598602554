from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hyperjax.optim import clip_and_record, gradient_stats, q_controller, skip_nonfinite

PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
GRADS = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}  # global norm 5
NAN_GRADS = {"w": jnp.array([jnp.nan, jnp.inf]), "b": jnp.array(1.0)}


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gradient_stats_records_and_passes_through():
    tx = gradient_stats(max_norm=4.0)
    state = tx.init(PARAMS)
    updates, state = tx.update(GRADS, state)
    _assert_trees_equal(updates, GRADS)
    np.testing.assert_allclose(state.global_norm, 5.0)
    np.testing.assert_allclose(state.clip_scale, 0.8)
    assert (int(state.clipped_steps), int(state.count), int(state.nonfinite)) == (1, 1, 0)
    _, state = jax.jit(tx.update)(NAN_GRADS, state)
    assert (int(state.nonfinite), int(state.nonfinite_steps), int(state.count)) == (2, 1, 2)
    _, state = tx.update(jax.tree.map(lambda g: 0.1 * g, GRADS), state)
    assert int(state.clipped_steps) == 1
    np.testing.assert_allclose(state.clip_fraction, 1 / 3)
    assert int(gradient_stats().update(GRADS, gradient_stats().init(PARAMS))[1].clipped_steps) == 0


def test_clip_and_record_matches_optax():
    tx = clip_and_record(1.0)
    reference = optax.clip_by_global_norm(1.0)
    state = tx.init(PARAMS)
    for grads in (GRADS, jax.tree.map(lambda g: 0.1 * g, GRADS), GRADS):
        updates, state = tx.update(grads, state)
        expected, _ = reference.update(grads, reference.init(PARAMS))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
    assert (int(state.clipped_steps), int(state.count)) == (2, 3)
    np.testing.assert_allclose(state.clip_fraction, 2 / 3)


def test_skip_nonfinite_changes_nothing_but_counters():
    tx = optax.chain(gradient_stats(), skip_nonfinite(optax.chain(clip_and_record(1.0), q_controller(0.1))))
    step = jax.jit(tx.update)
    state = tx.init(PARAMS)
    _, state = step(GRADS, state, PARAMS, loss=2.0)
    inner_before = state[1].inner_state

    updates, state = step(NAN_GRADS, state, PARAMS, loss=1.5)
    _assert_trees_equal(optax.apply_updates(PARAMS, updates), PARAMS)
    _assert_trees_equal(state[1].inner_state, inner_before)
    assert int(state[1].skipped_steps) == 1
    assert (int(state[0].nonfinite_steps), int(state[0].count)) == (1, 2)

    updates, state = step(GRADS, state, PARAMS, loss=jnp.nan)  # a non-finite loss is skipped too
    _assert_trees_equal(jax.tree.map(jnp.zeros_like, PARAMS), updates)
    _assert_trees_equal(state[1].inner_state, inner_before)
    assert int(state[1].skipped_steps) == 2

    updates, state = step(GRADS, state, PARAMS, loss=1.0)
    assert int(state[1].skipped_steps) == 2
    assert int(state[1].inner_state[1].count) == 2
    assert float(updates["b"]) != 0.0


def test_skip_nonfinite_without_loss():
    tx = skip_nonfinite(optax.sgd(0.1, momentum=0.9))
    state = tx.init(PARAMS)
    updates, state = tx.update(NAN_GRADS, state, PARAMS)
    _assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    _assert_trees_equal(state.inner_state, tx.init(PARAMS).inner_state)
    updates, state = tx.update(GRADS, state, PARAMS)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * g), updates, GRADS)
    assert int(state.skipped_steps) == 1

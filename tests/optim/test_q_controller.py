from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from hyperjax.optim import QControllerState, controller_hyperparams, q_controller
from hyperjax.optim.q_controller import KEEP_ACTION, NUM_ACTIONS

PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
# Global norm 0.5: gradient-norm bin 2 (between edges 0.1 and 1), below the large-gradient threshold.
GRADS = {"w": jnp.array([0.3, 0.0]), "b": jnp.array(0.4)}
# Observation on the first step with defaults: flat trend, grad bin 2, no oscillation, LR and momentum at their base
# values (scale 1: bin 2).
FIRST_OBS = (2, 2, 0, 2, 2)


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _with_table(state: QControllerState, entries: dict[tuple[int, ...], float]) -> QControllerState:
    q = state.q_table
    for index, value in entries.items():
        q = q.at[index].set(value)
    return state._replace(q_table=q)


def test_greedy_action_follows_q_table():
    tx = q_controller(0.1, 0.9, epsilon=0.0)
    action = 4 * 5 + 0  # LR × 1.1, momentum × 0.95
    state = _with_table(tx.init(PARAMS), {(*FIRST_OBS, action): 0.5, (0, 0, 0, 0, 0, 3): 9.0})
    updates, state = tx.update(GRADS, state, PARAMS, loss=1.0)
    assert tuple(state.observation.tolist()) == FIRST_OBS
    assert int(state.action) == action
    np.testing.assert_allclose(state.learning_rate, 0.11, rtol=1e-6)
    np.testing.assert_allclose(state.momentum, 0.855, rtol=1e-6)
    np.testing.assert_allclose(state.inner_state.hyperparams["learning_rate"], 0.11, rtol=1e-6)
    np.testing.assert_allclose(state.inner_state.hyperparams["momentum"], 0.855, rtol=1e-6)
    # First SGD-momentum step: the trace is the gradient itself.
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.11 * g, rtol=1e-6), updates, GRADS)
    assert controller_hyperparams(state)["action"] == action


def test_scales_apply_to_base_values_and_never_compound():
    tx = q_controller(0.1, 0.9, epsilon=0.0)
    step = jax.jit(tx.update)
    state = tx.init(PARAMS)
    state = state._replace(q_table=state.q_table.at[..., NUM_ACTIONS - 1].set(1.0))  # LR × 1.1, momentum × 1.02
    for _ in range(60):
        _, state = step(GRADS, state, PARAMS, loss=1.0)
    np.testing.assert_allclose(state.learning_rate, 0.11, rtol=1e-6)
    np.testing.assert_allclose(state.momentum, 0.918, rtol=1e-6)
    assert tuple(state.observation[3:].tolist()) == (4, 4)  # the bins name the scales in effect
    state = state._replace(q_table=jnp.zeros_like(state.q_table).at[..., 0].set(1.0))  # LR × 0.9, momentum × 0.95
    for _ in range(60):
        _, state = step(GRADS, state, PARAMS, loss=1.0)
    np.testing.assert_allclose(state.learning_rate, 0.09, rtol=1e-6)
    np.testing.assert_allclose(state.momentum, 0.855, rtol=1e-6)
    assert tuple(state.observation[3:].tolist()) == (0, 0)
    high = q_controller(0.1, 0.99, epsilon=0.0)
    state = high.init(PARAMS)
    _, state = high.update(GRADS, state._replace(q_table=state.q_table.at[..., 4].set(1.0)), PARAMS, loss=1.0)
    np.testing.assert_allclose(state.momentum, 0.999, rtol=1e-6)  # 0.99 × 1.02 capped at MAX_MOMENTUM


def test_ties_keep_the_base_values():
    tx = q_controller(0.1, 0.9, epsilon=0.0, seed=5)
    state = tx.init(PARAMS)
    for _ in range(20):  # a flat loss earns 0: the table stays all zeros, every row a tie
        _, state = tx.update(GRADS, state, PARAMS, loss=1.0)
        assert int(state.action) == KEEP_ACTION
    state = state._replace(q_table=state.q_table.at[..., KEEP_ACTION].set(-1.0))  # keeping is worse: a random tie
    actions = set()
    for _ in range(20):
        _, state = tx.update(GRADS, state, PARAMS, loss=1.0)
        actions.add(int(state.action))
    assert KEEP_ACTION not in actions and len(actions) > 3


def test_reward_on_hand_made_losses():
    tx = q_controller(0.1, 0.9, epsilon=0.0)
    state = tx.init(PARAMS)
    big = jax.tree.map(lambda g: 100.0 * g, GRADS)  # norm 50 > 10: large-gradient penalty
    # Window of 5 losses; the oscillation flag needs at least 2 sign flips among the 3 pairs of differences.
    steps = [
        (1.0, GRADS, 0.0),
        (0.9, GRADS, math.tanh(10 * 0.1)),
        (0.95, GRADS, math.tanh(10 * -0.05 / 0.9)),  # one flip: no oscillation
        (0.8, GRADS, math.tanh(10 * 0.15 / 0.95) - 0.1),  # two flips: oscillating
        (0.85, GRADS, math.tanh(10 * -0.05 / 0.8) - 0.1),
        (0.85, big, -0.2 - 0.1),
    ]
    for loss, grads, expected in steps:
        _, state = tx.update(grads, state, PARAMS, loss=loss)
        np.testing.assert_allclose(state.reward, expected, rtol=1e-5, atol=1e-6)


def test_q_update_rule():
    tx = q_controller(0.1, 0.9, epsilon=0.0, q_learning_rate=0.01, discount=0.95)
    keep = 12  # LR × 1, momentum × 1: bins stay put
    second_obs = (0, 2, 0, 2, 2)  # loss fell by 10 %: trend bin 0
    state = _with_table(tx.init(PARAMS), {(*FIRST_OBS, keep): 0.3, (*second_obs, 7): 0.5, (*second_obs, 3): -0.2})
    _, state = tx.update(GRADS, state, PARAMS, loss=1.0)
    assert int(state.action) == keep
    before = np.asarray(state.q_table)
    _, state = tx.update(GRADS, state, PARAMS, loss=0.9)
    assert tuple(state.observation.tolist()) == second_obs
    assert int(state.action) == 7
    expected = before.copy()
    expected[(*FIRST_OBS, keep)] = 0.3 + 0.01 * (math.tanh(1.0) + 0.95 * 0.5 - 0.3)
    np.testing.assert_allclose(np.asarray(state.q_table), expected, rtol=1e-6)


def _run(tx: optax.GradientTransformationExtraArgs, steps: int = 20) -> QControllerState:
    state = tx.init(PARAMS)
    for i in range(steps):
        _, state = tx.update(GRADS, state, PARAMS, loss=1.0 / (1 + i) + 0.1 * (i % 3))
    return state


def test_deterministic_for_seed():
    a = _run(q_controller(0.1, seed=3, epsilon=0.5))
    b = _run(q_controller(0.1, seed=3, epsilon=0.5))
    c = _run(q_controller(0.1, seed=4, epsilon=0.5))
    _assert_trees_equal(a, b)
    assert not np.array_equal(a.key, c.key)
    assert not np.array_equal(a.q_table, c.q_table)


def test_jit_matches_eager():
    tx = q_controller(0.05)
    state = tx.init(PARAMS)
    eager_updates, eager_state = tx.update(GRADS, state, PARAMS, loss=2.0)
    jit_updates, jit_state = jax.jit(tx.update)(GRADS, state, PARAMS, loss=jnp.asarray(2.0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), (eager_updates, eager_state), (jit_updates, jit_state)
    )


def test_state_round_trips(tmp_path):
    tx = q_controller(0.1)
    state = _run(tx, steps=5)
    leaves, treedef = jax.tree.flatten(state)
    _assert_trees_equal(jax.tree.unflatten(treedef, leaves), state)

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "opt", state)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    _assert_trees_equal(restored, state)
    # The restored state continues exactly like the original.
    _assert_trees_equal(tx.update(GRADS, restored, PARAMS, loss=0.5), tx.update(GRADS, state, PARAMS, loss=0.5))


def test_composes_with_chain_and_clipping():
    tx = optax.chain(optax.clip_by_global_norm(0.1), q_controller(0.1, epsilon=0.0))
    state = tx.init(PARAMS)
    q_state = state[1]._replace(q_table=state[1].q_table.at[..., 12].set(1.0))
    updates, state = jax.jit(tx.update)(GRADS, (state[0], q_state), PARAMS, loss=1.0)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * 0.2 * g, rtol=1e-5), updates, GRADS)
    assert int(state[1].count) == 1
    np.testing.assert_allclose(state[1].loss_history, 1.0)  # the loss reached the controller through the chain
    np.testing.assert_allclose(controller_hyperparams(state)["learning_rate"], 0.1)
    with pytest.raises(TypeError, match="loss"):
        tx.update(GRADS, state, PARAMS)


def test_controls_b1_of_injected_adam():
    tx = q_controller(1e-3, 0.9, inner=optax.inject_hyperparams(optax.adam)(learning_rate=0.5, b1=0.8), epsilon=0.0)
    state = tx.init(PARAMS)
    assert float(state.inner_state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
    assert float(state.inner_state.hyperparams["b1"]) == pytest.approx(0.9)
    state = state._replace(q_table=state.q_table.at[..., 5 * 3 + 3].set(1.0))  # LR × 1.05, momentum × 1.01
    _, state = tx.update(GRADS, state, PARAMS, loss=1.0)
    np.testing.assert_allclose(state.inner_state.hyperparams["learning_rate"], 1.05e-3, rtol=1e-6)
    np.testing.assert_allclose(state.inner_state.hyperparams["b1"], 0.909, rtol=1e-6)


def test_without_momentum():
    tx = q_controller(0.1, None, epsilon=0.0)
    state = tx.init(PARAMS)
    assert "momentum" not in state.inner_state.hyperparams
    state = state._replace(q_table=state.q_table.at[..., 4].set(1.0))  # momentum × 1.02: no effect
    _, state = tx.update(GRADS, state, PARAMS, loss=1.0)
    assert float(state.momentum) == 0.0
    assert int(state.observation[4]) == 0


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="momentum"):
        q_controller(0.1, 0.9, inner=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)).init(PARAMS)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        q_controller(0.1, None, inner=optax.sgd(0.1)).init(PARAMS)
    with pytest.raises(ValueError, match="exactly one"):
        controller_hyperparams((optax.EmptyState(),))


def test_trains_linear_regression():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
    y = x @ jnp.array([1.5, -2.0, 0.5]) + 0.3

    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    tx = q_controller(0.05, 0.9, seed=1)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p, loss=loss)
        return optax.apply_updates(p, updates), s, loss

    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = tx.init(params)
    first = float(loss_fn(params))
    for _ in range(150):
        params, state, _ = step(params, state)
    assert float(loss_fn(params)) < 1e-3 * first
    assert int(state.count) == 150
    assert float(jnp.abs(state.q_table).sum()) > 0

"""A tabular Q-learning controller that tunes an optimizer's learning rate and momentum while it trains.

The controller is an ``optax.GradientTransformationExtraArgs``: it takes the training loss through optax's extra
arguments (``update(grads, state, params, loss=loss)``), keeps everything it learns (Q-table, loss window, PRNG key)
in its state as plain arrays, and composes with ``optax.chain``.

Each step it observes a discrete state

* loss trend: relative change ``(L_t - L_{t-w+1}) / |L_{t-w+1}|`` over the last ``window`` losses, binned at
  ``TREND_EDGES`` (bin 0: falling by more than 5 %, bin 4: rising by more than 5 %);
* gradient-norm bin: the global norm of the incoming updates binned at ``grad_norm_edges``;
* oscillation flag: at least half of the consecutive loss differences in the window change sign;
* LR bin: which of ``LR_SCALES`` is in effect (2 at the start: the base value);
* momentum bin: which of ``MOMENTUM_SCALES`` is in effect (always 0 when momentum is not controlled);

rewards the previous action with ``tanh(10 · (L_{t-1} - L_t) / |L_{t-1}|)``, minus ``GRAD_PENALTY`` when the gradient
norm exceeds the last gradient-norm edge and minus ``OSCILLATION_PENALTY`` when the loss oscillates, updates the
Q-table by one Q-learning step, and picks a joint action ε-greedily (ties go to the base values when they are
among the best, else to a random one). Action ``a = 5 · i + j`` sets the LR to ``LR_SCALES[i]`` and the momentum
to ``MOMENTUM_SCALES[j]`` times their base values (momentum at most ``MAX_MOMENTUM``). The new values are written
into the inner optimizer's injected hyperparameters before its update, so they take effect on the same step.

The scales apply to the base values, not to the values of the previous step. Compounded, they random-walk: a
single step's reward is mostly minibatch noise, so greedy choices are close to random, and the momentum scales are
not symmetric in log space (mean -0.8 % per step). On Tiny Shakespeare the compounding controller drove momentum
from 0.9 to the bottom of a 0.5×–1.1× range within 175 steps (`bench/train_shakespeare.py`, 2026-12-07).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

LR_SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)
MOMENTUM_SCALES = (0.95, 0.98, 1.0, 1.01, 1.02)
NUM_ACTIONS = len(LR_SCALES) * len(MOMENTUM_SCALES)
KEEP_ACTION = LR_SCALES.index(1.0) * len(MOMENTUM_SCALES) + MOMENTUM_SCALES.index(1.0)
TREND_EDGES = (-0.05, -0.005, 0.005, 0.05)
MAX_MOMENTUM = 0.999
REWARD_SCALE = 10.0
GRAD_PENALTY = 0.2
OSCILLATION_PENALTY = 0.1
_EPS = 1e-12


class QControllerState(NamedTuple):
    """State of :func:`q_controller`; every field is an array, so it jits and checkpoints as is."""

    q_table: jax.Array  # float32 [trend, grad-norm, oscillation, lr, momentum, action]
    observation: jax.Array  # int32 (5,): the discrete state in which `action` was taken
    action: jax.Array  # int32: the last joint action
    reward: jax.Array  # float32: the reward given to the action before `action` (0 on the first step)
    epsilon: jax.Array  # float32: the exploration rate used for `action`
    loss_history: jax.Array  # float32 (window,): the latest losses, newest last
    learning_rate: jax.Array  # float32: the learning rate used for the latest update
    momentum: jax.Array  # float32: the momentum used for the latest update (0 when not controlled)
    count: jax.Array  # int32: steps taken
    key: jax.Array  # uint32 (2,): PRNG key for exploration
    inner_state: optax.OptState


def q_controller(
    learning_rate: float,
    momentum: float | None = 0.9,
    *,
    seed: int = 0,
    inner: optax.GradientTransformation | None = None,
    epsilon: float | optax.Schedule | None = None,
    q_learning_rate: float = 0.01,
    discount: float = 0.95,
    window: int = 5,
    grad_norm_edges: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0),
) -> optax.GradientTransformationExtraArgs:
    """SGD with momentum whose learning rate and momentum are steered by tabular Q-learning.

    Args:
      learning_rate: base learning rate.
      momentum: base momentum (``None``: plain SGD, or leave ``inner``'s momentum alone).
      seed: seed of the exploration PRNG key.
      inner: an ``optax.inject_hyperparams``-built optimizer with a ``learning_rate`` hyperparameter and, when
        ``momentum`` is given, a ``momentum`` or ``b1`` one; defaults to
        ``optax.inject_hyperparams(optax.sgd)(learning_rate, momentum)``. The base values overwrite its own.
      epsilon: exploration rate or schedule of the step count; default ``0.2 · 0.995**t`` floored at 0.01
        (reached after about 600 steps).
      q_learning_rate: Q-learning step size α.
      discount: Q-learning discount γ.
      window: number of recent losses used for the trend and the oscillation flag (at least 3).
      grad_norm_edges: increasing global-norm bin edges; norms above the last edge are penalised.

    Returns:
      A transformation whose ``update(updates, state, params=None, *, loss, **extra_args)`` needs the current loss;
      other extra arguments (and ``loss``) are passed on to ``inner``.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if momentum is not None and not 0 < momentum < 1:
        raise ValueError(f"momentum must be in (0, 1) or None, got {momentum}")
    if window < 3:
        raise ValueError(f"window must be at least 3, got {window}")
    if inner is None:
        inner = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)
    inner = optax.with_extra_args_support(inner)
    if epsilon is None:
        epsilon = optax.exponential_decay(0.2, transition_steps=1, decay_rate=0.995, end_value=0.01)
    epsilon_fn = epsilon if callable(epsilon) else optax.constant_schedule(epsilon)

    base_mom = 0.0 if momentum is None else momentum  # uncontrolled momentum: pinned at 0, always bin 0
    lrs = jnp.asarray(learning_rate * np.asarray(LR_SCALES), jnp.float32)
    momenta = jnp.asarray(np.minimum(base_mom * np.asarray(MOMENTUM_SCALES), MAX_MOMENTUM), jnp.float32)
    grad_edges = jnp.asarray(grad_norm_edges, jnp.float32)
    trend_edges = jnp.asarray(TREND_EDGES, jnp.float32)
    table_shape = (len(TREND_EDGES) + 1, len(grad_norm_edges) + 1, 2, len(LR_SCALES), len(MOMENTUM_SCALES), NUM_ACTIONS)

    def momentum_key(hyperparams: dict[str, Any]) -> str | None:
        if momentum is None:
            return None
        for key in ("momentum", "b1"):
            if key in hyperparams:
                return key
        raise ValueError(f"inner optimizer has no 'momentum' or 'b1' hyperparameter: {sorted(hyperparams)}")

    def set_hyperparams(inner_state: Any, lr: jax.Array, mom: jax.Array) -> Any:
        hyperparams = getattr(inner_state, "hyperparams", None)
        if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
            raise ValueError("inner must be built with optax.inject_hyperparams and inject 'learning_rate'")
        new = dict(hyperparams, learning_rate=jnp.asarray(lr, jnp.result_type(hyperparams["learning_rate"])))
        if (key := momentum_key(hyperparams)) is not None:
            new[key] = jnp.asarray(mom, jnp.result_type(hyperparams[key]))
        return inner_state._replace(hyperparams=new)

    def init_fn(params: optax.Params) -> QControllerState:
        lr = jnp.asarray(learning_rate, jnp.float32)
        mom = jnp.asarray(base_mom, jnp.float32)
        return QControllerState(
            q_table=jnp.zeros(table_shape, jnp.float32),
            observation=jnp.zeros(5, jnp.int32),
            action=jnp.asarray(KEEP_ACTION, jnp.int32),
            reward=jnp.zeros((), jnp.float32),
            epsilon=jnp.asarray(epsilon_fn(0), jnp.float32),
            loss_history=jnp.zeros(window, jnp.float32),
            learning_rate=lr,
            momentum=mom,
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            inner_state=set_hyperparams(inner.init(params), lr, mom),
        )

    def observe(history: jax.Array, grad_norm: jax.Array, action: jax.Array) -> jax.Array:
        trend = (history[-1] - history[0]) / (jnp.abs(history[0]) + _EPS)
        diffs = jnp.diff(history)
        flips = jnp.sum(diffs[1:] * diffs[:-1] < 0)
        oscillating = 2 * flips >= window - 2
        return jnp.stack(
            [
                jnp.searchsorted(trend_edges, trend),
                jnp.searchsorted(grad_edges, grad_norm),
                oscillating,
                action // len(MOMENTUM_SCALES),
                0 if momentum is None else action % len(MOMENTUM_SCALES),
            ]
        ).astype(jnp.int32)

    def update_fn(
        updates: optax.Updates,
        state: QControllerState,
        params: optax.Params | None = None,
        *,
        loss: jax.Array,
        **extra_args: Any,
    ) -> tuple[optax.Updates, QControllerState]:
        loss = jnp.asarray(loss, jnp.float32)
        first = state.count == 0
        history = jnp.where(first, jnp.full_like(state.loss_history, loss), state.loss_history)
        prev_loss = history[-1]
        history = jnp.concatenate([history[1:], loss[None]])
        grad_norm = optax.tree.norm(updates).astype(jnp.float32)
        obs = observe(history, grad_norm, state.action)

        reward = (
            jnp.tanh(REWARD_SCALE * (prev_loss - loss) / (jnp.abs(prev_loss) + _EPS))
            - GRAD_PENALTY * (grad_norm > grad_edges[-1])
            - OSCILLATION_PENALTY * obs[2]
        )
        reward = jnp.where(first, 0.0, reward)
        prev = (*state.observation, state.action)
        target = reward + discount * jnp.max(state.q_table[tuple(obs)])
        delta = q_learning_rate * (target - state.q_table[prev])
        q_table = state.q_table.at[prev].add(jnp.where(first | ~jnp.isfinite(delta), 0.0, delta))

        key, explore_key, random_key, tie_key = jax.random.split(state.key, 4)
        eps = jnp.asarray(epsilon_fn(state.count), jnp.float32)
        row = q_table[tuple(obs)]
        # Ties (an unvisited state's row is all zeros) go to the base values when they are among the best.
        tie_break = jax.random.uniform(tie_key, row.shape).at[KEEP_ACTION].set(2.0)
        greedy = jnp.argmax(jnp.where(row == row.max(), tie_break, -1.0))
        explore = jax.random.uniform(explore_key) < eps
        action = jnp.where(explore, jax.random.randint(random_key, (), 0, NUM_ACTIONS), greedy).astype(jnp.int32)

        lr = lrs[action // len(MOMENTUM_SCALES)]
        mom = momenta[action % len(MOMENTUM_SCALES)]
        inner_state = set_hyperparams(state.inner_state, lr, mom)
        updates, inner_state = inner.update(updates, inner_state, params, loss=loss, **extra_args)
        return updates, QControllerState(
            q_table=q_table,
            observation=obs,
            action=action,
            reward=reward.astype(jnp.float32),
            epsilon=eps,
            loss_history=history,
            learning_rate=lr.astype(jnp.float32),
            momentum=mom.astype(jnp.float32),
            count=optax.safe_increment(state.count),
            key=key,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def controller_hyperparams(state: optax.OptState) -> dict[str, jax.Array]:
    """The controller's current ``learning_rate``, ``momentum``, ``epsilon``, ``reward`` and ``action`` for logging.

    ``state`` is a :class:`QControllerState` or any optimizer state that contains exactly one (e.g. an
    ``optax.chain`` state).
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QControllerState))
        if isinstance(s, QControllerState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one QControllerState in the optimizer state, found {len(found)}")
    (s,) = found
    return {
        "learning_rate": s.learning_rate,
        "momentum": s.momentum,
        "epsilon": s.epsilon,
        "reward": s.reward,
        "action": s.action,
    }

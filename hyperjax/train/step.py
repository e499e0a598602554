"""The optimizer of a config and the jitted train and evaluation steps over an explicit `TrainState` pytree.

Every optimizer is `skip_nonfinite(chain(clip_and_record(clip) | gradient_stats(), opt))`: a step whose gradients
or loss are NaN/inf leaves params and optimizer state unchanged and only increments `skipped_steps`. The loss goes
to every member as the extra arguments `loss` (Q-controller) and `value` (`reduce_on_plateau`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import ReduceLROnPlateauState, reduce_on_plateau

from hyperjax.optim import (
    GradientStatsState,
    SkipNonfiniteState,
    clip_and_record,
    gradient_stats,
    q_controller,
    skip_nonfinite,
)
from hyperjax.train.config import TrainConfig

LossFn = Callable[[Any, jax.Array], jax.Array]  # (params, int32 (B, W) batch) → mean loss in nats


class TrainState(NamedTuple):
    """All a run carries from one step to the next (data order is a function of (seed, step), so no data cursor)."""

    params: Any  # nested dict of float32 arrays
    opt_state: optax.OptState
    step: jax.Array  # int32: optimizer steps taken (skipped ones included)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The config's optimizer, wrapped as the module docstring says; learning rates are injected hyperparameters."""
    lr = config.lr
    if config.optimizer in ("adamw", "sgd"):
        decay_steps = max(config.steps - config.warmup, 1)
        after = (
            optax.cosine_decay_schedule(lr, decay_steps, alpha=0.1)
            if config.schedule == "cosine"
            else optax.constant_schedule(lr)
        )
        lr = optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup), after], [config.warmup])
    if config.optimizer == "adamw":
        opt = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=config.momentum)
    elif config.optimizer == "q":
        opt = q_controller(config.lr, config.momentum, seed=config.seed)
    else:
        opt = optax.chain(
            optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=config.momentum),
            reduce_on_plateau(factor=0.5, patience=20, cooldown=20, accumulation_size=10),
        )
    stats = clip_and_record(config.clip) if config.clip > 0 else gradient_stats()
    return skip_nonfinite(optax.chain(stats, opt))


def _find(state: Any, cls: type | tuple[type, ...]) -> list[Any]:
    return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]


def optimizer_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """Scalars worth logging from an optimizer state built by `make_optimizer`.

    lr (the effective learning rate: injected value times the plateau scale), momentum when there is one,
    skipped_steps and clipped_steps."""
    (skip,) = _find(opt_state, SkipNonfiniteState)
    (stats,) = _find(opt_state, GradientStatsState)
    injected = _find(opt_state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))
    hyper = [s.hyperparams for s in injected]
    out = {"skipped_steps": skip.skipped_steps, "clipped_steps": stats.clipped_steps}
    if hyper:
        out["lr"] = jnp.asarray(hyper[0]["learning_rate"], jnp.float32)
        if "momentum" in hyper[0] and hyper[0]["momentum"] is not None:
            out["momentum"] = jnp.asarray(hyper[0]["momentum"], jnp.float32)
    for plateau in _find(opt_state, ReduceLROnPlateauState):
        out["lr"] = out["lr"] * plateau.scale
    return out


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Step-0 state for `params`."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformationExtraArgs
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) → (state, metrics)` (not jitted): batch int32 (accum, B, W) of micro-batches.

    Gradients and losses are averaged over the micro-batches (a `lax.scan`, so memory is one micro-batch's).
    metrics: float32 `loss` (mean nats per predicted byte), `grad_norm` (before clipping), `optimizer_metrics`."""

    def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(loss_fn)

        def micro(carry: tuple[jax.Array, Any], b: jax.Array) -> tuple[tuple[jax.Array, Any], None]:
            loss, grads = grad_fn(state.params, b)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(micro, zero, batch)
        loss, grads = jax.tree.map(lambda x: x / batch.shape[0], (loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, loss=loss, value=loss)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **optimizer_metrics(opt_state)}
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable[[Any, jax.Array], jax.Array]:
    """`eval(params, batches) → mean loss` (not jitted) over batches int32 (k, B, W), one batch at a time."""

    def evaluate(params: Any, batches: jax.Array) -> jax.Array:
        return jax.lax.map(lambda b: loss_fn(params, b), batches).mean()

    return evaluate

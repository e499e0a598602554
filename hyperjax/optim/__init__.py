"""Optimizer pieces as optax transformations: the Q-learning LR/momentum controller and gradient statistics."""

from hyperjax.optim.grad_stats import (
    GradientStatsState,
    SkipNonfiniteState,
    clip_and_record,
    gradient_stats,
    skip_nonfinite,
)
from hyperjax.optim.q_controller import QControllerState, controller_hyperparams, q_controller

__all__ = [
    "GradientStatsState",
    "QControllerState",
    "SkipNonfiniteState",
    "clip_and_record",
    "controller_hyperparams",
    "gradient_stats",
    "q_controller",
    "skip_nonfinite",
]

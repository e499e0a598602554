"""Training byte models: data, optimizer, jitted steps, checkpoints and the loop (`hyperjax train`).

>>> from hyperjax.train import load_config, train
>>> train(load_config("train/configs/transformer.toml", steps=200))
"""

from __future__ import annotations

__all__ = ["TrainConfig", "TrainState", "load_config", "metrics", "train"]


def __getattr__(name: str):
    """Lazy exports, so that importing the command-line module does not start JAX."""
    if name in ("TrainConfig", "load_config"):
        from hyperjax.train import config

        return getattr(config, name)
    if name in ("train", "metrics"):
        from hyperjax.train import loop

        return getattr(loop, name)
    if name == "TrainState":
        from hyperjax.train.step import TrainState

        return TrainState
    raise AttributeError(f"module 'hyperjax.train' has no attribute {name!r}")

"""A byte model chosen by name: its config, graph definition and pure loss, as the training loop needs them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax
from flax import nnx

from hyperjax.train.config import model_config, model_module


@dataclass(frozen=True)
class ByteModel:
    """A byte model of `name` ("hakmem" | "transformer" | "rnn"); parameters live outside, as plain pytrees."""

    name: str
    config: Any  # HakmemConfig | ByteTransformerConfig | ByteRNNConfig
    graphdef: nnx.GraphDef
    module: ModuleType

    def init_params(self, seed: int) -> Any:
        """float32 parameters (nested dict) initialised from `seed`."""
        return self.module.init(self.config, seed)[1]

    def abstract_params(self) -> Any:
        """Shapes and dtypes of the parameters (nothing allocated)."""
        return jax.eval_shape(lambda: self.init_params(0))

    def loss(self, params: Any, batch: jax.Array) -> jax.Array:
        """Mean next-byte cross-entropy (nats) of batch int32 (B, W): predicts bytes 1…W−1 from those before."""
        return self.module.loss_fn(self.graphdef, params, batch)

    def config_dict(self) -> dict[str, Any]:
        """JSON-ready fields of the model config."""
        return dataclasses.asdict(self.config)


def byte_model(name: str, context: int, options: Mapping[str, Any]) -> ByteModel:
    """The model `name` with small defaults sized for windows of `context` bytes, `options` overriding them."""
    module, _ = model_module(name)
    config = model_config(name, context, options)
    graphdef, _ = jax.eval_shape(lambda: module.init(config, 0))
    return ByteModel(name, config, graphdef, module)

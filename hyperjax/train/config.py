"""Training options: one frozen dataclass, read from a TOML file and/or flags, and the byte models it can build.

A TOML file holds the same keys as `TrainConfig` at top level, plus an optional `[model_options]` table of fields
of the chosen model's config class (e.g. `dim = 64`). Flags given on the command line override the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from hyperjax.errors import TrainConfigError

MODELS = ("hakmem", "transformer", "rnn")
OPTIMIZERS = ("adamw", "sgd", "q", "plateau")
SCHEDULES = ("constant", "cosine")
# Fields that must match between a checkpoint and the run resuming from it (the rest may change, e.g. `steps`).
RESUME_FIELDS = (
    "model", "model_options", "seed", "batch_size", "context", "accum", "optimizer", "lr", "schedule", "warmup",
    "momentum", "weight_decay", "clip", "val_fraction",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; `steps` counts optimizer updates (each of `accum` micro-batches)."""

    data: str = ""
    out: str = "runs/byte-model"
    model: str = "transformer"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    context: int = 128  # bytes the model reads per window; each window holds context + 1 bytes
    accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    schedule: str = "cosine"  # for adamw/sgd: linear warmup, then constant or cosine decay to 10 %
    warmup: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: float = 1.0  # global-norm clipping threshold; 0 disables clipping (the norm is still recorded)
    val_fraction: float = 0.1
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 3
    log_every: int = 10

    def __post_init__(self) -> None:
        checks = {
            "model": self.model in MODELS,
            "optimizer": self.optimizer in OPTIMIZERS,
            "schedule": self.schedule in SCHEDULES,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "context": self.context >= 2,
            "accum": self.accum >= 1,
            "lr": self.lr > 0,
            "warmup": self.warmup >= 0,
            "momentum": 0 < self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "clip": self.clip >= 0,
            "val_fraction": 0 < self.val_fraction < 1,
            "eval_every": self.eval_every >= 1,
            "eval_batches": self.eval_batches >= 1,
            "save_every": self.save_every >= 1,
            "keep": self.keep >= 1,
            "log_every": self.log_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            allowed = {"model": MODELS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}
            k = bad[0]
            hint = f" (one of {', '.join(allowed[k])})" if k in allowed else ""
            raise TrainConfigError(f"invalid training option {k} = {getattr(self, k)!r}{hint}")
        if not self.data:
            raise TrainConfigError("no training data: give a text or .npy file (--data or `data` in the config)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return {**dataclasses.asdict(self), "model_options": dict(self.model_options)}


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The config from a TOML file (optional) with `overrides` (values that are None are ignored) on top.

    `model_options` from both are merged, the overrides winning."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TrainConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise TrainConfigError(f"{path}: not valid TOML: {exc}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(values.get("model_options"), Mapping) and "model_options" in overrides:
        overrides["model_options"] = {**values["model_options"], **overrides["model_options"]}
    values |= overrides
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TrainConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if not isinstance(values.get("model_options", {}), Mapping):
        raise TrainConfigError("model_options must be a table of model config fields")
    return TrainConfig(**values)


def model_module(name: str) -> tuple[ModuleType, type]:
    """(module with init/loss_fn/apply/param_count, config class) of a model name."""
    from hyperjax.models import byte_transformer, hakmem, rnn

    table = {
        "hakmem": (hakmem, hakmem.HakmemConfig),
        "transformer": (byte_transformer, byte_transformer.ByteTransformerConfig),
        "rnn": (rnn, rnn.ByteRNNConfig),
    }
    if name not in table:
        raise TrainConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return table[name]


def model_config(name: str, context: int, options: Mapping[str, Any]) -> Any:
    """The model's config: small defaults, `context_length` = `context` where the model has one, then `options`."""
    _, cls = model_module(name)
    names = {f.name for f in dataclasses.fields(cls)}
    defaults = {"context_length": context} if "context_length" in names else {}
    if name == "hakmem":
        defaults |= {"dim": 64, "global_dim": 64, "ngram_table": 1024}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TrainConfigError(f"unknown {name} option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = defaults | {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"invalid {name} options {values}: {exc}") from None

"""Tiny corpora and configs for the training tests: a few steps of small models on a slice of Tiny Shakespeare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED

TINY_TRANSFORMER = {"dim": 32, "n_layers": 1, "n_heads": 2}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """40 kB of Tiny Shakespeare (a fixed English text when the shared file is absent)."""
    source = SHARED / "data" / "tinyshakespeare.txt"
    text = source.read_bytes()[:40_000] if source.exists() else b"To be, or not to be, that is the question. " * 1000
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(text)
    return path


@pytest.fixture(scope="session")
def full_run(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run of `tiny_options`, checkpointed at steps 4 and 8."""
    from hyperjax.train import load_config, train

    out = tmp_path_factory.mktemp("full")
    train(load_config(**tiny_options(corpus, out)), progress=False)
    return out


def tiny_options(corpus: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """Options of a tiny transformer run: 8 Q-controller steps of 2 × 4 windows of 32 bytes, saving every 4 steps."""
    return {
        "data": str(corpus),
        "out": str(out),
        "model": "transformer",
        "model_options": TINY_TRANSFORMER,
        "steps": 8,
        "batch_size": 4,
        "context": 32,
        "accum": 2,
        "optimizer": "q",
        "lr": 0.05,
        "eval_every": 4,
        "eval_batches": 2,
        "save_every": 4,
        "keep": 10,
        "log_every": 1,
    } | overrides


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_toml(path: Path, options: dict[str, Any]) -> Path:
    """A TOML config file of `options` (flat values and one inline table) for `hyperjax train --config`."""
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in options.items()))
    return path

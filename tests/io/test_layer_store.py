"""Progressive loading: streamed blocks give the in-memory model's output while staying under the budget."""

from __future__ import annotations

import numpy as np
import pytest

import hyperjax
from hyperjax.io.layer_store import MemoryBudgetError, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64MB", 64_000_000), ("1.5GiB", 3 * 2**29), ("500k", 500_000), ("1048576", 2**20), (" 2 MiB ", 2 * 2**20)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "10 parsecs", "0"])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(MemoryBudgetError):
        parse_bytes(text)


def test_streamed_model_matches_in_memory_model_under_budget(tiny_llama_gguf):
    full = hyperjax.load(tiny_llama_gguf)
    resident = full.info()["memory"]["weight_bytes"]
    block = resident // 4  # the tiny model: embedding ≈ half, two blocks ≈ a quarter each
    budget = resident - block // 2  # holds the embedding and one block, never both blocks
    streamed = hyperjax.load(tiny_llama_gguf, memory_budget=budget)
    tokens = full.tokenize("hello there")
    np.testing.assert_allclose(streamed.logits(tokens), full.logits(tokens), rtol=1e-5, atol=1e-5)
    a = full.generate("hello", max_tokens=12, temperature=0.0, ignore_eos=True)
    b = streamed.generate("hello", max_tokens=12, temperature=0.0, ignore_eos=True)
    assert a.token_ids == b.token_ids
    store = streamed.layer_store
    assert store.peak_resident_bytes <= budget
    assert store.loads > full.config.n_layers  # blocks were evicted and loaded again


def test_budget_too_small_for_one_block_is_refused(tiny_llama_gguf):
    with pytest.raises(MemoryBudgetError, match="cannot hold"):
        hyperjax.load(tiny_llama_gguf, memory_budget="10kB")

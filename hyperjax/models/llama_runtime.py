"""Jitted prefill and decode for the Llama decoder, with bucketed shapes compiled ahead of time.

Prompts are padded to power-of-two buckets (16…256 tokens per chunk, longer prompts run in 256-token chunks) and the
KV cache to power-of-two capacities, so a new prompt length reuses an executable instead of recompiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.models.llama import KVCache, LlamaConfig, LlamaParams, forward, init_cache

PREFILL_CHUNK = 256


def prefill_bucket(n: int) -> int:
    """Smallest power of two ≥ n, at least 16 and at most PREFILL_CHUNK."""
    bucket = 16
    while bucket < min(n, PREFILL_CHUNK):
        bucket *= 2
    return bucket


@partial(jax.jit, static_argnames=("config", "all_logits"), donate_argnames=("cache",))
def _forward_jit(params, config, tokens, start, n_valid, cache, all_logits=False):
    return forward(params, config, tokens, start, n_valid, cache, all_logits=all_logits)


class LlamaDecoder:
    """The `generate.Decoder` of a Llama model: explicit state is the KV cache."""

    def __init__(self, config: LlamaConfig, params: LlamaParams, stop_ids: frozenset[int], token_bytes):
        self.config = config
        self.params = params
        self.vocab_size = config.vocab_size
        self.context_length = config.context_length
        self.stop_ids = stop_ids
        self._token_bytes: Callable[[int], bytes] = token_bytes
        self._compiled: dict[tuple[int, int, bool], Any] = {}
        self.last_timings: dict[str, float] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes(token_id)

    def _executable(self, tokens: int, capacity: int, all_logits: bool):
        """The compiled forward for (tokens per call, cache capacity); compile time goes into last_timings."""
        key = (tokens, capacity, all_logits)
        if key not in self._compiled:
            t0 = time.perf_counter()
            cache = jax.eval_shape(lambda: init_cache(self.config, 1, capacity))
            token_spec = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            lowered = _forward_jit.lower(
                self.params, self.config, token_spec, scalar, scalar, cache, all_logits=all_logits
            )
            self._compiled[key] = lowered.compile()
            self.last_timings["compile_seconds"] = self.last_timings.get("compile_seconds", 0.0) + (
                time.perf_counter() - t0
            )
        return self._compiled[key]

    def run(
        self, token_ids: Sequence[int], start: int, cache: KVCache, *, all_logits: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """Feed `token_ids` at positions start…; chunked and padded to buckets. Logits (T, V) or (V,)."""
        outputs = []
        for offset in range(0, len(token_ids), PREFILL_CHUNK):
            chunk = list(token_ids[offset : offset + PREFILL_CHUNK])
            bucket = prefill_bucket(len(chunk))
            padded = np.zeros((1, bucket), np.int32)
            padded[0, : len(chunk)] = chunk
            fn = self._executable(bucket, cache.length, all_logits)
            logits, cache = fn(self.params, padded, np.int32(start + offset), np.int32(len(chunk)), cache)
            outputs.append(logits[0, : len(chunk)] if all_logits else logits[0])
        return (jnp.concatenate(outputs) if all_logits else outputs[-1]), cache

    def prepare(self, prompt_len: int, capacity: int) -> None:
        """Compile (or fetch) every executable a generation of this size needs, before it is timed."""
        self.last_timings = {"compile_seconds": 0.0}
        self._executable(1, capacity, False)
        for n in range(0, prompt_len, PREFILL_CHUNK):
            self._executable(prefill_bucket(prompt_len - n), capacity, False)

    def prefill(self, prompt_ids: Sequence[int], capacity: int) -> tuple[jax.Array, KVCache]:
        return self.run(prompt_ids, 0, init_cache(self.config, 1, capacity))

    def step(self, state: KVCache, token: int, position: int) -> tuple[jax.Array, KVCache]:
        fn = self._executable(1, state.length, False)
        logits, cache = fn(self.params, np.array([[token]], np.int32), np.int32(position), np.int32(1), state)
        return logits[0], cache

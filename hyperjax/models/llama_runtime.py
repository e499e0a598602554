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

from hyperjax.models.llama import (
    KVCache,
    LlamaConfig,
    LlamaParams,
    block_forward,
    embed_tokens,
    forward,
    init_cache,
    output_logits,
)

PREFILL_CHUNK = 256
# Decoding steps hand only dots to XLA:CPU's YNNPACK fusions: a YNNPACK reduction needs its operands in buffers of
# their own, which costs a copy of each layer's cache slice per token; XLA's own reductions read it in place.
DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def prefill_bucket(n: int) -> int:
    """Smallest power of two ≥ n, at least 16 and at most PREFILL_CHUNK."""
    bucket = 16
    while bucket < min(n, PREFILL_CHUNK):
        bucket *= 2
    return bucket


@partial(jax.jit, static_argnames=("config", "all_logits"), donate_argnames=("cache",))
def _forward_jit(params, config, tokens, start, n_valid, cache, all_logits=False):
    """`forward` for the decoder's one sequence: logits (T, V) or (V,), indexed inside the executable (indexing
    the result from Python would dispatch one more computation per token)."""
    logits, cache = forward(params, config, tokens, start, n_valid, cache, all_logits=all_logits)
    return logits[0], cache


def _compile(lowered: jax.stages.Lowered, options: dict[str, str] | None) -> jax.stages.Compiled:
    """Compile with XLA options when this jaxlib knows them, else with its defaults (same results, slower)."""
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError:
            pass
    return lowered.compile()


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
            self._compiled[key] = _compile(lowered, DECODE_COMPILER_OPTIONS if tokens == 1 else None)
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
            logits, cache = self._run_chunk(padded, start + offset, len(chunk), cache, all_logits)
            outputs.append(logits[: len(chunk)] if all_logits else logits)
        return (jnp.concatenate(outputs) if all_logits else outputs[-1]), cache

    def _run_chunk(
        self, tokens: np.ndarray, start: int, n_valid: int, cache: KVCache, all_logits: bool
    ) -> tuple[jax.Array, KVCache]:
        fn = self._executable(tokens.shape[1], cache.length, all_logits)
        return fn(self.params, tokens, np.int32(start), np.int32(n_valid), cache)

    def new_cache(self, capacity: int) -> KVCache:
        return init_cache(self.config, 1, capacity)

    def prepare(self, prompt_len: int, capacity: int) -> None:
        """Compile (or fetch) every executable a generation of this size needs, before it is timed."""
        self.last_timings = {"compile_seconds": 0.0}
        self._executable(1, capacity, False)
        for n in range(0, prompt_len, PREFILL_CHUNK):
            self._executable(prefill_bucket(prompt_len - n), capacity, False)

    def prefill(self, prompt_ids: Sequence[int], capacity: int) -> tuple[jax.Array, KVCache]:
        return self.run(prompt_ids, 0, self.new_cache(capacity))

    def step(self, state: KVCache, token: int, position: int) -> tuple[jax.Array, KVCache]:
        return self._run_chunk(np.array([[token]], np.int32), position, 1, state, False)


_embed_jit = jax.jit(embed_tokens)
_block_jit = jax.jit(block_forward, static_argnames=("config",), donate_argnames=("keys", "values"))
_head_jit = jax.jit(output_logits, static_argnames=("config", "all_logits"))


class StreamingLlamaDecoder(LlamaDecoder):
    """A Llama decoder whose blocks stream from the file through a `LayerStore` (under a memory budget).

    The arithmetic is the same `block_forward` as the in-memory decoder's, one jitted call per block; the cache is
    a `KVCache` whose keys/values are tuples of per-layer arrays, so each block's slice is donated and updated in
    place.
    """

    def __init__(self, config: LlamaConfig, resident: LlamaParams, store, stop_ids: frozenset[int], token_bytes):
        super().__init__(config, resident, stop_ids, token_bytes)
        self.store = store

    def new_cache(self, capacity: int) -> KVCache:
        shape = (1, capacity, self.config.n_kv_heads, self.config.head_dim)
        layers = range(self.config.n_layers)
        return KVCache(tuple(jnp.zeros(shape) for _ in layers), tuple(jnp.zeros(shape) for _ in layers), capacity)

    def prepare(self, prompt_len: int, capacity: int) -> None:
        self.last_timings = {"compile_seconds": 0.0}

    def _run_chunk(
        self, tokens: np.ndarray, start: int, n_valid: int, cache: KVCache, all_logits: bool
    ) -> tuple[jax.Array, KVCache]:
        start_, n_valid_ = np.int32(start), np.int32(n_valid)
        x = _embed_jit(self.params.embed, tokens)
        keys, values = list(cache.keys), list(cache.values)
        for i in range(self.config.n_layers):
            layer = self.store.get(i)
            x, keys[i], values[i] = _block_jit(self.config, x, layer, keys[i], values[i], start_)
        logits = _head_jit(self.params, self.config, x, n_valid_, all_logits)[0]  # the one sequence
        return logits, KVCache(tuple(keys), tuple(values), cache.length)

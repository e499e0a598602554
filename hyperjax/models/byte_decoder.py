"""Byte-level models as `generate.Decoder`s, plus the byte helpers shared by their training and evaluation.

A token is a raw byte (vocabulary 256, `token_bytes(b) = bytes([b])`); the generation loop reassembles UTF-8.
Byte models have no end-of-sequence byte, so `stop_ids` is empty unless given. Decoding is incremental: the RNN
carries its recurrent state, the transformer its KV cache, and each `step` feeds one byte.

Prompts run in chunks of at most PREFILL_CHUNK bytes, each padded to a power-of-two width (16…PREFILL_CHUNK), and the
executables are compiled ahead of time per (width, state shape), so a new prompt length reuses one.

>>> decoder = ByteDecoder(*byte_transformer.init(ByteTransformerConfig()))
>>> generate_tokens(decoder, encode_text("Once upon a time"), max_new_tokens=32).text
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperjax.errors import InvalidPromptError
from hyperjax.models import byte_transformer, rnn
from hyperjax.models.byte_transformer import ByteTransformerConfig, KVCache
from hyperjax.models.rnn import ByteRNNConfig

VOCAB_SIZE = 256
PREFILL_CHUNK = 256
RNN_CONTEXT = 1 << 16


def encode_text(text: str) -> list[int]:
    """The UTF-8 bytes of `text` as token ids 0…255."""
    return list(text.encode("utf-8"))


def bits_per_byte(nats: float | jax.Array) -> float | jax.Array:
    """Convert a mean cross-entropy per byte from nats to bits."""
    return nats / math.log(2)


def prompt_width(n: int, room: int | None = None) -> int:
    """Padded width for a chunk of n ≤ PREFILL_CHUNK bytes: 1 for a single byte, else the smallest power of two ≥ n
    from 16, cut to `room` (positions left in a cache) when given."""
    if n == 1:
        return 1
    width = 16
    while width < n:
        width *= 2
    return width if room is None else min(width, room)


@jax.jit
def _rnn_run(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, start: jax.Array, n_valid: jax.Array, state: Any):
    """(logits (V,) after the n_valid-th token, state); `start` is unused: a recurrence has no positions."""
    del start
    logits, state = rnn.forward(graphdef, params, tokens, state, n_valid)
    return logits[0, n_valid - 1], state


@partial(jax.jit, donate_argnums=5)
def _transformer_run(
    graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, start: jax.Array, n_valid: jax.Array, cache: KVCache
):
    """(logits (V,) after the n_valid-th token, cache)."""
    logits, cache = byte_transformer.forward(graphdef, params, tokens, start, cache)
    return logits[0, n_valid - 1], cache


class ByteDecoder:
    """The `generate.Decoder` of a byte RNN or byte transformer, chosen by the config inside `graphdef`.

    State: the recurrent carries (RNN) or the KV cache (transformer). `context_length` defaults to the transformer's
    configured one, and to RNN_CONTEXT for the RNN, whose recurrence has no limit of its own."""

    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        *,
        stop_ids: Iterable[int] = (),
        context_length: int | None = None,
    ):
        config = nnx.merge(graphdef, params).config
        if isinstance(config, ByteTransformerConfig):
            self._run, limit = _transformer_run, config.context_length
            self._initial_state = partial(byte_transformer.init_cache, config, 1)
        elif isinstance(config, ByteRNNConfig):
            self._run, limit = _rnn_run, RNN_CONTEXT
            self._initial_state = lambda capacity: rnn.initial_state(config, 1)
        else:
            raise TypeError(f"no byte decoder for a model configured by {type(config).__name__}")
        context_length = limit if context_length is None else context_length
        if isinstance(config, ByteTransformerConfig) and not 1 < context_length <= limit:
            raise ValueError(f"context_length must be in 2…{limit} (the model's positions), got {context_length}")
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.context_length = context_length
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self.last_timings: dict[str, float] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def initial_state(self, capacity: int) -> Any:
        """The state before any byte: zero carries (RNN) or an empty KV cache of `capacity` positions."""
        return self._initial_state(capacity)

    def forward(
        self, params: Any, tokens: jax.Array, start: jax.Array, n_valid: jax.Array, state: Any
    ) -> tuple[jax.Array, Any]:
        """Pure: tokens int32 (1, T) at positions start…, the first n_valid real → (logits (V,) float32 after the
        n_valid-th, new state). What `run` compiles, for callers that trace it themselves (`hyperjax export`)."""
        return self._run(self.graphdef, params, tokens, start, n_valid, state)

    def _executable(self, width: int, state: Any):
        """The compiled run for (width, state's shapes); compile time goes into last_timings."""
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        key = (width, jax.tree.structure(spec), tuple(jax.tree.leaves(spec)))
        if key not in self._compiled:
            t0 = time.perf_counter()
            tokens = jax.ShapeDtypeStruct((1, width), jnp.int32)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            self._compiled[key] = self._run.lower(self.graphdef, self.params, tokens, scalar, scalar, spec).compile()
            self.last_timings["compile_seconds"] = self.last_timings.get("compile_seconds", 0.0) + (
                time.perf_counter() - t0
            )
        return self._compiled[key]

    @staticmethod
    def _chunks(n: int, start: int, state: Any) -> list[tuple[int, int, int]]:
        """(offset, length, padded width) of each chunk feeding n tokens at `start`; a KV cache bounds the width.

        Raises InvalidPromptError when the tokens overflow the cache."""
        chunks = []
        for offset in range(0, n, PREFILL_CHUNK):
            length = min(PREFILL_CHUNK, n - offset)
            room = state.capacity - start - offset if isinstance(state, KVCache) else None
            if room is not None and room < length:
                raise InvalidPromptError(
                    f"{length} bytes at position {start + offset} do not fit a KV cache of {state.capacity} positions"
                )
            chunks.append((offset, length, prompt_width(length, room)))
        return chunks

    def run(self, token_ids: Sequence[int], start: int, state: Any) -> tuple[jax.Array, Any]:
        """Feed token_ids at positions start…: (logits (V,) float32 for the next byte, new state)."""
        logits = None
        for offset, length, width in self._chunks(len(token_ids), start, state):
            padded = np.zeros((1, width), np.int32)
            padded[0, :length] = token_ids[offset : offset + length]
            fn = self._executable(width, state)
            logits, state = fn(self.graphdef, self.params, padded, np.int32(start + offset), np.int32(length), state)
        return logits, state

    def prepare(self, prompt_len: int, capacity: int) -> None:
        """Compile (or fetch) every executable a generation of this size needs, before it is timed."""
        self.last_timings = {"compile_seconds": 0.0}
        state = jax.eval_shape(partial(self._initial_state, capacity))
        for _, _, width in [*self._chunks(prompt_len, 0, state), (0, 1, 1)]:
            self._executable(width, state)

    def prefill(self, prompt_ids: Sequence[int], capacity: int) -> tuple[jax.Array, Any]:
        return self.run(prompt_ids, 0, self._initial_state(capacity))

    def step(self, state: Any, token: int, position: int) -> tuple[jax.Array, Any]:
        return self.run([token], position, state)

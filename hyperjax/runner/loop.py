"""The runner's generation loop: chunked prefill over the exported bucket sizes, then sample and step.

`Functions` is what a backend offers (jax or IREE): a fresh KV cache of the exported capacity, and one call that
feeds T tokens (an exported size) at a position and returns the next-token logits.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hyperjax.runner.format import RunnerError
from hyperjax.runner.sampling import Sampling, sample


class Functions(Protocol):
    def prepare(self, sizes: Iterable[int]) -> None:
        """Compile the functions for these token counts ahead of the timed calls."""
        ...

    def new_cache(self) -> Any: ...

    def run(self, tokens: np.ndarray, start: int, n_valid: int, cache: Any) -> tuple[np.ndarray, Any]:
        """tokens int32 (1, T), the first n_valid real; logits float32 (V,) after the last real token."""
        ...


@dataclass
class RunResult:
    token_ids: list[int]
    finish_reason: str  # "eos" | "length"
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    first_token_time: float  # time.perf_counter() when the first token was sampled


def plan_chunks(n_tokens: int, capacity: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, real tokens, bucket) per prefill call: chunks of the largest bucket, each padded to the smallest
    bucket that holds it; where that padding would run past the cache, the largest bucket that fits the chunk.

    Buckets are powers of two (from 16, or 4 for IREE) and the capacity a multiple of 16, so every call stays
    inside the cache.
    """
    plan, start = [], 0
    while start < n_tokens:
        take = min(n_tokens - start, buckets[-1])
        bucket = next(b for b in buckets if b >= take)
        if start + bucket > capacity:
            bucket = take = max(b for b in buckets if b <= take)
        plan.append((start, take, bucket))
        start += take
    return plan


def generate(
    functions: Functions,
    prompt_ids: Sequence[int],
    *,
    capacity: int,
    buckets: Sequence[int],
    stop_ids: frozenset[int],
    token_bytes: Sequence[bytes],
    sampling: Sampling,
    max_tokens: int,
    repeat_last_n: int = 64,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> RunResult:
    """Generate up to `max_tokens` (fewer if the cache fills) after `prompt_ids`, streaming text to `on_text`."""
    if not prompt_ids:
        raise RunnerError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= capacity:
        raise RunnerError(
            f"the prompt has {len(prompt_ids)} tokens; this export holds {capacity} (prompt plus output): "
            "shorten it or export with a larger --max-context"
        )
    budget = min(max_tokens, capacity - len(prompt_ids))
    rng = np.random.default_rng(seed)
    recent: deque[int] = deque(prompt_ids[-repeat_last_n:] if repeat_last_n else (), maxlen=max(repeat_last_n, 1))
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    emit = on_text or (lambda _: None)

    chunks = plan_chunks(len(prompt_ids), capacity, buckets)
    functions.prepare({1, *(bucket for _, _, bucket in chunks)})
    t_prefill = time.perf_counter()
    cache = functions.new_cache()
    for start, count, bucket in chunks:
        chunk = np.zeros((1, bucket), np.int32)
        chunk[0, :count] = prompt_ids[start : start + count]
        logits, cache = functions.run(chunk, start, count, cache)
    prefill_seconds = time.perf_counter() - t_prefill

    tokens: list[int] = []
    finish, first_token_time, t_decode = "length", 0.0, time.perf_counter()
    position = len(prompt_ids)
    for i in range(budget):
        token = sample(logits, sampling, rng, recent if repeat_last_n else ())
        if i == 0:
            first_token_time = t_decode = time.perf_counter()
        if token in stop_ids:
            finish = "eos"
            break
        tokens.append(token)
        recent.append(token)
        emit(utf8.decode(token_bytes[token]))
        if i + 1 == budget:
            break
        logits, cache = functions.run(np.array([[token]], np.int32), position, 1, cache)
        position += 1
    emit(utf8.decode(b"", final=True))
    return RunResult(
        token_ids=tokens,
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - t_decode,
        decode_steps=position - len(prompt_ids),
        first_token_time=first_token_time,
    )

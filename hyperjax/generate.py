"""One generation loop for every model: prefill, then sample and step until EOS, a stop string or the limit.

A model plugs in through the `Decoder` protocol (token ids in, next-token logits out, explicit state); the loop owns
sampling, the repetition window, stop handling, UTF-8-safe streaming and timing.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.errors import InvalidPromptError
from hyperjax.kernels.sampling import SamplingConfig, sample_token


class Decoder(Protocol):
    """What the loop needs from a model. `state` is any pytree the model threads through."""

    vocab_size: int
    context_length: int
    stop_ids: frozenset[int]

    def prefill(self, prompt_ids: Sequence[int], capacity: int) -> tuple[jax.Array, Any]:
        """(A model may also offer `prepare(prompt_len, capacity)` to compile before timing.)

        Logits (V,) for the token after the prompt, and the state holding room for `capacity` positions."""
        ...

    def step(self, state: Any, token: int, position: int) -> tuple[jax.Array, Any]:
        """Feed `token` at `position`; logits (V,) for the next token and the new state."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for."""
        ...


@dataclass
class GenerationResult:
    """Text and ids produced, why it stopped, and timings (compilation excluded from the rates)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_seconds: float
    decode_seconds: float
    first_token_seconds: float
    decode_steps: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def generation_tokens_per_second(self) -> float:
        if self.decode_steps == 0 or self.decode_seconds <= 0:
            return float("nan")
        return self.decode_steps / self.decode_seconds


_sample = jax.jit(sample_token)


class _StopMatcher:
    """Finds stop strings in streamed text and holds back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]

    def split(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found); on a stop the text is cut before it."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold], False


def plan_capacity(prompt_len: int, max_new_tokens: int, context_length: int) -> tuple[int, int]:
    """(cache capacity bucket, tokens that fit): power-of-two buckets from 256, capped at the context length."""
    if prompt_len >= context_length:
        raise InvalidPromptError(
            f"prompt has {prompt_len} tokens; the model's context holds {context_length} (prompt plus output)"
        )
    needed = min(prompt_len + max_new_tokens, context_length)
    capacity = 256
    while capacity < needed:
        capacity *= 2
    return min(capacity, context_length), needed - prompt_len


def generate_tokens(
    model: Decoder,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    ignore_eos: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt_ids`, streaming decoded text to `on_text`.

    Sampling follows `sampling` (greedy when its temperature is 0); the repetition window covers the prompt too, as
    llama.cpp's does. Stops at the model's stop ids (not emitted; unless `ignore_eos`, as benchmarks need), at a stop
    string (cut before it) or the limit.
    """
    if len(prompt_ids) == 0:
        raise InvalidPromptError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise InvalidPromptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    sampling = (sampling or SamplingConfig()).validate()
    bad = [t for t in prompt_ids if not 0 <= int(t) < model.vocab_size]
    if bad:
        raise InvalidPromptError(f"prompt token ids out of range [0, {model.vocab_size}): {bad[:5]}")
    capacity, budget = plan_capacity(len(prompt_ids), max_new_tokens, model.context_length)

    window = max(int(sampling.repeat_last_n), 1)
    recent: deque[int] = deque((int(t) for t in prompt_ids[-window:]), maxlen=window)
    key = jax.random.key(seed)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = _StopMatcher(stop_strings)
    text, emitted = "", 0
    tokens: list[int] = []
    finish = "length"

    def emit(upto: int) -> None:
        nonlocal emitted
        if on_text is not None and upto > emitted:
            on_text(text[emitted:upto])
        emitted = max(emitted, upto)

    t0 = time.perf_counter()
    prepare = getattr(model, "prepare", None)
    if prepare is not None:
        prepare(len(prompt_ids), capacity)
    t_prefill = time.perf_counter()
    logits, state = model.prefill(list(prompt_ids), capacity)
    logits.block_until_ready()
    prefill_seconds = time.perf_counter() - t_prefill
    first_token_seconds = 0.0
    t_decode = time.perf_counter()
    position, steps = len(prompt_ids), 0
    for i in range(budget):
        recent_arr = np.zeros(window, np.int32)
        recent_arr[: len(recent)] = list(recent)
        mask = np.arange(window) < len(recent)
        key, sub = jax.random.split(key)
        token = int(_sample(sub, logits, sampling, jnp.asarray(recent_arr), jnp.asarray(mask)))
        if i == 0:
            first_token_seconds = time.perf_counter() - t0
            t_decode = time.perf_counter()
        if token in model.stop_ids and not ignore_eos:
            finish = "eos"
            break
        tokens.append(token)
        recent.append(token)
        text += utf8.decode(model.token_bytes(token))
        safe, stopped = stops.split(text)
        if stopped:
            text = safe
            emit(len(text))
            finish = "stop"
            break
        emit(len(safe))
        if i + 1 == budget:
            break
        logits, state = model.step(state, token, position)
        position, steps = position + 1, steps + 1
    decode_seconds = time.perf_counter() - t_decode
    if finish != "stop":
        text += utf8.decode(b"", final=True)
        safe, stopped = stops.split(text)
        text = safe if stopped else text
        finish = "stop" if stopped else finish
        emit(len(text))
    return GenerationResult(
        text=text,
        token_ids=tokens,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        first_token_seconds=first_token_seconds,
        decode_steps=steps,
        timings=dict(getattr(model, "last_timings", {})),
    )

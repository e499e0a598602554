"""The shared generation loop: stopping, UTF-8-safe streaming, stop strings, sampling options, errors."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperjax.errors import InvalidPromptError, SamplingConfigError
from hyperjax.generate import generate_tokens, plan_capacity
from hyperjax.kernels.sampling import GREEDY, SamplingConfig

EOS = 0


class ScriptedByteModel:
    """A byte-level decoder whose greedy continuation is a fixed script (token id = byte value + 1)."""

    def __init__(self, script: bytes, context_length: int = 4096):
        self.script = [b + 1 for b in script] + [EOS]
        self.vocab_size = 257
        self.context_length = context_length
        self.stop_ids = frozenset({EOS})
        self.prefill_calls = 0

    def _logits(self, index: int):
        logits = np.full(self.vocab_size, -5.0, np.float32)
        target = self.script[min(index, len(self.script) - 1)]
        logits[(target + 1) % self.vocab_size] = 1.0  # a runner-up, for the repetition penalty to promote
        logits[target] = 5.0
        return jnp.asarray(logits)

    def prefill(self, prompt_ids: Sequence[int], capacity: int):
        self.prefill_calls += 1
        assert capacity >= len(prompt_ids)
        return self._logits(0), 0

    def step(self, state: int, token: int, position: int):
        return self._logits(state + 1), state + 1

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id == EOS else bytes([token_id - 1])


def test_greedy_follows_script_and_stops_at_eos():
    model = ScriptedByteModel("héllo wörld".encode())
    result = generate_tokens(model, [1, 2, 3], max_new_tokens=50, sampling=GREEDY)
    assert result.text == "héllo wörld"
    assert result.finish_reason == "eos"
    assert len(result.token_ids) == len("héllo wörld".encode())


def test_max_tokens_limits_output():
    result = generate_tokens(ScriptedByteModel(b"abcdefgh"), [1], max_new_tokens=3, sampling=GREEDY)
    assert result.text == "abc" and result.finish_reason == "length"


def test_ignore_eos_continues_past_stop_ids():
    result = generate_tokens(ScriptedByteModel(b"ab"), [1], max_new_tokens=5, sampling=GREEDY, ignore_eos=True)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=12))
def test_streamed_pieces_are_whole_characters_and_join_to_the_text(text):
    pieces: list[str] = []
    model = ScriptedByteModel(text.encode())
    result = generate_tokens(model, [1], max_new_tokens=64, sampling=GREEDY, on_text=pieces.append)
    assert "".join(pieces) == result.text == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_output_and_is_never_streamed():
    pieces: list[str] = []
    model = ScriptedByteModel(b"one two STOP three")
    result = generate_tokens(
        model, [1], max_new_tokens=64, sampling=GREEDY, stop_strings=["STOP"], on_text=pieces.append
    )
    assert result.text == "one two " and result.finish_reason == "stop"
    assert "".join(pieces) == "one two "


def test_partial_stop_string_prefix_is_released_when_it_does_not_complete():
    result = generate_tokens(
        ScriptedByteModel(b"a STAR b"), [1], max_new_tokens=64, sampling=GREEDY, stop_strings=["STOP"]
    )
    assert result.text == "a STAR b" and result.finish_reason == "eos"


def test_invalid_utf8_bytes_become_replacement_characters():
    model = ScriptedByteModel(b"ok\xff\xfeend")
    assert generate_tokens(model, [1], max_new_tokens=64, sampling=GREEDY).text == "ok\ufffd\ufffdend"


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds():
    model = ScriptedByteModel(b"abcdefghijklmnop")
    hot = SamplingConfig(temperature=20.0, top_k=0, top_p=1.0, min_p=0.0)
    a = generate_tokens(model, [1], max_new_tokens=12, sampling=hot, seed=7, ignore_eos=True)
    b = generate_tokens(model, [1], max_new_tokens=12, sampling=hot, seed=7, ignore_eos=True)
    c = generate_tokens(model, [1], max_new_tokens=12, sampling=hot, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_repetition_penalty_changes_greedy_choice():
    model = ScriptedByteModel(b"aaaa")
    plain = generate_tokens(model, [ord("a") + 1], max_new_tokens=3, sampling=GREEDY)
    penalized = generate_tokens(
        model, [ord("a") + 1], max_new_tokens=3, sampling=SamplingConfig(temperature=0.0, repeat_penalty=10.0)
    )
    assert plain.text == "aaa"
    # "a" is in the window (the prompt): 5/10 < 1, so "b" wins once; then both are penalized and 0.5 > 0.1.
    assert penalized.text == "baa"


@pytest.mark.parametrize(
    ("prompt", "kwargs"),
    [([], {}), ([1], {"max_new_tokens": 0}), ([999], {})],
)
def test_bad_requests_raise_invalid_prompt(prompt, kwargs):
    with pytest.raises(InvalidPromptError):
        generate_tokens(ScriptedByteModel(b"x"), prompt, **kwargs)


def test_bad_sampling_option_is_named():
    with pytest.raises(SamplingConfigError, match="top_p"):
        generate_tokens(ScriptedByteModel(b"x"), [1], sampling=SamplingConfig(top_p=1.5))


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(InvalidPromptError, match="context"):
        generate_tokens(ScriptedByteModel(b"x", context_length=8), list(range(1, 9)))


def test_capacity_buckets_and_context_cap():
    assert plan_capacity(10, 20, 8192) == (256, 20)
    assert plan_capacity(300, 100, 8192) == (512, 100)
    assert plan_capacity(100, 1000, 512) == (512, 412)

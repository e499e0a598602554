"""Sampling kernels against numpy references of llama.cpp's rules, plus statistics and jit behaviour."""

from __future__ import annotations

import math
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from hyperjax.errors import SamplingConfigError
from hyperjax.kernels.sampling import (
    GREEDY,
    SamplingConfig,
    apply_repetition_penalty,
    filter_logits,
    greedy,
    init_recent,
    sample_token,
    update_recent,
)

V = 64
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)
SETTINGS = settings(max_examples=30, deadline=None)

_filter = jax.jit(filter_logits)
_sample = jax.jit(sample_token)
_sample_keys = jax.jit(jax.vmap(sample_token, in_axes=(0, None, None)))
_penalize = jax.jit(apply_repetition_penalty)
_update = jax.jit(update_recent)


def _keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def _floats(bound: float) -> st.SearchStrategy[float]:
    """float32 values whose results stay normal: XLA:CPU flushes subnormals to zero, numpy does not."""
    return st.floats(-bound, bound, width=32).map(lambda v: v if abs(v) > 1e-30 else 0.0)


def _logits(shape=(V,), unique: bool = True):
    return arrays(np.float32, shape, elements=_floats(12), unique=unique)


def _reference_keep(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """llama.cpp's chain in float64: top-k, then top-p over the renormalized survivors, then min-p."""
    min_p = float(np.float32(min_p))
    order = np.argsort(-x.astype(np.float64), kind="stable")
    kept = order[: top_k if 0 < top_k < len(x) else len(x)]
    if top_p < 1:
        p = np.exp(x[kept] - x[kept].max())
        cumulative = np.cumsum(p / p.sum())
        kept = kept[: int(np.searchsorted(cumulative, top_p)) + 1]
    if min_p > 0:
        kept = kept[x[kept] >= x.max() + np.log(np.float32(min_p))]
    return set(kept.tolist())


def _assume_clear_boundaries(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> None:
    """Skip inputs where float32 and float64 could disagree: a top-p prefix sum or min-p floor near the cut."""
    order = np.argsort(-x.astype(np.float64))
    kept = order[: top_k if 0 < top_k < len(x) else len(x)]
    p = np.exp(x[kept] - x[kept].max())
    assume(np.abs(np.cumsum(p / p.sum()) - top_p).min() > 1e-4 or top_p == 1)
    assume(min_p == 0 or np.abs(x - (x.max() + np.log(min_p))).min() > 1e-4)


def _naive_penalty(x: np.ndarray, tokens: np.ndarray, mask: np.ndarray, penalty: float) -> np.ndarray:
    """llama.cpp: each distinct token of the window once; logit <= 0 multiplied, otherwise divided."""
    out = x.copy()
    p = np.float32(penalty)
    for t in {int(t) for t, m in zip(tokens, mask, strict=True) if m and 0 <= t < len(x)}:
        out[t] = out[t] * p if out[t] <= 0 else out[t] / p
    return out


@SETTINGS
@given(x=_logits((3, V), unique=False), seed=st.integers(0, 2**31 - 1))
def test_greedy_is_argmax(x, seed):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(_sample(key, x, GREEDY), np.argmax(x, -1))
    hot = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)
    np.testing.assert_array_equal(_sample(key, x, hot), np.argmax(x, -1))
    only_max = np.isfinite(np.asarray(_filter(x, hot)))
    np.testing.assert_array_equal(only_max, x == x.max(-1, keepdims=True))


@SETTINGS
@given(x=arrays(np.float32, (4, 9), elements=st.sampled_from([-np.inf, -1.0, 0.0, 2.5, np.inf, np.nan])))
def test_greedy_returns_what_argmax_returns(x):
    """Ties, infinities and NaN included: the first maximal index, or the first NaN's."""
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy)(jnp.asarray(x))), np.argmax(x, -1))


@SETTINGS
@given(x=_logits(), temperature=st.floats(0.05, 20), seed=st.integers(0, 2**31 - 1))
def test_top_k_one_is_argmax_at_any_temperature(x, temperature, seed):
    for rest in (OFF, dict(top_p=0.95, min_p=0.05)):
        config = SamplingConfig(temperature=temperature, **{**rest, "top_k": 1})
        tokens = _sample_keys(_keys(16, seed), x, config)
        assert set(np.asarray(tokens).tolist()) == {int(np.argmax(x))}


@SETTINGS
@given(
    x=_logits(),
    top_k=st.integers(0, V + 8),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
    temperature=st.floats(0.1, 4),
)
def test_filter_matches_numpy_chain(x, top_k, top_p, min_p, temperature):
    _assume_clear_boundaries(x, top_k, top_p, min_p)
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = np.asarray(_filter(x, config))
    keep = _reference_keep(x, top_k, top_p, min_p)
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == keep
    idx = sorted(keep)
    np.testing.assert_array_equal(out[idx], x[idx] / np.float32(temperature))
    assert np.all(out[np.isinf(out)] < 0)


@pytest.mark.parametrize("which", ["top_k", "top_p", "min_p"])
@settings(max_examples=25, deadline=None)
@given(x=_logits(), level=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_samples_lie_in_the_kept_set(which, x, level, seed):
    options = {**OFF}
    options[which] = {"top_k": 1 + int(level * 20), "top_p": 0.05 + 0.9 * level, "min_p": 0.01 + 0.5 * level}[which]
    _assume_clear_boundaries(x, options["top_k"], options["top_p"], options["min_p"])
    tokens = np.asarray(_sample_keys(_keys(512, seed), x, SamplingConfig(temperature=2.0, **options)))
    allowed = _reference_keep(x, options["top_k"], options["top_p"], options["min_p"])
    assert set(tokens.tolist()) <= allowed


def test_llm_sized_vocabulary_rows():
    x = np.random.default_rng(7).normal(scale=3.0, size=(2, 49_152)).astype(np.float32)
    config = SamplingConfig(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)
    kept = np.isfinite(np.asarray(_filter(x, config)))
    for row in range(2):
        assert set(np.flatnonzero(kept[row]).tolist()) == _reference_keep(x[row], 0, 0.9, 0.0)
    top40 = np.isfinite(np.asarray(_filter(x, SamplingConfig(temperature=1.0, **{**OFF, "top_k": 40}))))
    for row in range(2):
        assert set(np.flatnonzero(top40[row]).tolist()) == set(np.argsort(-x[row])[:40].tolist())
    tokens = np.asarray(_sample(jax.random.key(3), x, SamplingConfig()))
    assert tokens.shape == (2,) and tokens.dtype == np.int32
    for row in range(2):
        assert tokens[row] in _reference_keep(x[row], 40, 0.95, 0.05)


def test_top_k_keeps_ties_at_the_boundary():
    x = jnp.array([0.0, 2.0, 1.0, 1.0, 1.0, -1.0])
    kept = np.isfinite(np.asarray(_filter(x, SamplingConfig(temperature=1.0, **{**OFF, "top_k": 2}))))
    np.testing.assert_array_equal(kept, [False, True, True, True, True, False])


def test_negative_infinity_is_never_sampled():
    x = np.full(V, -np.inf, np.float32)
    live = np.array([3, 17, 40, 63])
    x[live] = [0.0, -1.0, 0.5, -0.2]
    for config in (SamplingConfig(temperature=50.0, **OFF), SamplingConfig(temperature=1.0)):
        tokens = np.asarray(_sample_keys(_keys(2000, 1), x, config))
        assert set(tokens.tolist()) <= set(live.tolist())
    assert set(np.asarray(_sample_keys(_keys(2000, 2), x, SamplingConfig(temperature=50.0, **OFF)))) == set(live)


@pytest.mark.parametrize(
    ("options", "kept"),
    [(dict(temperature=0.7, **OFF), range(8)), (dict(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0), range(3, 8))],
)
def test_frequencies_match_softmax(options, kept):
    x = np.array([-1.0, -0.5, 0.0, 0.3, 0.6, 0.9, 1.2, 1.5], np.float32)
    n = 4000
    tokens = np.asarray(_sample_keys(_keys(n, 11), x, SamplingConfig(**options)))
    counts = np.bincount(tokens, minlength=len(x))
    z = np.zeros(len(x))
    idx = list(kept)
    z[idx] = np.exp(x[idx] / options["temperature"])
    p = z / z.sum()
    assert counts[p == 0].sum() == 0
    assert 0.5 * np.abs(counts / n - p).sum() < 0.03
    assert stats.chisquare(counts[idx], n * p[idx]).pvalue > 1e-3


@given(
    data=st.data(),
    n=st.integers(1, 24),
    penalty=st.floats(0.05, 5.0),
)
@SETTINGS
def test_repetition_penalty_matches_llama_cpp_rule(data, n, penalty):
    x = data.draw(arrays(np.float32, (2, 32), elements=st.sampled_from([0.0, -0.0, 1.5, -2.25]) | _floats(30)))
    tokens = data.draw(arrays(np.int32, (2, n), elements=st.integers(-3, 35)))
    mask = data.draw(arrays(np.bool_, (2, n)))
    out = np.asarray(_penalize(x, tokens, mask, penalty))
    for row in range(2):
        np.testing.assert_array_equal(out[row], _naive_penalty(x[row], tokens[row], mask[row], penalty))
    shared = np.asarray(_penalize(x, tokens[0], mask[0], penalty))
    for row in range(2):
        np.testing.assert_array_equal(shared[row], _naive_penalty(x[row], tokens[0], mask[0], penalty))


def test_sample_token_penalizes_recent_tokens_once():
    x = jnp.array([0.0, 2.0, 1.9, -1.0, 1.0])
    recent = jnp.array([1, 1, 1, 3, 0], jnp.int32)
    mask = jnp.array([True, True, True, True, False])
    key = jax.random.key(0)
    penalized = replace(GREEDY, repeat_penalty=1.1)
    assert int(_sample(key, x, penalized, recent, mask)) == 2  # 2.0 / 1.1 once, not 2.0 / 1.1**3
    assert float(apply_repetition_penalty(x, recent, mask, 1.1)[1]) == pytest.approx(2.0 / 1.1)
    assert int(_sample(key, x, GREEDY, recent, mask)) == 1
    no_window = replace(penalized, repeat_last_n=0)
    assert int(_sample(key, x, no_window, recent, mask)) == 1
    assert int(_sample(key, x, penalized, recent)) == 2


def test_same_key_same_tokens():
    x = jnp.zeros((4, V))
    config = SamplingConfig(temperature=1.0, **OFF)
    keys = _keys(64, 5)
    first, again = _sample_keys(keys, x, config), _sample_keys(keys, x, config)
    np.testing.assert_array_equal(first, again)
    assert len(np.unique(np.asarray(first))) > 16
    assert not np.array_equal(first, _sample_keys(_keys(64, 6), x, config))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("min_p", -0.01),
        ("min_p", 1.0),
        ("repeat_penalty", 0.0),
        ("repeat_penalty", -1.0),
        ("repeat_penalty", math.inf),
        ("repeat_last_n", -1),
        ("repeat_last_n", 8.0),
        ("temperature", "hot"),
    ],
)
def test_validate_rejects_out_of_range(name, value):
    with pytest.raises(SamplingConfigError, match=name) as info:
        SamplingConfig(**{name: value}).validate()
    assert isinstance(info.value, ValueError)


def test_validate_accepts_and_normalizes():
    assert SamplingConfig().validate() == SamplingConfig()
    assert GREEDY.validate() == GREEDY
    odd = SamplingConfig(temperature=np.float64(0.5), top_k=np.int64(7), top_p=1, repeat_last_n=np.int32(0))
    valid = odd.validate()
    assert valid == SamplingConfig(temperature=0.5, top_k=7, top_p=1.0, repeat_last_n=0)
    assert [type(v) for v in jax.tree_util.tree_leaves(valid)] == [float, int, float, float, float, int]


def test_option_values_do_not_retrace():
    traces = []

    @jax.jit
    def step(key, logits, config, recent):
        traces.append(None)
        return sample_token(key, logits, config, recent)

    x = jnp.linspace(-3.0, 3.0, V)
    recent = jnp.arange(8, dtype=jnp.int32)
    configs = [
        SamplingConfig(),
        SamplingConfig(temperature=1.3, top_k=5),
        SamplingConfig(temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1.3, repeat_last_n=0),
        SamplingConfig(temperature=0.2, top_k=1000, top_p=0.5, min_p=0.3, repeat_penalty=0.9),
        GREEDY,
    ]
    tokens = [int(step(jax.random.key(0), x, c.validate(), recent)) for c in configs]
    assert len(traces) == 1 and step._cache_size() == 1
    assert tokens[2] == tokens[4] == V - 1


def test_filter_under_vmap_over_configs():
    x = jnp.asarray(np.random.default_rng(1).normal(size=V).astype(np.float32))
    configs = [
        SamplingConfig(temperature=t, top_k=k, top_p=p) for t, k, p in [(0.0, 0, 1.0), (1.0, 3, 1.0), (2.0, 0, 0.5)]
    ]
    stacked = jax.tree_util.tree_map(lambda *v: jnp.asarray(v), *configs)
    batched = jax.vmap(filter_logits, in_axes=(None, 0))(x, stacked)
    for row, config in zip(batched, configs, strict=True):
        np.testing.assert_array_equal(row, _filter(x, config))


@SETTINGS
@given(
    prompt=st.lists(st.integers(0, 255), min_size=1, max_size=12),
    more=st.lists(st.integers(0, 255), max_size=12),
    size=st.integers(1, 8),
)
def test_ring_buffer_holds_the_last_tokens(prompt, more, size):
    tokens, mask = init_recent(jnp.asarray(prompt, jnp.int32), size)
    for i, t in enumerate(more):
        tokens, mask = _update(tokens, mask, len(prompt) + i, t)
    sequence = prompt + more
    expected = np.zeros(size, np.int32)
    valid = np.zeros(size, bool)
    for i, t in enumerate(sequence[-size:], start=max(len(sequence) - size, 0)):
        expected[i % size], valid[i % size] = t, True
    np.testing.assert_array_equal(mask, valid)
    np.testing.assert_array_equal(np.where(valid, tokens, 0), expected)


def test_update_recent_batched_positions():
    tokens = jnp.zeros((2, 4), jnp.int32)
    mask = jnp.zeros((2, 4), bool)
    tokens, mask = update_recent(tokens, mask, jnp.array([1, 6]), jnp.array([7, 9]))
    np.testing.assert_array_equal(tokens, [[0, 7, 0, 0], [0, 0, 9, 0]])
    np.testing.assert_array_equal(mask, [[False, True, False, False], [False, False, True, False]])

"""Entropy patching: entropy sources against numpy, boundary rules against a sequential reference,
UTF-8 safety on multilingual and invalid input, static-shape batching, the Tiny Shakespeare defaults."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperjax.kernels.patching import (
    DEFAULTS,
    MAX_CONTINUATION_RUN,
    MAX_WINDOW,
    BigramModel,
    Patches,
    bigram_entropy,
    fit_bigram,
    lm_entropy,
    make_patches,
    patch_boundaries,
    patch_text,
    window_entropy,
)
from tests.conftest import SHARED

SETTINGS = settings(max_examples=40, deadline=None)
T = 256  # one padded width for the property tests: one compiled version per mode

MULTILINGUAL = [
    "Café crème brûlée, naïve façade — Ærøskøbing, Łódź, İstanbul.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Family 👨‍👩‍👧‍👦, thumbs 👍🏽👍🏿, flags 🇫🇷🇯🇵, 🏳️‍🌈 and 🧑🏻‍💻 at work.",
    "Combining: e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0321\u0327a\u0336l\u0337g\u0338o\u0334.",
    "مرحبا بالعالم، هذا نص عربي مع تشكيل: كَتَبَ الوَلَدُ.",
    "Mixed: naïve 日本 👩🏾‍🔬 مرحبا e\u0301\u0301 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝄞 end",
]
CORPUS = ("\n".join(MULTILINGUAL) * 3).encode() + b"To be, or not to be, that is the question. " * 20
MODEL = fit_bigram(CORPUS)
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

_window = jax.jit(window_entropy, static_argnums=1)
_bigram = jax.jit(bigram_entropy)
_boundaries = jax.jit(patch_boundaries, static_argnames=("mode",))
_make = jax.jit(make_patches, static_argnums=1)


def _is_cont(b: int) -> bool:
    return 0x80 <= b < 0xC0


@partial(jax.jit, static_argnames=("source", "mode"))
def _pipeline(x, valid_len, threshold, min_len, max_len, noise, *, source, mode):
    """Start mask of a padded uint8 (…, T) buffer; source "window", "bigram" or "noise" (given entropy)."""
    if source == "window":
        e = window_entropy(x, 8)
    elif source == "bigram":
        e = bigram_entropy(MODEL, x)
    else:
        e = noise
    options = dict(threshold=threshold, mode=mode, min_len=min_len, max_len=max_len, valid_len=valid_len)
    return patch_boundaries(e, x, **options)


def _starts(data: bytes, *, source: str, mode: str, threshold: float, min_len: int, max_len: int, seed=0):
    """Patch starts (numpy int) of `data`, padded to T."""
    buf = np.zeros(T, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    noise = np.random.default_rng(seed).uniform(0, 8, T).astype(np.float32)
    mask = _pipeline(buf, len(data), threshold, min_len, max_len, noise, source=source, mode=mode)
    return np.flatnonzero(np.asarray(mask))


def _ref_starts(e, x, threshold, mode, min_len, max_len, valid_len):
    """The boundary rules, one position at a time in Python."""
    e = np.asarray(e, np.float32)
    out, last = [], 0
    for t in range(valid_len):
        stray = all(_is_cont(x[t - k]) for k in range(MAX_CONTINUATION_RUN + 1)) if t >= 3 else False
        allowed = not _is_cont(x[t]) or stray
        rise = e[t] - (e[t - 1] if t else np.float32(0))
        want = (e[t] if mode == "global" else rise) > threshold
        if t == 0 or (allowed and ((want and t - last >= min_len) or t - last >= max_len)):
            out.append(t)
            last = t
    return np.asarray(out, np.int64)


def _check(data: bytes, starts: np.ndarray, min_len: int, max_len: int) -> list[bytes]:
    """Every invariant of a patching of `data`; returns the patches."""
    if not data:
        assert starts.size == 0
        return []
    assert starts[0] == 0 and np.all(np.diff(starts) > 0) and starts[-1] < len(data)
    ends = [*starts[1:].tolist(), len(data)]
    patches = [data[a:b] for a, b in zip(starts.tolist(), ends, strict=True)]
    assert b"".join(patches) == data
    for i, (a, p) in enumerate(zip(starts.tolist(), patches, strict=True)):
        if i + 1 < len(patches):
            assert len(p) >= min_len
        assert len(p) <= max_len + MAX_CONTINUATION_RUN
        if len(p) > max_len:  # only a run of continuation bytes may stretch a patch
            assert all(_is_cont(b) for b in p[max_len:])
        if a and _is_cont(data[a]):  # only a stray byte (4th+ of a continuation run) may start a patch
            assert a >= 3 and all(_is_cont(data[a - k]) for k in range(1, 4))
    # no structurally encoded character (lead byte + its continuation bytes) is ever split
    cut = set(starts.tolist())
    for i, b in enumerate(data):
        k = 1 if 0xC0 <= b < 0xE0 else 2 if 0xE0 <= b < 0xF0 else 3 if 0xF0 <= b < 0xF8 else 0
        if k and i + k < len(data) and all(_is_cont(c) for c in data[i + 1 : i + k + 1]):
            assert not cut & set(range(i + 1, i + k + 1))
    return patches


def _np_window_entropy(x: np.ndarray, window: int) -> np.ndarray:
    out = np.zeros(len(x))
    for t in range(len(x)):
        c = np.bincount(x[max(0, t - window + 1) : t + 1], minlength=256)
        p = c[c > 0] / c.sum()
        out[t] = -(p * np.log2(p)).sum()
    return out


def _np_entropy_bits(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1)


# --- entropy sources ----------------------------------------------------------------------------------------


@SETTINGS
@given(
    st.lists(st.integers(0, 7), max_size=60).map(lambda v: np.asarray(v, np.uint8)),
    st.sampled_from([1, 2, 3, 5, 16]),
    st.integers(0, 248),
)
def test_window_entropy_matches_numpy(small, window, offset):
    x = small + np.uint8(offset)  # a small alphabet, so windows repeat bytes
    padded = np.pad(x, (0, 64 - len(x)), constant_values=3)  # causal: padding cannot change earlier positions
    e = np.asarray(_window(padded, window))[: len(x)]
    np.testing.assert_allclose(e, _np_window_entropy(x, window), atol=2e-6)


def test_window_entropy_batched_and_long_input_does_not_drift():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 12, size=(2, 60_000)).astype(np.uint8)
    x[1, 30_000:40_000] = 7  # a constant stretch in the middle
    e = np.asarray(_window(x, 16))
    assert e.shape == x.shape and e.dtype == np.float32
    for t in [*rng.integers(0, 60_000, 40), 59_999]:
        for row in range(2):
            ref = _np_window_entropy(x[row, t - 15 : t + 1], 16)[-1]
            assert abs(e[row, t] - ref) < 2e-6
    assert np.all(e[1, 30_015:40_000] == 0.0)


def test_window_entropy_edge_cases():
    assert np.all(np.asarray(_window(np.full(100, 65, np.uint8), 16)) == 0.0)
    assert _window(np.zeros(0, np.uint8), 4).shape == (0,)
    np.testing.assert_allclose(_window(np.arange(200, 264, dtype=np.uint8), 64)[-1], 6.0, rtol=1e-6)
    for bad in (0, MAX_WINDOW + 1, 4.0):
        with pytest.raises(ValueError, match="window"):
            window_entropy(np.zeros(4, np.uint8), bad)


def test_lm_entropy_aligns_and_matches_numpy():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((3, 10, 256)) * 3).astype(np.float32)
    logits[0, 4] = -np.inf
    logits[0, 4, 17] = 5.0  # a certain prediction: 0 bits, not NaN
    e = np.asarray(lm_entropy(logits))
    assert e.shape == (3, 10) and e.dtype == np.float32
    np.testing.assert_allclose(e[:, 0], 8.0)
    np.testing.assert_allclose(e[:, 1:], _np_entropy_bits(logits[:, :-1]), atol=2e-5)
    assert e[0, 5] == 0.0
    np.testing.assert_allclose(lm_entropy(np.zeros((2, 256), np.float32)), [8.0, 8.0], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([1, 2, 30, 300]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),  # few shapes: fast
    st.binary(max_size=50),
    st.sampled_from([0.01, 0.5, 1.0]),
)
def test_bigram_matches_numpy(corpus, query, alpha):
    model = fit_bigram(corpus, alpha)
    c = np.frombuffer(corpus, np.uint8).astype(np.int64)
    counts = np.zeros((257, 256), np.int64)
    np.add.at(counts, (c[:-1], c[1:]), 1)
    np.add.at(counts, (np.full(len(c), 256), c), 1)
    np.testing.assert_array_equal(model.counts, counts)
    p = (counts + alpha) / (counts + alpha).sum(-1, keepdims=True)
    row_h = -(p * np.log2(p)).sum(-1)
    q = np.frombuffer(query, np.uint8).astype(np.int64)
    ref = row_h[np.concatenate([[256], q[:-1]])[: len(q)]]
    padded = np.zeros(50, np.uint8)
    padded[: len(q)] = q
    np.testing.assert_allclose(np.asarray(_bigram(model, padded))[: len(q)], ref, atol=2e-5)


def test_bigram_model_is_a_pytree():
    leaves, treedef = jax.tree_util.tree_flatten(MODEL)
    assert len(leaves) == 2
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, BigramModel)
    x = np.frombuffer(b"To be or not", np.uint8)
    np.testing.assert_array_equal(_bigram(again, x), bigram_entropy(MODEL, x))


# --- boundaries ---------------------------------------------------------------------------------------------

BOUNDARY_OPTIONS = st.tuples(
    st.sampled_from(["window", "bigram", "noise"]),
    st.sampled_from(["global", "relative"]),
    st.floats(-1.0, 6.0, width=32),
    st.integers(1, 6),
    st.integers(0, 12),
    st.integers(0, 2**16),
)


def _run_and_check(data: bytes, options) -> list[bytes]:
    source, mode, threshold, min_len, extra, seed = options
    max_len = min_len + extra
    kw = dict(source=source, mode=mode, threshold=threshold, min_len=min_len, max_len=max_len)
    starts = _starts(data, **kw, seed=seed)
    if source == "noise":  # the sequential reference, rule by rule
        buf = np.zeros(T, np.uint8)
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        e = np.random.default_rng(seed).uniform(0, 8, T).astype(np.float32)
        ref = _ref_starts(e, buf, threshold, mode, min_len, max_len, len(data))
        np.testing.assert_array_equal(starts, ref)
    return _check(data, starts, min_len, max_len)


@pytest.mark.parametrize("text", MULTILINGUAL)
@pytest.mark.parametrize("source", ["window", "bigram"])
@pytest.mark.parametrize(("min_len", "max_len"), [(1, 1), (1, 4), (2, 6), (3, 12)])
def test_multilingual_patches_decode(text, source, min_len, max_len):
    mode, threshold = ("relative", 0.05) if source == "window" else ("global", 3.0)
    data = text.encode()
    starts = _starts(data, source=source, mode=mode, threshold=threshold, min_len=min_len, max_len=max_len)
    patches = _check(data, starts, min_len, max_len)
    assert not any(_is_cont(data[s]) for s in starts)
    assert "".join(p.decode("utf-8") for p in patches) == text


@SETTINGS
@given(st.text(max_size=60), BOUNDARY_OPTIONS)
def test_valid_utf8_never_split(text, options):
    data = text.encode()
    patches = _run_and_check(data, options)
    assert "".join(p.decode("utf-8") for p in patches) == text  # every patch decodes on its own


@SETTINGS
@given(st.binary(max_size=T), BOUNDARY_OPTIONS)
def test_arbitrary_bytes_keep_invariants(data, options):
    _run_and_check(data, options)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe",
        b"\x80",
        b"\x80" * 40,
        b"ab\xbf\xbf\xbfcd" * 5,
        b"hello \xf0\x9f\x98",  # truncated 4-byte sequence at the end
        b"\xf0\x9f\x98 and more text after it \xf0\x9f\x98\x80",
        b"\xc3" * 20 + b"\xa9" * 20,
        b"\xed\xa0\x80\xc0\xaf\xf8\x88\x80\x80\x80",  # surrogate, overlong, 5-byte form
    ],
)
@pytest.mark.parametrize("source", ["window", "bigram"])
def test_invalid_utf8_keeps_invariants(data, source):
    for min_len, max_len in [(1, 1), (1, 3), (2, 8)]:
        for mode, threshold in [("global", 0.0), ("relative", 0.0), ("global", 9.0)]:
            options = dict(source=source, mode=mode, threshold=threshold, min_len=min_len, max_len=max_len)
            starts = _starts(data, **options)
            _check(data, starts, min_len, max_len)


@SETTINGS
@given(st.binary(min_size=2, max_size=T), st.data())
def test_patching_is_causal(data, draw):
    t = draw.draw(st.integers(0, len(data) - 2))
    changed = bytearray(data)
    changed[t + 1] = draw.draw(st.integers(0, 255))
    for source, mode, threshold in [("window", "relative", 0.05), ("bigram", "global", 3.0)]:
        kw = dict(source=source, mode=mode, threshold=threshold, min_len=2, max_len=5)
        before, after = _starts(data, **kw), _starts(bytes(changed), **kw)
        np.testing.assert_array_equal(before[before <= t], after[after <= t])


def test_continuation_run_moves_a_forced_start_forward():
    data = b"abc\xf0\x9f\x98\x80xyz"
    starts = _starts(data, source="noise", mode="global", threshold=99.0, min_len=1, max_len=4)
    np.testing.assert_array_equal(starts, [0, 7])  # the forced start at 4 moves past the emoji's bytes
    stray = b"a" + b"\x80" * 10
    starts = _starts(stray, source="noise", mode="global", threshold=99.0, min_len=1, max_len=2)
    np.testing.assert_array_equal(starts, [0, 4, 6, 8, 10])  # 4 is the 4th continuation byte in a row


def test_constant_bytes_give_max_len_patches():
    data = b"a" * 100
    for mode in ("global", "relative"):
        starts = _starts(data, source="window", mode=mode, threshold=0.0, min_len=1, max_len=7)
        np.testing.assert_array_equal(starts, np.arange(0, 100, 7))


def test_global_and_relative_rules_on_a_hand_example():
    e = np.asarray([5, 1, 6, 6, 2, 7, 3, 3.5, 9, 0], np.float32)
    x = np.frombuffer(b"abcdefghij", np.uint8)
    glob = patch_boundaries(e, x, threshold=4.0, mode="global", min_len=1, max_len=10)
    np.testing.assert_array_equal(np.flatnonzero(glob), [0, 2, 3, 5, 8])
    rel = patch_boundaries(e, x, threshold=0.4, mode="relative", min_len=1, max_len=10)
    np.testing.assert_array_equal(np.flatnonzero(rel), [0, 2, 5, 7, 8])
    spaced = patch_boundaries(e, x, threshold=4.0, mode="global", min_len=2, max_len=4)
    np.testing.assert_array_equal(np.flatnonzero(spaced), [0, 2, 5, 8])


def test_empty_and_padding():
    x = np.frombuffer(b"hello world, padding follows", np.uint8)
    e = _window(x, 4)
    assert not np.any(_boundaries(e, x, threshold=0.0, valid_len=0))
    mask = np.asarray(_boundaries(e, x, threshold=0.0, min_len=1, max_len=3, valid_len=11))
    assert mask[0] and not mask[11:].any()
    empty = np.zeros(0, np.uint8)
    assert _boundaries(np.zeros(0, np.float32), empty, threshold=1.0).shape == (0,)
    p = _make(np.zeros(0, bool), 4)
    assert not np.asarray(p.mask).any() and p.patch_ids.shape == (0,)


def test_option_errors():
    x = np.zeros(4, np.uint8)
    e = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="mode"):
        patch_boundaries(e, x, threshold=1.0, mode="local")
    with pytest.raises(ValueError, match="min_len"):
        patch_boundaries(e, x, threshold=1.0, min_len=0)
    with pytest.raises(ValueError, match="max_len"):
        patch_boundaries(e, x, threshold=1.0, min_len=4, max_len=3)
    with pytest.raises(ValueError, match="shape"):
        patch_boundaries(e[:3], x, threshold=1.0)
    with pytest.raises(ValueError, match="max_patches"):
        make_patches(np.ones(4, bool), 0)
    with pytest.raises(ValueError, match="source"):
        patch_text(b"abc", source="lm")
    with pytest.raises(ValueError, match="mode"):
        patch_text(b"abc", mode="local")
    with pytest.raises(ValueError, match="max_len"):
        patch_text(b"abc", min_len=5, max_len=4)


# --- Patches ------------------------------------------------------------------------------------------------


def _unpack(p: Patches, row: int | None = None):
    take = (lambda a: np.asarray(a)) if row is None else (lambda a: np.asarray(a)[row])
    return take(p.patch_ids), take(p.starts), take(p.lengths), take(p.mask), bool(take(p.truncated))


@SETTINGS
@given(st.binary(max_size=80), st.sampled_from([1, 2, 7, 40]), st.integers(0, 2**16), st.integers(0, 90))
def test_make_patches_tiles_the_input(data, max_patches, seed, valid_len):
    n = 80
    buf = np.zeros(n, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    mask = np.random.default_rng(seed).random(n) < 0.3
    vl = min(valid_len, n)
    ids, starts, lengths, real, truncated = _unpack(_make(mask, max_patches, valid_len))
    true_starts = sorted({0, *np.flatnonzero(mask).tolist()} & set(range(vl)))
    count = len(true_starts)
    assert truncated == (count > max_patches)
    assert real.sum() == min(count, max_patches) and np.all(real[: real.sum()])
    assert lengths.sum() == vl and np.all(lengths[real] > 0) and np.all(lengths[~real] == 0)
    assert np.all(starts[~real] == vl) and np.all(np.diff(starts) >= 0)
    np.testing.assert_array_equal(starts[real], true_starts[:max_patches])
    pieces = [bytes(buf[s : s + k]) for s, k in zip(starts[real], lengths[real], strict=True)]
    assert b"".join(pieces) == bytes(buf[:vl])
    assert np.all(ids[vl:] == -1)
    for j, (s, k) in enumerate(zip(starts[real], lengths[real], strict=True)):
        assert np.all(ids[s : s + k] == j)


def test_make_patches_truncation_merges_into_the_last_patch():
    ids, starts, lengths, real, truncated = _unpack(make_patches(np.ones(10, bool), 4, valid_len=9))
    assert truncated and real.all()
    np.testing.assert_array_equal(starts, [0, 1, 2, 3])
    np.testing.assert_array_equal(lengths, [1, 1, 1, 6])
    np.testing.assert_array_equal(ids, [0, 1, 2, 3, 3, 3, 3, 3, 3, -1])
    ids, starts, lengths, real, truncated = _unpack(make_patches(np.ones(10, bool), 4, valid_len=0))
    assert not truncated and not real.any() and np.all(ids == -1) and np.all(lengths == 0)


def test_jit_vmap_batch_equals_one_at_a_time():
    texts = [MULTILINGUAL[1], "", MULTILINGUAL[2]]
    raw = [t.encode() for t in texts]
    n = max(map(len, raw))
    batch = np.zeros((len(raw), n), np.uint8)
    for i, r in enumerate(raw):
        batch[i, : len(r)] = np.frombuffer(r, np.uint8)
    valid = np.asarray([len(r) for r in raw], np.int32)

    def one(x, vl, entropy_fn):
        options = dict(threshold=2.5, mode="global", min_len=2, max_len=6, valid_len=vl)
        mask = patch_boundaries(entropy_fn(x), x, **options)
        return make_patches(mask, 48, vl)

    for entropy_fn in (partial(window_entropy, window=8), partial(bigram_entropy, MODEL)):
        batched = jax.jit(jax.vmap(partial(one, entropy_fn=entropy_fn)))(batch, valid)
        leading = jax.jit(partial(one, entropy_fn=entropy_fn))(batch, valid)  # native leading batch axis
        for i, r in enumerate(raw):
            alone = jax.jit(partial(one, entropy_fn=entropy_fn))(np.frombuffer(r, np.uint8), len(r))
            pad = n - len(r)
            for got in (_unpack(batched, i), _unpack(leading, i)):
                np.testing.assert_array_equal(got[0], np.concatenate([alone.patch_ids, np.full(pad, -1)]))
                for g, a in zip(got[1:], _unpack(alone)[1:], strict=True):
                    np.testing.assert_array_equal(g, a)


# --- patch_text and the Tiny Shakespeare defaults -----------------------------------------------------------


@pytest.mark.parametrize("source", ["window", "bigram"])
def test_patch_text_lists(source):
    text = MULTILINGUAL[5] + " " + MULTILINGUAL[0]
    out = patch_text(text, source=source, model=MODEL if source == "bigram" else None)
    assert b"".join(out.patches) == text.encode()
    assert out.starts == np.cumsum([0, *map(len, out.patches[:-1])]).tolist()
    assert len(out.entropy) == len(text.encode()) and all(isinstance(v, float) for v in out.entropy)
    assert all(isinstance(p.decode("utf-8"), str) for p in out.patches)
    d = DEFAULTS[source]
    assert all(d.min_len <= len(p) <= d.max_len + MAX_CONTINUATION_RUN for p in out.patches[:-1])
    assert patch_text(b"", source=source).patches == []


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs the shared Tiny Shakespeare file")
@pytest.mark.parametrize("source", ["window", "bigram"])
def test_defaults_give_3_to_8_byte_patches_on_tiny_shakespeare(source):
    data = SHAKESPEARE.read_bytes()
    cut = int(len(data) * 0.9)
    model = fit_bigram(data[:cut]) if source == "bigram" else None
    out = patch_text(data[cut:], source=source, model=model)
    lengths = np.asarray([len(p) for p in out.patches])
    assert 3.0 <= lengths.mean() <= 8.0
    assert lengths.max() <= DEFAULTS[source].max_len

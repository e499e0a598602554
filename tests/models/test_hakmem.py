"""HAKMEM hyperbolic patch model: shapes, normalisation, causality, heads, gradients, training, generation, jit."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperjax.generate import generate_tokens
from hyperjax.kernels.sampling import GREEDY, SamplingConfig
from hyperjax.models import byte_transformer, hakmem
from hyperjax.models.byte_decoder import encode_text
from hyperjax.models.byte_transformer import ByteTransformerConfig
from hyperjax.models.hakmem import HakmemConfig, HakmemDecoder

CONTEXT = 64
SMALL = dict(
    dim=32,
    global_dim=32,
    n_heads=2,
    n_global_heads=2,
    n_encoder_layers=1,
    n_global_layers=1,
    n_decoder_layers=1,
    mlp_ratio=2,
    ngram_sizes=(2, 3),
    ngram_table=64,
    context_length=CONTEXT,
    patch_threshold=2.5,  # varied patch lengths on the short test texts
)
CONFIG = HakmemConfig(**SMALL)
ROWS, LENGTH = 8, 32  # every teacher-forced call uses (ROWS, LENGTH) bytes, so each model compiles apply once
APPLY = jax.jit(hakmem.apply)
TEXT = b"the cat sat on the mat; the dog ate the frog. "


@pytest.fixture(scope="module")
def model():
    return hakmem.init(CONFIG, seed=1)


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.int32)


def text_bytes(n: int, offset: int = 0) -> np.ndarray:
    return np.frombuffer((TEXT * 4)[offset : offset + n], np.uint8).astype(np.int32)


def log_probs_of(graphdef, params, rows: list[np.ndarray]) -> np.ndarray:
    """Teacher-forced log-probs (len(rows), LENGTH, V) for up to ROWS sequences of at most LENGTH bytes."""
    batch = np.zeros((ROWS, LENGTH), np.int32)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    return np.asarray(APPLY(graphdef, params, jnp.asarray(batch)))[: len(rows)]


@pytest.mark.parametrize(
    "change",
    [dict(head="softmax"), dict(dim=30), dict(patch_mode="sometimes"), dict(patch_min_len=0), dict(vocab_size=512)],
)
def test_config_rejects_bad_values(change):
    with pytest.raises(ValueError):
        HakmemConfig(**{**SMALL, **change})


@pytest.mark.parametrize("head", ["hierarchical", "flat"])
def test_shapes_normalisation_and_param_count(head):
    config = HakmemConfig(**{**SMALL, "head": head})
    graphdef, params = hakmem.init(config, seed=0)
    out = log_probs_of(graphdef, params, [random_bytes(LENGTH, seed=i) for i in range(3)] + [text_bytes(LENGTH)])
    assert out.shape == (4, LENGTH, 256) and out.dtype == np.float32
    np.testing.assert_allclose(jax.nn.logsumexp(out, axis=-1), 0.0, atol=1e-5)
    assert hakmem.param_count(config) == sum(x.size for x in jax.tree.leaves(params))


def test_hierarchical_head_is_the_explicit_formula():
    out = np.random.default_rng(0).normal(size=(3, 16 + 256)).astype(np.float32) * 3
    got = np.asarray(hakmem.head_log_probs(jnp.asarray(out), "hierarchical"))

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        return z - np.log(np.exp(z - z.max()).sum()) - z.max()

    for row in range(3):
        high = log_softmax(out[row, :16])
        for b in range(256):
            low = log_softmax(out[row, 16 + 16 * (b >> 4) : 16 + 16 * (b >> 4) + 16])
            np.testing.assert_allclose(got[row, b], high[b >> 4] + low[b & 15], atol=1e-5)
    flat = np.asarray(hakmem.head_log_probs(jnp.asarray(out[:, :256]), "flat"))
    np.testing.assert_allclose(flat, np.asarray(jax.nn.log_softmax(out[:, :256])), atol=1e-6)


def test_ngram_hash_follows_the_documented_formula():
    tokens = random_bytes(10, seed=3)
    ids = np.asarray(hakmem.ngram_ids(jnp.asarray(tokens[None]), (1, 3, 5), 1000))[0]
    for t in range(10):
        for i, n in enumerate((1, 3, 5)):
            h = 0
            for k in range(n - 1, -1, -1):
                h = (h * hakmem.HASH_MULTIPLIER + (int(tokens[t - k]) + 1 if t - k >= 0 else 0)) % 2**32
            h ^= h >> 15
            h = (h * 0x2C1B3C6D) % 2**32
            h ^= h >> 12
            assert ids[t, i] == h % 1000


def test_patches_are_causal_and_span_several_bytes():
    patch_ids = jax.jit(partial(hakmem.patch_ids, CONFIG))
    base = text_bytes(LENGTH)
    pid = np.asarray(patch_ids(jnp.asarray(base[None])))[0]
    assert pid[0] == 0 and np.all(np.diff(pid) >= 0) and 3 < pid[-1] < LENGTH // 2
    for t in (4, 13, 25):
        changed = base.copy()
        changed[t + 1 :] = random_bytes(LENGTH - t - 1, seed=t)
        other = np.asarray(patch_ids(jnp.asarray(changed[None])))[0]
        np.testing.assert_array_equal(other[: t + 1], pid[: t + 1])


@pytest.mark.parametrize("source", ["text", "random"])
def test_causal_changing_a_later_byte_leaves_earlier_log_probs(model, source):
    """The key property: log-probs at ≤ t ignore byte t+1, although byte t+1 may join the patch that holds t."""
    graphdef, params = model
    base = text_bytes(LENGTH, offset=5) if source == "text" else random_bytes(LENGTH, seed=7)
    ts = [0, 2, 7, 12, 19, 26, 30]
    rows = [base]
    for i, t in enumerate(ts):
        changed = base.copy()
        changed[t + 1] = (changed[t + 1] + 1 + 37 * i) % 256
        rows.append(changed)
    out = log_probs_of(graphdef, params, rows)
    for i, t in enumerate(ts, start=1):
        np.testing.assert_allclose(out[i, : t + 1], out[0, : t + 1], atol=1e-6, err_msg=f"t={t}")
        assert np.abs(out[i, t + 1] - out[0, t + 1]).max() > 1e-6


def test_global_patch_states_reach_later_patches(model):
    """Bytes of a later patch read earlier patches' global states: zeroing the global path moves their outputs."""
    graphdef, params = model
    base = text_bytes(LENGTH)
    cut = jax.tree.map(lambda x: x, params)
    cut["cross"][0]["out"]["kernel"] = jnp.zeros_like(params["cross"][0]["out"]["kernel"])
    a, b = log_probs_of(graphdef, params, [base]), log_probs_of(graphdef, cut, [base])
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-4


@pytest.fixture(scope="module")
def grad_step(model):
    graphdef, _ = model
    return jax.jit(jax.value_and_grad(lambda params, batch: hakmem.loss_fn(graphdef, params, batch)))


def test_gradients_are_finite_including_curvature_and_beta(model, grad_step):
    _, params = model
    batch = jnp.asarray(np.stack([random_bytes(LENGTH + 1, seed=1), text_bytes(LENGTH + 1)]))
    loss, grads = grad_step(params, batch)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    block = grads["global_blocks"][0]
    for g in (grads["curvature"], block["beta"], block["gamma"], block["w_qkv"], grads["pool"]["query"]):
        assert float(jnp.abs(g).max()) > 0


def test_adam_steps_reduce_the_loss_and_bits_per_byte(model, grad_step):
    _, params = model
    batch = jnp.asarray(np.stack([text_bytes(LENGTH + 1), text_bytes(LENGTH + 1, offset=11)]))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses = []
    for _ in range(8):
        loss, grads = grad_step(params, batch)
        params, opt_state = update(grads, opt_state, params)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert hakmem.bits_per_byte(losses[0]) == pytest.approx(losses[0] / np.log(2))


def test_apply_rejects_sequences_longer_than_the_context(model):
    with pytest.raises(ValueError):
        hakmem.apply(*model, jnp.zeros((1, CONTEXT + 1), jnp.int32))


def test_jit_takes_params_as_arguments(model):
    """One executable serves every parameter set of a config: params are arguments, not baked-in constants."""
    graphdef, params = model
    base = [text_bytes(LENGTH)]
    a = log_probs_of(graphdef, params, base)
    compiled = APPLY._cache_size()
    b = log_probs_of(graphdef, hakmem.init(CONFIG, seed=2)[1], base)
    assert APPLY._cache_size() == compiled
    assert not np.allclose(a, b)


@pytest.fixture(scope="module")
def decoder(model):
    return HakmemDecoder(*model)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_incremental_decode_matches_teacher_forced_forward(model, decoder, prompt_len):
    graphdef, params = model
    tokens = text_bytes(LENGTH, offset=prompt_len)
    full = log_probs_of(graphdef, params, [tokens])[0]
    log_probs, state = decoder.prefill(list(tokens[:prompt_len]), CONTEXT)
    rows = [log_probs]
    for position in range(prompt_len, LENGTH):
        log_probs, state = decoder.step(state, int(tokens[position]), position)
        rows.append(log_probs)
    np.testing.assert_allclose(np.stack(rows), full[prompt_len - 1 :], atol=1e-4)


def test_batched_byte_steps_complete_patches_per_row(model):
    """Rows whose patches complete at different steps each update only their own global slots and caches."""
    graphdef, params = model
    rows = [text_bytes(LENGTH), random_bytes(LENGTH, seed=4)]
    full = log_probs_of(graphdef, params, rows)
    step = jax.jit(hakmem.forward)
    state = hakmem.init_state(CONFIG, 2, CONTEXT)
    out = []
    for position in range(LENGTH):
        tokens = jnp.asarray(np.stack([row[position : position + 1] for row in rows]))
        log_probs, state = step(graphdef, params, tokens, position, 1, state)
        out.append(log_probs[:, 0])
    np.testing.assert_allclose(np.stack(out, axis=1), full, atol=1e-4)
    last_patch = np.asarray(hakmem.patch_ids(CONFIG, jnp.asarray(np.stack(rows))))[:, -1]
    assert last_patch[0] != last_patch[1]
    np.testing.assert_array_equal(np.asarray(state.ready), last_patch)


def test_greedy_generation_is_the_argmax_of_the_full_forward(model, decoder):
    graphdef, params = model
    prompt = encode_text("the cat")
    result = generate_tokens(decoder, prompt, max_new_tokens=20, sampling=GREEDY)
    assert len(result.token_ids) == 20 and result.finish_reason == "length"
    assert result.text == bytes(result.token_ids).decode("utf-8", errors="replace")
    full = log_probs_of(graphdef, params, [np.asarray(prompt + result.token_ids)])[0]
    np.testing.assert_array_equal(full[len(prompt) - 1 : len(prompt) + 19].argmax(-1), result.token_ids)


def test_sampled_generation_has_the_requested_length(decoder):
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = generate_tokens(decoder, encode_text("the cat"), max_new_tokens=16, sampling=sampling, seed=0)
    b = generate_tokens(decoder, encode_text("the cat"), max_new_tokens=16, sampling=sampling, seed=1)
    assert len(a.token_ids) == len(b.token_ids) == 16
    assert a.token_ids != b.token_ids


def test_decoder_checks_context_and_model(model):
    assert HakmemDecoder(*model, context_length=16).context_length == 16
    with pytest.raises(ValueError):
        HakmemDecoder(*model, context_length=CONTEXT + 1)
    with pytest.raises(TypeError):
        HakmemDecoder(*byte_transformer.init(ByteTransformerConfig(dim=32, n_layers=1, n_heads=2)))

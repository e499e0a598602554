"""Byte RNN and Euclidean byte transformer: shapes, causality, recurrence, incremental decode, training, generation."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperjax.errors import InvalidPromptError
from hyperjax.generate import generate_tokens
from hyperjax.kernels.sampling import GREEDY, SamplingConfig
from hyperjax.models import byte_decoder, byte_transformer, rnn
from hyperjax.models.byte_decoder import ByteDecoder, bits_per_byte, encode_text, prompt_width
from hyperjax.models.byte_transformer import ByteTransformerConfig
from hyperjax.models.rnn import ByteRNNConfig

CONTEXT = 64
CONFIGS = {
    "gru": ByteRNNConfig(embed_dim=16, hidden_dim=32, n_layers=2, cell="gru"),
    "lstm": ByteRNNConfig(embed_dim=16, hidden_dim=32, n_layers=2, cell="lstm"),
    "rope": ByteTransformerConfig(dim=32, n_layers=2, n_heads=4, context_length=CONTEXT, positions="rope"),
    "learned": ByteTransformerConfig(dim=32, n_layers=2, n_heads=4, context_length=CONTEXT, positions="learned"),
}
LENGTH = 32  # every teacher-forced call uses (1, LENGTH) tokens, so each model compiles its forward once
APPLY = {rnn: jax.jit(rnn.apply), byte_transformer: jax.jit(byte_transformer.apply)}


def module_of(config):
    return rnn if isinstance(config, ByteRNNConfig) else byte_transformer


def logits_of(module, graphdef, params, tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced logits (LENGTH, V) for one sequence of at most LENGTH bytes (zero-padded at the end)."""
    padded = np.zeros((1, LENGTH), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(APPLY[module](graphdef, params, jnp.asarray(padded))[0])


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    """(module, graphdef, params) of each tiny model, randomly initialised."""
    config = CONFIGS[request.param]
    module = module_of(config)
    return (module, *module.init(config, seed=1))


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.int32)


@pytest.mark.parametrize("config", [dict(cell="rnn"), dict(hidden_dim=0)])
def test_rnn_config_rejects_bad_values(config):
    with pytest.raises(ValueError):
        ByteRNNConfig(**config)


@pytest.mark.parametrize("config", [dict(positions="alibi"), dict(dim=30, n_heads=4), dict(dim=12, n_heads=4)])
def test_transformer_config_rejects_bad_values(config):
    with pytest.raises(ValueError):
        ByteTransformerConfig(**config)


def test_shapes_and_param_count(model):
    module, graphdef, params = model
    logits = APPLY[module](graphdef, params, jnp.asarray(random_bytes(14).reshape(2, 7)))
    assert logits.shape == (2, 7, 256) and logits.dtype == jnp.float32
    config = ByteDecoder(graphdef, params).config
    assert module.param_count(config) == sum(x.size for x in jax.tree.leaves(params))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_transformer_param_count_scales_with_width_and_depth():
    base = ByteTransformerConfig(dim=32, n_layers=2, n_heads=4)
    count = byte_transformer.param_count
    assert count(ByteTransformerConfig(dim=32, n_layers=4, n_heads=4)) > count(base)
    assert count(ByteTransformerConfig(dim=64, n_layers=2, n_heads=4)) > count(base)
    learned = ByteTransformerConfig(dim=32, n_layers=2, n_heads=4, positions="learned", context_length=100)
    assert count(learned) == count(base) + 100 * 32


@pytest.mark.parametrize("t", [0, 5, 10])
def test_causal_changing_a_later_byte_leaves_earlier_logits(model, t):
    module, graphdef, params = model
    tokens = random_bytes(12)
    changed = tokens.copy()
    changed[t + 1] = (changed[t + 1] + 1) % 256
    a, b = logits_of(module, graphdef, params, tokens), logits_of(module, graphdef, params, changed)
    np.testing.assert_allclose(a[: t + 1], b[: t + 1], atol=1e-6)
    assert not np.allclose(a[t + 1], b[t + 1], atol=1e-6)


def test_output_depends_on_earlier_bytes(model):
    """The RNN recurs (and the transformer attends): changing byte 0 moves the logits at position 5."""
    module, graphdef, params = model
    tokens = random_bytes(8)
    changed = tokens.copy()
    changed[0] = (changed[0] + 7) % 256
    a, b = logits_of(module, graphdef, params, tokens), logits_of(module, graphdef, params, changed)
    assert np.abs(a[5] - b[5]).max() > 1e-4


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_incremental_decode_matches_teacher_forced_forward(model, prompt_len):
    module, graphdef, params = model
    tokens = random_bytes(LENGTH, seed=prompt_len)
    full = logits_of(module, graphdef, params, tokens)
    decoder = ByteDecoder(graphdef, params)
    logits, state = decoder.prefill(list(tokens[:prompt_len]), CONTEXT)
    rows = [logits]
    for position in range(prompt_len, len(tokens)):
        logits, state = decoder.step(state, int(tokens[position]), position)
        rows.append(logits)
    np.testing.assert_allclose(np.stack(rows), full[prompt_len - 1 :], atol=1e-4)


def test_chunked_prompt_matches_forward(model, monkeypatch):
    """Prompts longer than a chunk run chunk by chunk, each padded, carrying the state across."""
    monkeypatch.setattr(byte_decoder, "PREFILL_CHUNK", 8)
    module, graphdef, params = model
    tokens = random_bytes(21, seed=3)
    logits, _ = ByteDecoder(graphdef, params).prefill(list(tokens), CONTEXT)
    np.testing.assert_allclose(logits, logits_of(module, graphdef, params, tokens)[20], atol=1e-4)


def test_transformer_prompt_padding_stays_inside_a_small_cache():
    graphdef, params = byte_transformer.init(CONFIGS["rope"], seed=2)
    tokens = random_bytes(22, seed=4)
    full = logits_of(byte_transformer, graphdef, params, tokens)
    decoder = ByteDecoder(graphdef, params)
    logits, cache = decoder.prefill(list(tokens[:20]), 22)  # width 32 would overflow: cut to the 22 free positions
    assert cache.capacity == 22
    np.testing.assert_allclose(logits, full[19], atol=1e-4)
    logits, cache = decoder.step(cache, int(tokens[20]), 20)
    np.testing.assert_allclose(logits, full[20], atol=1e-4)
    with pytest.raises(InvalidPromptError):
        decoder.step(cache, 0, 22)
    with pytest.raises(InvalidPromptError):
        decoder.prefill(list(tokens), 21)


def test_prompt_lengths_share_compiled_buckets():
    decoder = ByteDecoder(*rnn.init(CONFIGS["gru"]))
    decoder.prepare(5, 256)
    assert decoder.last_timings["compile_seconds"] > 0
    decoder.prepare(9, 256)  # same 16-byte bucket, same one-byte step
    assert decoder.last_timings["compile_seconds"] == 0.0
    assert [prompt_width(n) for n in (1, 2, 16, 17, 200)] == [1, 16, 16, 32, 256]
    assert prompt_width(20, room=22) == 22


def test_jit_of_pure_apply_takes_params_as_arguments(model):
    module, graphdef, params = model
    traces = []

    def counted(graphdef, params, tokens):
        traces.append(1)
        return module.apply(graphdef, params, tokens)

    tokens = jnp.asarray(random_bytes(LENGTH))[None]
    jitted = jax.jit(counted)
    scaled = jax.tree.map(lambda x: 0.5 * x, params)
    for p in (params, scaled):
        np.testing.assert_allclose(jitted(graphdef, p, tokens), APPLY[module](graphdef, p, tokens), atol=1e-5)
    assert len(traces) == 1
    assert not np.allclose(jitted(graphdef, params, tokens), jitted(graphdef, scaled, tokens))


def repeated_batch(text: str, batch: int, length: int) -> jax.Array:
    data = np.frombuffer((text * (batch + length)).encode(), np.uint8).astype(np.int32)
    return jnp.asarray(np.stack([data[i : i + length] for i in range(batch)]))


def train(module, graphdef, params, batch: jax.Array, steps: int = 30, lr: float = 2e-2):
    """`steps` Adam steps on one batch; (params, losses)."""
    optimizer = optax.adam(lr)
    loss = partial(module.loss_fn, graphdef)

    @jax.jit
    def update(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, value = update(params, opt_state)
        losses.append(float(value))
    return params, losses


@pytest.fixture(scope="module", params=["gru", "rope"])
def trained(request):
    """Each model family trained 30 Adam steps on "abc" repeated: (graphdef, params, losses)."""
    config = CONFIGS[request.param]
    module = module_of(config)
    graphdef, params = module.init(config, seed=0)
    params, losses = train(module, graphdef, params, repeated_batch("abc", 4, 24))
    return graphdef, params, losses


def test_training_reduces_loss(trained):
    _, _, losses = trained
    assert losses[0] == pytest.approx(np.log(256), rel=0.05)
    assert losses[-1] < 0.25 * losses[0]


def test_trained_model_continues_the_pattern(trained):
    graphdef, params, _ = trained
    result = generate_tokens(ByteDecoder(graphdef, params), encode_text("abcab"), max_new_tokens=9, sampling=GREEDY)
    assert result.text == "cabcabcab" and result.finish_reason == "length"


def test_stop_ids_end_generation(trained):
    graphdef, params, _ = trained
    decoder = ByteDecoder(graphdef, params, stop_ids=encode_text("c"))
    result = generate_tokens(decoder, encode_text("abca"), max_new_tokens=9, sampling=GREEDY)
    assert result.text == "b" and result.finish_reason == "eos"
    assert ByteDecoder(graphdef, params).stop_ids == frozenset()


@pytest.mark.parametrize(
    "sampling",
    [GREEDY, SamplingConfig(), SamplingConfig(temperature=1.2, top_k=0, top_p=0.9, min_p=0.0, repeat_penalty=1.3)],
    ids=["greedy", "default", "nucleus-penalty"],
)
def test_generation_returns_requested_bytes(model, sampling):
    _, graphdef, params = model
    decoder = ByteDecoder(graphdef, params)
    chunks: list[str] = []
    result = generate_tokens(
        decoder, encode_text("héllo"), max_new_tokens=12, sampling=sampling, seed=5, on_text=chunks.append
    )
    assert len(result.token_ids) == 12 and all(0 <= t < 256 for t in result.token_ids)
    assert result.finish_reason == "length" and isinstance(result.text, str)
    assert "".join(chunks) == result.text == bytes(result.token_ids).decode("utf-8", errors="replace")


def test_byte_helpers():
    assert encode_text("aé€") == [97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert bits_per_byte(np.log(2.0)) == pytest.approx(1.0)
    assert ByteDecoder(*rnn.init(CONFIGS["gru"])).token_bytes(0xE2) == b"\xe2"


def test_decoder_context_length():
    graphdef, params = byte_transformer.init(CONFIGS["rope"])
    assert ByteDecoder(graphdef, params).context_length == CONTEXT
    assert ByteDecoder(graphdef, params, context_length=32).context_length == 32
    with pytest.raises(ValueError):
        ByteDecoder(graphdef, params, context_length=CONTEXT + 1)
    assert ByteDecoder(*rnn.init(CONFIGS["gru"])).context_length == byte_decoder.RNN_CONTEXT

"""The Llama decoder on a tiny random model: cache consistency, causality, padding, fp32 twin, chunked prefill."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperjax.kernels.quant import dequantize, quantize
from hyperjax.models import llama_runtime
from hyperjax.models.llama import LayerParams, LlamaConfig, LlamaParams, dequantize_params, init_cache
from hyperjax.models.llama_runtime import LlamaDecoder

CONFIG = LlamaConfig(
    vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=512, rope_base=10000.0
)


def random_params(config: LlamaConfig, seed: int = 0, kind: str = "q4_1") -> LlamaParams:
    """Quantized random weights with the shapes of `config` (layers stacked)."""
    rng = np.random.default_rng(seed)
    hd = config.head_dim

    def q(rows: int, cols: int, k: str = kind):
        return quantize(jnp.asarray(rng.standard_normal((rows, cols)) * 0.2, jnp.float32), k)

    def stacked(rows: int, cols: int):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[q(rows, cols) for _ in range(config.n_layers)])

    def norms():
        return jnp.asarray(1.0 + 0.1 * rng.standard_normal((config.n_layers, config.dim)), jnp.float32)

    e = config.dim
    layers = LayerParams(
        attn_norm=norms(),
        wq=stacked(config.n_heads * hd, e),
        wk=stacked(config.n_kv_heads * hd, e),
        wv=stacked(config.n_kv_heads * hd, e),
        wo=stacked(e, config.n_heads * hd),
        ffn_norm=norms(),
        w_gate=stacked(config.ffn_dim, e),
        w_up=stacked(config.ffn_dim, e),
        w_down=stacked(e, config.ffn_dim),
    )
    embed = q(config.vocab_size, e, "q8_0")
    return LlamaParams(embed=embed, layers=layers, final_norm=jnp.ones((e,), jnp.float32), output=None)


@pytest.fixture(scope="module")
def decoder() -> LlamaDecoder:
    return LlamaDecoder(CONFIG, random_params(CONFIG), frozenset(), lambda i: bytes([i]))


def full_logits(decoder: LlamaDecoder, tokens: list[int]) -> np.ndarray:
    logits, _ = decoder.run(tokens, 0, init_cache(CONFIG, 1, 256), all_logits=True)
    return np.asarray(logits)


def test_incremental_decode_equals_teacher_forced(decoder):
    tokens = list(np.random.default_rng(1).integers(0, CONFIG.vocab_size, 12))
    reference = full_logits(decoder, tokens)
    logits, cache = decoder.prefill(tokens[:5], 256)
    np.testing.assert_allclose(np.asarray(logits), reference[4], rtol=1e-4, atol=1e-4)
    for position in range(5, len(tokens)):
        logits, cache = decoder.step(cache, tokens[position], position)
        np.testing.assert_allclose(np.asarray(logits), reference[position], rtol=1e-4, atol=1e-4)


def test_changing_a_later_token_leaves_earlier_logits_unchanged(decoder):
    tokens = list(np.random.default_rng(2).integers(0, CONFIG.vocab_size, 10))
    changed = list(tokens)
    changed[6] = (changed[6] + 1) % CONFIG.vocab_size
    a, b = full_logits(decoder, tokens), full_logits(decoder, changed)
    np.testing.assert_array_equal(a[:6], b[:6])
    assert not np.allclose(a[6:], b[6:])


def test_bucket_padding_does_not_change_logits(decoder):
    tokens = list(np.random.default_rng(3).integers(0, CONFIG.vocab_size, 17))
    # 17 tokens pad to a 32-token bucket; 16 tokens fill a 16 bucket exactly: the shared prefix must agree.
    np.testing.assert_allclose(full_logits(decoder, tokens)[:16], full_logits(decoder, tokens[:16]), atol=1e-4)


def test_chunked_prefill_equals_single_chunk(decoder, monkeypatch):
    tokens = list(np.random.default_rng(4).integers(0, CONFIG.vocab_size, 40))
    whole = full_logits(decoder, tokens)
    monkeypatch.setattr(llama_runtime, "PREFILL_CHUNK", 16)
    chunked = LlamaDecoder(CONFIG, decoder.params, frozenset(), decoder.token_bytes)
    np.testing.assert_allclose(full_logits(chunked, tokens), whole, rtol=1e-4, atol=1e-4)


def test_fp32_twin_matches_packed_model(decoder):
    tokens = list(np.random.default_rng(5).integers(0, CONFIG.vocab_size, 9))
    twin = LlamaDecoder(CONFIG, dequantize_params(decoder.params), frozenset(), decoder.token_bytes)
    np.testing.assert_allclose(full_logits(twin, tokens), full_logits(decoder, tokens), rtol=1e-3, atol=1e-3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(twin.params.layers))


def test_packed_weights_stay_packed(decoder):
    layers = decoder.params.layers
    assert layers.wq.packed.dtype == jnp.uint8
    assert layers.wq.packed.shape == (CONFIG.n_layers, CONFIG.n_heads * CONFIG.head_dim, CONFIG.dim // 2)
    assert dequantize(jax.tree.map(lambda x: x[0], layers.wq)).shape == (CONFIG.dim, CONFIG.dim)


def test_new_prompt_lengths_reuse_buckets(decoder):
    fresh = LlamaDecoder(CONFIG, decoder.params, frozenset(), decoder.token_bytes)
    for n in (3, 7, 11, 16):
        fresh.prepare(n, 256)
    assert set(fresh._compiled) == {(1, 256, False), (16, 256, False)}

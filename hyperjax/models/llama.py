"""Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over packed weights.

Parameters are plain pytrees; every weight matrix is a `QuantizedTensor` (kept packed, dequantized block by block
inside the matmul), a `NativeWeight` (the same blocks repacked for the native kernels) or a float array, so the
same forward runs the int4 model on either kernel path and its fp32 twin. Layers are
stacked along a leading axis and run under `lax.scan`, which keeps compile time independent of depth.

Shapes: B batch, T tokens in this call, S cache length, H query heads, K key/value heads, D head dim, E model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from hyperjax.errors import GGUFError
from hyperjax.kernels.native import NativeWeight, decode_attention, native_qmatmul, unpack_rows
from hyperjax.kernels.quant import QuantizedTensor, dequantize, qmatmul, take_rows
from hyperjax.kernels.sparse import Q4CSR, to_dense
from hyperjax.kernels.sparse import matmul as sparse_matmul

Weight = QuantizedTensor | NativeWeight | Q4CSR | jax.Array


@dataclass(frozen=True)
class LlamaConfig:
    """Static hyper-parameters, read from GGUF metadata (`llama.*` keys)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    context_length: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], vocab_size: int) -> LlamaConfig:
        """Build the config from a `llama` GGUF's metadata; `vocab_size` comes from the embedding's shape."""
        arch = metadata.get("general.architecture", "llama")

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise GGUFError(f"GGUF metadata lacks '{arch}.{name}', needed for the {arch} decoder")
            return value

        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        config = cls(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=int(key("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(key("attention.head_count_kv", n_heads)),
            ffn_dim=int(key("feed_forward_length")),
            context_length=int(key("context_length", 2048)),
            rope_base=float(key("rope.freq_base", 10000.0)),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        )
        rope_dims = int(key("rope.dimension_count", config.head_dim))
        if dim % n_heads or n_heads % config.n_kv_heads or rope_dims != config.head_dim:
            raise GGUFError(
                f"inconsistent attention shape: dim {dim}, heads {n_heads}, kv heads {config.n_kv_heads}, "
                f"rope dims {rope_dims} (hyperjax rotates the whole head of {config.head_dim} dims)"
            )
        return config


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerParams:
    """One decoder block; with stacked layers every leaf has a leading (n_layers,) axis."""

    attn_norm: jax.Array  # (E,) float32
    wq: Weight  # (H*D, E)
    wk: Weight  # (K*D, E)
    wv: Weight  # (K*D, E)
    wo: Weight  # (E, H*D)
    ffn_norm: jax.Array  # (E,) float32
    w_gate: Weight  # (F, E)
    w_up: Weight  # (F, E)
    w_down: Weight  # (E, F)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LlamaParams:
    embed: Weight  # (V, E) token embeddings
    layers: LayerParams | None  # stacked: leaves have a leading (n_layers,) axis; None when streamed from disk
    final_norm: jax.Array  # (E,)
    output: Weight | None  # (V, E); None when tied to `embed`


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer: (n_layers, B, S, K, D). `length` is static: the cache bucket size."""

    keys: jax.Array
    values: jax.Array
    length: int = field(metadata=dict(static=True))


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of `length` positions."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), length)


def linear(x: jax.Array, w: Weight, layer: jax.Array | None = None) -> jax.Array:
    """x (..., in) @ w.T for w (out, in) — native-packed, packed, sparse (Q4CSR) or float — as float32.

    With `layer`, w is a stack (n_layers, out, in) and layer an int32 scalar choosing one matrix; the native kernel
    reads that layer in place (slicing a custom call's operand would copy it first).
    """
    if isinstance(w, NativeWeight):
        return native_qmatmul(x, w, layer)
    if layer is not None:
        w = jax.tree.map(lambda leaf: leaf[layer], w)
    if isinstance(w, QuantizedTensor):
        return qmatmul(x, w)
    if isinstance(w, Q4CSR):
        return sparse_matmul(x, w)
    return jnp.einsum("...i,oi->...o", x, w.astype(jnp.float32))


def embed_tokens(embed: Weight, tokens: jax.Array) -> jax.Array:
    """tokens int32 (B, T) -> float32 (B, T, E), dequantizing only the rows used."""
    if isinstance(embed, NativeWeight):
        flat = dequantize(unpack_rows(embed, tokens.reshape(-1)))
        return flat.reshape(*tokens.shape, -1)
    if isinstance(embed, QuantizedTensor):
        flat = take_rows(embed, tokens.reshape(-1))
        return flat.reshape(*tokens.shape, -1)
    return embed[tokens].astype(jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate adjacent pairs (2i, 2i+1) by position·base^(-2i/D); x (B, T, N, D), positions (B, T).

    GGUF's llama converter permutes the Q/K rows so that this pairing reproduces the original model.
    """
    d = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    pairs = x.reshape(*x.shape[:-1], d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape)


def attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    past_keys: jax.Array,
    past_values: jax.Array,
    start: jax.Array,
) -> jax.Array:
    """Causal grouped-query attention of a call's queries over the cache's past and the call's own keys.

    q (B, T, H, D); keys/values (B, T, K, D) of this call's tokens; past_keys/past_values (B, S, K, D) the cache as
    it was before this call, whose slots < start are valid. Query t sees every valid past slot and this call's
    keys 0..t. The cache is only read here (the caller writes the new keys once, after every block), so XLA reads it
    in place. Returns float32 (B, T, H, D).
    """
    b, t, h, d = q.shape
    k_heads, s = keys.shape[2], past_keys.shape[1]
    q = q.reshape(b, t, k_heads, h // k_heads, d) / jnp.sqrt(jnp.float32(d))
    past_keys, past_values = past_keys.astype(jnp.float32), past_values.astype(jnp.float32)
    past_visible = jnp.arange(s) < start
    if t == 1:
        # One query (decoding): products and sums rather than dots, which XLA fuses with the read of the layer's
        # cache slice; a dot would first copy (and transpose) it.
        q1 = q[:, 0]  # (B, K, G, D)
        past = jnp.sum(q1[:, None] * past_keys[:, :, :, None, :], axis=-1)  # (B, S, K, G)
        own = jnp.sum(q1 * keys[:, 0, :, None, :], axis=-1)[:, None]  # (B, 1, K, G)
        probs = jax.nn.softmax(jnp.concatenate([jnp.where(past_visible[:, None, None], past, -jnp.inf), own], 1), 1)
        out = jnp.sum(probs[:, :s, ..., None] * past_values[:, :, :, None, :], axis=1)
        out = out + probs[:, s, ..., None] * values[:, 0, :, None, :]  # (B, K, G, D)
        return out.reshape(b, 1, h, d)
    past = jnp.einsum("btkgd,bskd->bkgts", q, past_keys)
    own = jnp.einsum("btkgd,bukd->bkgtu", q, keys)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.concatenate([jnp.where(past_visible, past, -jnp.inf), jnp.where(causal, own, -jnp.inf)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :s], past_values)
    out = out + jnp.einsum("bkgtu,bukd->btkgd", probs[..., s:], values)
    return out.reshape(b, t, h, d)


def _block(
    config: LlamaConfig,
    x: jax.Array,
    layer: LayerParams,
    past_keys: jax.Array,
    past_values: jax.Array,
    start: jax.Array,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder block on x (B, T, E) at positions start..start+T; returns x and this call's keys/values
    (B, T, K, D), which the caller writes to the cache.

    `layer` and past_keys/past_values (B, S, K, D) are one block's parameters and cache, or (with `index`) the
    stacks of every block (cache (L, B, S, K, D)) and the one to run.
    """
    b, t, _ = x.shape
    hd = config.head_dim
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))

    def mm(h: jax.Array, w: Weight) -> jax.Array:
        return linear(h, w, index)

    def this_layer(a: jax.Array) -> jax.Array:
        return a if index is None else jax.lax.dynamic_index_in_dim(a, index, keepdims=False)

    h = rms_norm(x, this_layer(layer.attn_norm), config.norm_eps)
    q = rope(mm(h, layer.wq).reshape(b, t, config.n_heads, hd), positions, config.rope_base)
    k = rope(mm(h, layer.wk).reshape(b, t, config.n_kv_heads, hd), positions, config.rope_base)
    v = mm(h, layer.wv).reshape(b, t, config.n_kv_heads, hd)
    if t == 1 and isinstance(layer.wq, NativeWeight):  # the native path decodes with the native attention too
        stacks = (past_keys, past_values) if index is not None else (past_keys[None], past_values[None])
        attn = decode_attention(q, k, v, *stacks, 0 if index is None else index, start)
    else:
        attn = attention(q, k, v, this_layer(past_keys), this_layer(past_values), start)
    x = x + mm(attn.reshape(b, t, config.n_heads * hd), layer.wo)
    h = rms_norm(x, this_layer(layer.ffn_norm), config.norm_eps)
    x = x + mm(jax.nn.silu(mm(h, layer.w_gate)) * mm(h, layer.w_up), layer.w_down)
    return x, k, v


def block_forward(
    config: LlamaConfig, x: jax.Array, layer: LayerParams, keys: jax.Array, values: jax.Array, start: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block (its own parameters) on x (B, T, E) at `start`, with its cache (B, S, K, D) updated."""
    x, k, v = _block(config, x, layer, keys, values, start)
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, start, 0, 0))
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, start, 0, 0))
    return x, keys, values


def output_logits(
    params: LlamaParams, config: LlamaConfig, x: jax.Array, n_valid: jax.Array, all_logits: bool
) -> jax.Array:
    """Final norm and output head: (B, T, V) for every position, or (B, V) for the last real one."""
    if not all_logits:
        x = jax.lax.dynamic_index_in_dim(x, n_valid - 1, axis=1, keepdims=False)
    x = rms_norm(x, params.final_norm, config.norm_eps)
    return linear(x, params.embed if params.output is None else params.output)


def forward_new_kv(
    params: LlamaParams,
    config: LlamaConfig,
    tokens: jax.Array,
    start: jax.Array,
    n_valid: jax.Array,
    cache: KVCache,
    *,
    all_logits: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`forward` without the cache write: the logits and this call's keys and values (L, B, T, K, D), in the cache's
    dtype, which belong at positions start..start+T of the cache (only the first n_valid are real)."""
    x = embed_tokens(params.embed, tokens)

    def step(x: jax.Array, index: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        x, k, v = _block(config, x, params.layers, cache.keys, cache.values, start, index)
        return x, (k.astype(cache.keys.dtype), v.astype(cache.values.dtype))

    x, (keys, values) = jax.lax.scan(step, x, jnp.arange(config.n_layers, dtype=jnp.int32))
    return output_logits(params, config, x, n_valid, all_logits), keys, values


def forward(
    params: LlamaParams,
    config: LlamaConfig,
    tokens: jax.Array,
    start: jax.Array,
    n_valid: jax.Array,
    cache: KVCache,
    *,
    all_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Run T tokens starting at absolute position `start` and extend the cache.

    tokens int32 (B, T), of which the first `n_valid` are real (the rest is bucket padding); start, n_valid int32
    scalars. Returns float32 logits (B, T, V) if `all_logits`, else (B, V) for the last real token, and the cache.
    """
    # The blocks only read the cache; this call's keys/values (L, B, T, K, D) go in with one in-place write.
    logits, keys, values = forward_new_kv(params, config, tokens, start, n_valid, cache, all_logits=all_logits)
    keys = jax.lax.dynamic_update_slice(cache.keys, keys, (0, 0, start, 0, 0))
    values = jax.lax.dynamic_update_slice(cache.values, values, (0, 0, start, 0, 0))
    return logits, KVCache(keys, values, cache.length)


def dequantize_params(params: Any) -> Any:
    """The fp32 twin of a packed or sparse model, or of any pytree of its weights (for comparisons, benchmarks and
    pruning only: 4 bytes per weight)."""

    def dequantize_native(w: NativeWeight) -> jax.Array:
        return dequantize(unpack_rows(w, jnp.arange(w.rows)))

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, NativeWeight):
            return jax.vmap(dequantize_native)(leaf) if leaf.data.ndim == 3 else dequantize_native(leaf)
        if isinstance(leaf, QuantizedTensor):
            if leaf.packed.ndim == 3:
                return jax.vmap(dequantize)(leaf)
            return dequantize(leaf)
        if isinstance(leaf, Q4CSR):
            return jax.vmap(to_dense)(leaf) if leaf.indices.ndim == 2 else to_dense(leaf)
        return leaf

    packed = QuantizedTensor | NativeWeight | Q4CSR
    return jax.tree.map(convert, params, is_leaf=lambda leaf: isinstance(leaf, packed))

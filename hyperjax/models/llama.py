"""Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over packed weights.

Parameters are plain pytrees; every weight matrix is either a `QuantizedTensor` (kept packed, dequantized block by
block inside the matmul) or a float array, so the same forward runs the int4 model and its fp32 twin. Layers are
stacked along a leading axis and run under `lax.scan`, which keeps compile time independent of depth.

Shapes: B batch, T tokens in this call, S cache length, H query heads, K key/value heads, D head dim, E model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from hyperjax.errors import GGUFError
from hyperjax.kernels.native import NativeWeight, native_qmatmul
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
    q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array, valid_end: jax.Array
) -> jax.Array:
    """Causal grouped-query attention over the cache.

    q (B, T, H, D); keys/values (B, S, K, D); positions (B, T) absolute query positions; valid_end (B,) number of
    cache slots written. Query at position p sees cache slots s ≤ p and s < valid_end. Returns (B, T, H, D).
    """
    b, t, h, d = q.shape
    k_heads = keys.shape[2]
    q = q.reshape(b, t, k_heads, h // k_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    slots = jnp.arange(keys.shape[1])
    visible = (slots[None, None, :] <= positions[:, :, None]) & (slots[None, None, :] < valid_end[:, None, None])
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(jnp.float32))
    return out.reshape(b, t, h, d)


def _block(
    config: LlamaConfig,
    x: jax.Array,
    layer: LayerParams,
    keys: jax.Array,
    values: jax.Array,
    start: jax.Array,
    positions: jax.Array,
    valid_end: jax.Array,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder block on x (B, T, E); writes this call's K/V at cache slots start..start+T.

    `layer` is one block's parameters, or (with `index`) the stack of all blocks and the one to run.
    """
    b, t, _ = x.shape
    hd = config.head_dim

    def mm(h: jax.Array, w: Weight) -> jax.Array:
        return linear(h, w, index)

    def norm_weight(w: jax.Array) -> jax.Array:
        return w if index is None else w[index]

    h = rms_norm(x, norm_weight(layer.attn_norm), config.norm_eps)
    q = rope(mm(h, layer.wq).reshape(b, t, config.n_heads, hd), positions, config.rope_base)
    k = rope(mm(h, layer.wk).reshape(b, t, config.n_kv_heads, hd), positions, config.rope_base)
    v = mm(h, layer.wv).reshape(b, t, config.n_kv_heads, hd)
    keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, start, 0, 0))
    values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, start, 0, 0))
    attn = attention(q, keys, values, positions, valid_end)
    x = x + mm(attn.reshape(b, t, config.n_heads * hd), layer.wo)
    h = rms_norm(x, norm_weight(layer.ffn_norm), config.norm_eps)
    x = x + mm(jax.nn.silu(mm(h, layer.w_gate)) * mm(h, layer.w_up), layer.w_down)
    return x, keys, values


def positions_for(tokens: jax.Array, start: jax.Array, n_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Absolute positions (B, T) of a call's tokens and the cache end (B,) after it."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    return positions, jnp.full((b,), start + n_valid, dtype=jnp.int32)


def block_forward(
    config: LlamaConfig,
    x: jax.Array,
    layer: LayerParams,
    keys: jax.Array,
    values: jax.Array,
    start: jax.Array,
    n_valid: jax.Array,
    index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder block for a call of T tokens at `start` (n_valid real): x (B, T, E), one layer's cache.

    `layer` is one block, or with `index` the stacked blocks and which to run."""
    positions, valid_end = positions_for(x[..., 0], start, n_valid)
    return _block(config, x, layer, keys, values, start, positions, valid_end, index)


def output_logits(
    params: LlamaParams, config: LlamaConfig, x: jax.Array, n_valid: jax.Array, all_logits: bool
) -> jax.Array:
    """Final norm and output head: (B, T, V) for every position, or (B, V) for the last real one."""
    if not all_logits:
        x = jax.lax.dynamic_index_in_dim(x, n_valid - 1, axis=1, keepdims=False)
    x = rms_norm(x, params.final_norm, config.norm_eps)
    return linear(x, params.embed if params.output is None else params.output)


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
    x = embed_tokens(params.embed, tokens)

    def step(x: jax.Array, index_and_cache: tuple[jax.Array, jax.Array, jax.Array]):
        index, keys, values = index_and_cache
        x, keys, values = block_forward(config, x, params.layers, keys, values, start, n_valid, index)
        return x, (keys, values)

    indices = jnp.arange(config.n_layers, dtype=jnp.int32)
    x, (keys, values) = jax.lax.scan(step, x, (indices, cache.keys, cache.values))
    return output_logits(params, config, x, n_valid, all_logits), KVCache(keys, values, cache.length)


def dequantize_params(params: LlamaParams) -> LlamaParams:
    """The fp32 twin of a packed or sparse model (for comparisons and benchmarks only: 4 bytes per weight)."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, QuantizedTensor):
            if leaf.packed.ndim == 3:
                return jax.vmap(dequantize)(leaf)
            return dequantize(leaf)
        if isinstance(leaf, Q4CSR):
            return jax.vmap(to_dense)(leaf) if leaf.indices.ndim == 2 else to_dense(leaf)
        return leaf

    return jax.tree.map(convert, params, is_leaf=lambda leaf: isinstance(leaf, QuantizedTensor | Q4CSR))

"""Euclidean byte transformer: the decoder-only baseline of equal size for the hyperbolic byte model.

Byte embedding, learned or rotary (RoPE) positions, pre-norm blocks (LayerNorm → multi-head causal self-attention,
LayerNorm → GELU MLP), final LayerNorm and a linear head to 256 logits. Pure entry points over plain pytrees: `init`
gives `(graphdef, params)` (params a nested dict of float32 arrays, the graphdef a leafless pytree); `apply` and
`loss_fn` run the teacher-forced causal forward, `forward` the incremental one against an explicit `KVCache`.

Shapes: B batch, T tokens in this call, S cache capacity, L layers, H heads, D head dim, E model dim, V = 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class ByteTransformerConfig:
    """Static sizes of a byte transformer; `context_length` bounds positions (and the learned position table)."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    context_length: int = 1024
    positions: str = "rope"  # "rope" | "learned"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        sizes = {k: getattr(self, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "mlp_ratio")}
        if min(sizes.values()) < 1 or self.context_length < 1:
            raise ValueError(f"sizes and context_length must be at least 1, got {sizes}, {self.context_length}")
        if self.dim % self.n_heads or (self.positions == "rope" and self.head_dim % 2):
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads (of even size with RoPE)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer at positions 0…S−1; positions not yet written hold anything (masked)."""

    k: jax.Array  # (L, B, S, H, D) float32
    v: jax.Array  # (L, B, S, H, D) float32

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


def init_cache(config: ByteTransformerConfig, batch: int, capacity: int) -> KVCache:
    """Zeroed cache with room for `capacity` positions."""
    shape = (config.n_layers, batch, capacity, config.n_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def _rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate pairs (i, i + D/2) of x (B, T, H, D) by angle position · base^(−2i/D); positions (T,) int."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs  # (T, D/2)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _linear(rngs: nnx.Rngs, d_in: int, d_out: int) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head causal self-attention; softmax over scaled dot products with keys at positions ≤ the query's."""

    def __init__(self, config: ByteTransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.qkv = _linear(rngs, config.dim, 3 * config.dim)
        self.out = _linear(rngs, config.dim, config.dim)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x (B, T, E), positions (T,) int consecutive → (y (B, T, E), keys/values (B, S, H, D)).

        Without a cache (kv None) the keys are this call's own (S = T); with one, this call's keys and values are
        written at positions[0]… (which must leave room for T) and attention reads the whole cache."""
        c = self.config
        B, T, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, T, 3 * c.n_heads, c.head_dim), 3, axis=2)
        if c.positions == "rope":
            q, k = _rope(q, positions, c.rope_base), _rope(k, positions, c.rope_base)
        if kv is None:
            key_positions = positions
        else:
            start = (0, positions[0], 0, 0)
            k, v = lax.dynamic_update_slice(kv[0], k, start), lax.dynamic_update_slice(kv[1], v, start)
            key_positions = jnp.arange(k.shape[1])
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(c.head_dim)
        mask = key_positions[None, :] <= positions[:, None]  # (T, S)
        weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, c.dim)
        return self.out(y), (k, v)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) with a GELU MLP of width mlp_ratio·E."""

    def __init__(self, config: ByteTransformerConfig, *, rngs: nnx.Rngs):
        hidden = config.mlp_ratio * config.dim
        self.attn_norm = nnx.LayerNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
        self.up = _linear(rngs, config.dim, hidden)
        self.down = _linear(rngs, hidden, config.dim)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        y, kv = self.attn(self.attn_norm(x), positions, kv)
        x = x + y
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x)))), kv


class ByteTransformer(nnx.Module):
    """Embedding (+ learned positions) → blocks → LayerNorm → linear head to V logits."""

    def __init__(self, config: ByteTransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        if config.positions == "learned":
            init = nnx.initializers.normal(0.02)
            self.position_table = nnx.Param(init(rngs.params(), (config.context_length, config.dim), jnp.float32))
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = nnx.LayerNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
        self.head = _linear(rngs, config.dim, config.vocab_size)

    def __call__(self, tokens: jax.Array, start: jax.Array | int, cache: KVCache | None) -> tuple[jax.Array, Any]:
        """tokens (B, T) int at positions start…start+T−1 → (logits (B, T, V) float32, updated cache or None)."""
        positions = start + jnp.arange(tokens.shape[1])
        x = self.embed(tokens)
        if self.config.positions == "learned":
            x = x + self.position_table[...][positions]
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, positions, None if cache is None else (cache.k[i], cache.v[i]))
            if cache is not None:
                cache = KVCache(cache.k.at[i].set(k), cache.v.at[i].set(v))
        return self.head(self.norm(x)), cache


def _abstract(config: ByteTransformerConfig) -> ByteTransformer:
    return nnx.eval_shape(lambda: ByteTransformer(config, rngs=nnx.Rngs(0)))


@partial(jax.jit, static_argnums=0)
def _init_params(config: ByteTransformerConfig, key: jax.Array) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(ByteTransformer(config, rngs=nnx.Rngs(key))))


def init(config: ByteTransformerConfig, seed: int = 0) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, params): params a nested dict of float32 arrays, initialised in one compiled program."""
    return nnx.graphdef(_abstract(config)), _init_params(config, jax.random.key(seed))


def param_count(config: ByteTransformerConfig) -> int:
    """Number of trainable scalars, computed from shapes alone (nothing allocated)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(_abstract(config))))


def forward(
    graphdef: nnx.GraphDef, params: dict[str, Any], tokens: jax.Array, start: jax.Array | int, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feed tokens (B, T) int at positions start…start+T−1 (start + T ≤ capacity): (logits (B, T, V), new cache).

    Trailing padding is harmless: its keys land beyond the real positions, which later calls overwrite before any
    query can see them."""
    return nnx.merge(graphdef, params)(tokens, start, cache)


def apply(graphdef: nnx.GraphDef, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """Teacher-forced causal logits (B, T, V) float32 for tokens (B, T) int; row t predicts byte t+1."""
    return nnx.merge(graphdef, params)(tokens, 0, None)[0]


def loss_fn(graphdef: nnx.GraphDef, params: dict[str, Any], batch: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats over a (B, T) int batch (predicts bytes 1…T−1 from those before)."""
    logits = apply(graphdef, params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

"""HAKMEM: a byte-level language model with a hyperbolic global transformer over entropy patches.

Forward over bytes (B, T) → next-byte log-probabilities (B, T, 256), row t predicting byte t+1:

1. Byte embedding plus hashed n-gram embeddings (one table per n in `ngram_sizes`). The n-gram ending at t is hashed
   with x_s = byte_s + 1 for s ≥ 0 and x_s = 0 for s < 0 (padding distinct from every byte), all in uint32
   arithmetic (mod 2^32):  h = Σ_{k=0}^{n−1} x_{t−k} · M^k  with M = 0x01000193, then mixed
   h ← h ⊕ (h ≫ 15);  h ← h · 0x2C1B3C6D;  h ← h ⊕ (h ≫ 12),  and the table row is h mod `ngram_table`.
2. Local encoder: causal RoPE transformer blocks over bytes (`byte_transformer.Block`).
3. Patches from `kernels.patching`: window entropy of the bytes, start where it exceeds `patch_threshold`
   ("global" mode, or "relative"), min/max lengths, never inside a UTF-8 character. Both are causal (the start
   decision at s reads bytes ≤ s), and max_patches = T so nothing is ever truncated. Each patch is pooled by
   multi-head cross-attention from learned queries to the encoder outputs of its own bytes (mask by patch id).
4. Pooled vectors enter the Poincaré ball of learnable curvature c = softplus(·): x_j = exp₀(W p_j) ⊕ exp₀(e_j),
   e_j a learned embedding of the patch index j.
5. Hyperbolic blocks, causal over patches. Per head h: q, k, v = W_h ⊗ x (Möbius matvec into a d_h-dim ball);
   logits −β_h·d(q_i, k_j) − γ_h for j ≤ i (β_h = softplus, γ_h learned), plus one "null" key of logit 0 whose
   value is the origin, so γ_h is not a constant shift the softmax would ignore: it sets how much weight the head
   gives to its real keys rather than to the origin. The head output is the weighted gyromidpoint of the value
   points. Why a midpoint rather than an average in the tangent space at 0: the gyromidpoint is the ball's own
   weighted mean; it commutes with Möbius gyro-translations and rotations (an isometry of the inputs moves the
   output the same way), whereas log₀ → average → exp₀ is equivariant only under rotations about the origin and
   distorts points far from it, which is where hierarchy lives. It is one batched matmul and lands inside the
   ball by construction. Heads are joined in the tangent space (log₀ per head, concatenate, exp₀) and mixed by
   a Möbius matvec; the residual is Möbius addition, x ⊕ attn(x). A tangent-space feed-forward follows:
   x ⊕ exp₀(MLP(LayerNorm(log₀ x))). Every map projects its result (float32-safe, `kernels.poincare`).
6. Global patch states g_j = log₀(x_j) (B, P, D).
7. Local decoder: per layer, cross-attention from byte t to a learned "begin" state and to g_j for patches j
   strictly before t's own patch (patch j's state pools bytes that may lie after t), then a causal RoPE block.
8. Head: hierarchical, log P(b) = log P(b ≫ 4) + log P(b & 15 | b ≫ 4) (16 high-nibble logits, then 16×16
   low-nibble logits), or a flat 256-way log-softmax.

Pure entry points over plain pytrees, like the baselines: `init` → (graphdef, params), `apply`, `loss_fn`,
`param_count`, and `forward`, the incremental pass over an explicit `HakmemState` that `HakmemDecoder` drives for
`generate.generate_tokens`.

Shapes: B batch, T bytes, S state capacity, P patches, E local dim, D global dim, H heads, V = 256.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from hyperjax.errors import InvalidPromptError
from hyperjax.kernels import patching, poincare
from hyperjax.models.byte_decoder import PREFILL_CHUNK, bits_per_byte, prompt_width
from hyperjax.models.byte_transformer import Block, ByteTransformerConfig, KVCache

__all__ = [
    "HakmemConfig",
    "HakmemDecoder",
    "HakmemState",
    "apply",
    "bits_per_byte",
    "forward",
    "head_log_probs",
    "init",
    "init_state",
    "loss_fn",
    "ngram_ids",
    "param_count",
    "patch_ids",
]

HEADS = ("hierarchical", "flat")
HASH_MULTIPLIER = 0x01000193
_MIX_MULTIPLIER = 0x2C1B3C6D
_BEGIN = 0  # index of the always-visible "begin" state among the decoder's cross-attention keys


@dataclass(frozen=True)
class HakmemConfig:
    """Static sizes and patching options; `context_length` bounds positions (and the patch-index table)."""

    vocab_size: int = 256
    dim: int = 128  # local (byte) width E
    global_dim: int = 128  # hyperbolic width D
    n_heads: int = 4  # local heads and pooling heads
    n_global_heads: int = 4
    n_encoder_layers: int = 1
    n_global_layers: int = 2
    n_decoder_layers: int = 2
    mlp_ratio: int = 4
    ngram_sizes: tuple[int, ...] = (3, 4, 5)
    ngram_table: int = 4096
    context_length: int = 1024
    patch_window: int = 8
    patch_threshold: float = 2.75  # bits; with the defaults: mean patch about 4.7 bytes on Tiny Shakespeare
    patch_mode: str = "global"
    patch_min_len: int = 2
    patch_max_len: int = 8
    head: str = "hierarchical"  # "hierarchical" | "flat"
    init_curvature: float = 1.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.vocab_size != 256:
            raise ValueError(f"HAKMEM models bytes: vocab_size must be 256, got {self.vocab_size}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.patch_mode not in patching.MODES:
            raise ValueError(f"patch_mode must be one of {patching.MODES}, got {self.patch_mode!r}")
        sizes = ("dim", "global_dim", "n_heads", "n_global_heads", "n_encoder_layers", "n_global_layers")
        sizes = {k: getattr(self, k) for k in (*sizes, "n_decoder_layers", "mlp_ratio", "ngram_table")}
        if min(sizes.values()) < 1 or self.context_length < 2 or self.init_curvature <= 0:
            raise ValueError(f"sizes must be ≥ 1, context_length ≥ 2 and init_curvature > 0, got {sizes}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2 or self.global_dim % self.n_global_heads:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} even heads, global_dim into heads")
        if any(n < 1 for n in self.ngram_sizes):
            raise ValueError(f"ngram_sizes must be positive, got {self.ngram_sizes}")
        if not 1 <= self.patch_min_len <= self.patch_max_len:
            raise ValueError(f"need 1 ≤ patch_min_len ≤ patch_max_len, got {self.patch_min_len}, {self.patch_max_len}")

    @property
    def local(self) -> ByteTransformerConfig:
        """The configuration of the local (byte) blocks."""
        return ByteTransformerConfig(
            dim=self.dim,
            n_layers=1,
            n_heads=self.n_heads,
            mlp_ratio=self.mlp_ratio,
            context_length=self.context_length,
            rope_base=self.rope_base,
        )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class HakmemState:
    """Everything the incremental `forward` carries for positions 0…S−1 (written positions only are meaningful).

    tokens: int32 (B, S) bytes seen. h: float32 (B, S, E) encoder outputs (pooled when a patch completes).
    g: float32 (B, S, D) global patch states, valid for patches < `ready` (B,) int32. global_k, global_v: float32
    (L_global, B, H_global, S, d) key and value points of the hyperbolic blocks, valid for patches < ready (slot
    `ready` may hold a partial patch's, rewritten when it completes). encoder, decoder: the local blocks' KV caches.
    """

    tokens: jax.Array
    h: jax.Array
    g: jax.Array
    ready: jax.Array
    global_k: jax.Array
    global_v: jax.Array
    encoder: KVCache
    decoder: KVCache

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]


def init_state(config: HakmemConfig, batch: int, capacity: int) -> HakmemState:
    """Zeroed state with room for `capacity` ≤ context_length positions."""
    if not 1 <= capacity <= config.context_length:
        raise ValueError(f"capacity must be in 1…{config.context_length}, got {capacity}")
    local = config.local
    H = config.n_global_heads
    global_shape = (config.n_global_layers, batch, H, capacity, config.global_dim // H)

    def cache(layers: int) -> KVCache:
        shape = (layers, batch, capacity, local.n_heads, local.head_dim)
        return KVCache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

    return HakmemState(
        tokens=jnp.zeros((batch, capacity), jnp.int32),
        h=jnp.zeros((batch, capacity, config.dim), jnp.float32),
        g=jnp.zeros((batch, capacity, config.global_dim), jnp.float32),
        ready=jnp.zeros((batch,), jnp.int32),
        global_k=jnp.zeros(global_shape, jnp.float32),
        global_v=jnp.zeros(global_shape, jnp.float32),
        encoder=cache(config.n_encoder_layers),
        decoder=cache(config.n_decoder_layers),
    )


def _shift(x: jax.Array, k: int) -> jax.Array:
    """x (B, T) shifted k places right along T, zeros entering."""
    return jnp.pad(x, ((0, 0), (k, 0)))[:, : x.shape[1]]


def ngram_ids(tokens: jax.Array, sizes: Sequence[int], table: int) -> jax.Array:
    """Hashed n-gram rows int32 (B, T, len(sizes)) of bytes (B, T): the n bytes ending at t (module docstring)."""
    x = tokens.astype(jnp.uint32) + jnp.uint32(1)
    ids = []
    for n in sizes:
        h = jnp.zeros_like(x)
        for k in range(n - 1, -1, -1):
            h = h * jnp.uint32(HASH_MULTIPLIER) + _shift(x, k)
        h = h ^ (h >> 15)
        h = h * jnp.uint32(_MIX_MULTIPLIER)
        h = h ^ (h >> 12)
        ids.append((h % jnp.uint32(table)).astype(jnp.int32))
    return jnp.stack(ids, axis=-1) if ids else jnp.zeros((*tokens.shape, 0), jnp.int32)


def patch_ids(config: HakmemConfig, tokens: jax.Array) -> jax.Array:
    """Patch index int32 (B, T) of every byte of tokens (B, T); causal: the id at t depends on bytes ≤ t."""
    entropy = patching.window_entropy(tokens, config.patch_window)
    starts = patching.patch_boundaries(
        entropy,
        tokens,
        threshold=config.patch_threshold,
        mode=config.patch_mode,
        min_len=config.patch_min_len,
        max_len=config.patch_max_len,
    )
    return patching.make_patches(starts, max_patches=tokens.shape[1]).patch_ids


def head_log_probs(out: jax.Array, head: str) -> jax.Array:
    """Byte log-probs (..., 256) from head outputs: flat (..., 256) logits, or hierarchical (..., 16 + 256).

    Hierarchical: out[..., :16] are high-nibble logits, out[..., 16:] 16 rows of 16 low-nibble logits (row = high
    nibble); log P(b) = log_softmax(high)[b ≫ 4] + log_softmax(low[b ≫ 4])[b & 15].
    """
    if head == "flat":
        return jax.nn.log_softmax(out, axis=-1)
    high = jax.nn.log_softmax(out[..., :16], axis=-1)
    low = jax.nn.log_softmax(out[..., 16:].reshape(*out.shape[:-1], 16, 16), axis=-1)
    return (high[..., :, None] + low).reshape(*out.shape[:-1], 256)


def _linear(rngs: nnx.Rngs, d_in: int, d_out: int, std: float = 0.02) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; all-masked rows give zeros (finite gradients everywhere)."""
    top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.exp(jnp.where(mask, logits - top, -jnp.inf))
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)


class PatchPooling(nnx.Module):
    """Multi-head cross-attention from one learned query per head to the bytes of each patch → (B, P, D)."""

    def __init__(self, config: HakmemConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = config.n_heads, config.dim // config.n_heads
        self.norm = nnx.LayerNorm(config.dim, rngs=rngs)
        self.query = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (self.n_heads, self.head_dim)))
        self.kv = _linear(rngs, config.dim, 2 * config.dim)
        self.out = _linear(rngs, config.dim, config.global_dim)

    def __call__(self, h: jax.Array, member: jax.Array) -> jax.Array:
        """h (B, T, E), member bool (B, P, T) (byte t in patch p) → Euclidean patch vectors (B, P, D)."""
        B, T, _ = h.shape
        k, v = jnp.split(self.kv(self.norm(h)).reshape(B, T, 2 * self.n_heads, self.head_dim), 2, axis=2)
        scores = jnp.einsum("hd,bthd->bht", self.query[...], k) / math.sqrt(self.head_dim)
        weights = _masked_softmax(scores[:, :, None, :], member[:, None])  # (B, H, P, T)
        pooled = jnp.einsum("bhpt,bthd->bphd", weights, v).reshape(B, member.shape[1], -1)
        return self.out(pooled)


def _head_matvec(w: jax.Array, x: jax.Array, c: jax.Array) -> jax.Array:
    """Per-head Möbius matvec: w (H, d, D), points x (B, P, D) → points (B, H, P, d) in each head's d-dim ball."""
    return jax.vmap(poincare.mobius_matvec, in_axes=(0, None, None), out_axes=1)(w, x, c)


class HyperbolicBlock(nnx.Module):
    """Causal hyperbolic attention over patch points with a Möbius residual, then a tangent-space feed-forward."""

    def __init__(self, config: HakmemConfig, *, rngs: nnx.Rngs):
        D, H = config.global_dim, config.n_global_heads
        init = nnx.initializers.normal(1.0 / math.sqrt(D))
        self.w_qkv = nnx.Param(init(rngs.params(), (3 * H, D // H, D)))  # q, k, v heads
        self.w_out = nnx.Param(init(rngs.params(), (D, D)))
        self.beta = nnx.Param(jnp.full((H,), math.log(math.expm1(1.0)), jnp.float32))  # softplus → 1
        self.gamma = nnx.Param(jnp.zeros((H,), jnp.float32))
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.up = _linear(rngs, D, config.mlp_ratio * D, std=1.0 / math.sqrt(D))
        self.down = _linear(rngs, config.mlp_ratio * D, D)

    def __call__(
        self, x: jax.Array, c: jax.Array, slot: jax.Array | None = None, kv: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Points x (B, P, D) on the ball of curvature c → (points (B, P, D), key and value points (B, H, S, d)).

        Without a cache (kv None) x holds patches 0…P−1, patch i reads patches j ≤ i, and S = P. With one, x holds
        one patch per row (P = 1) at index slot (B,) int: its key and value are written into the cached ones at that
        slot, and it reads slots ≤ slot.
        """
        B, P, D = x.shape
        q, k, v = jnp.split(_head_matvec(self.w_qkv[...], x, c), 3, axis=1)  # (B, H, P, d) each
        if kv is None:
            visible = jnp.arange(P)[None, :] <= jnp.arange(P)[:, None]
        else:
            index = jnp.arange(kv[0].shape[2])
            write = (index[None, :] == slot[:, None])[:, None, :, None]  # (B, 1, S, 1)
            k, v = jnp.where(write, k, kv[0]), jnp.where(write, v, kv[1])
            visible = (index[None, :] <= slot[:, None])[:, None, None, :]  # (B, 1, 1, S)
        beta = jax.nn.softplus(self.beta[...])[:, None, None]
        logits = -beta * poincare.pairwise_distance(q, k, c) - self.gamma[...][:, None, None]
        logits = jnp.where(visible, logits, -jnp.inf)
        null = jnp.zeros((*logits.shape[:-1], 1), logits.dtype)  # the origin's logit
        weights = jax.nn.softmax(jnp.concatenate([logits, null], axis=-1), axis=-1)
        values = jnp.concatenate([v, jnp.zeros_like(v[:, :, :1])], axis=2)  # (B, H, S + 1, d)
        heads = poincare.gyromidpoint(values[:, :, None], weights, c)  # (B, H, P, d)
        joined = jnp.moveaxis(poincare.logmap0(heads, c), 1, 2).reshape(B, P, D)
        attn = poincare.mobius_matvec(self.w_out[...], poincare.expmap0(joined, c), c)
        x = poincare.mobius_add(x, attn, c)
        ff = self.down(jax.nn.gelu(self.up(self.norm(poincare.logmap0(x, c)))))
        return poincare.mobius_add(x, poincare.expmap0(ff, c), c), (k, v)


class PatchCrossAttention(nnx.Module):
    """Bytes attend to a learned begin state and to the global states of the patches strictly before their own."""

    def __init__(self, config: HakmemConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = config.n_heads, config.dim // config.n_heads
        self.norm = nnx.LayerNorm(config.dim, rngs=rngs)
        self.global_norm = nnx.LayerNorm(config.global_dim, rngs=rngs)
        self.q = _linear(rngs, config.dim, config.dim)
        self.kv = _linear(rngs, config.global_dim, 2 * config.dim)
        self.out = _linear(rngs, config.dim, config.dim)

    def __call__(self, x: jax.Array, memory: jax.Array, pid: jax.Array) -> jax.Array:
        """x (B, T, E), memory (B, 1 + P, D) = [begin, g_0…], pid (B, T) → update (B, T, E) to add to x."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = self.q(self.norm(x)).reshape(B, T, H, d)
        k, v = jnp.split(self.kv(self.global_norm(memory)).reshape(B, -1, 2 * H, d), 2, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        slot = jnp.arange(memory.shape[1])  # slot s > 0 holds patch s − 1
        visible = (slot[None, None, :] == _BEGIN) | (slot[None, None, :] - 1 < pid[:, :, None])  # (B, T, 1 + P)
        weights = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
        return self.out(jnp.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, -1))


class Hakmem(nnx.Module):
    """Local encoder → patch pooling → hyperbolic global blocks → local decoder → byte head."""

    def __init__(self, config: HakmemConfig, *, rngs: nnx.Rngs):
        self.config = config
        E, D = config.dim, config.global_dim
        embed_init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(256, E, embedding_init=embed_init, rngs=rngs)
        self.ngrams = nnx.List(
            [nnx.Embed(config.ngram_table, E, embedding_init=embed_init, rngs=rngs) for _ in config.ngram_sizes]
        )
        self.encoder = nnx.List([Block(config.local, rngs=rngs) for _ in range(config.n_encoder_layers)])
        self.pool = PatchPooling(config, rngs=rngs)
        self.curvature = nnx.Param(jnp.asarray(math.log(math.expm1(config.init_curvature)), jnp.float32))
        self.patch_positions = nnx.Param(embed_init(rngs.params(), (config.context_length, D), jnp.float32))
        self.global_blocks = nnx.List([HyperbolicBlock(config, rngs=rngs) for _ in range(config.n_global_layers)])
        self.begin = nnx.Param(embed_init(rngs.params(), (D,), jnp.float32))
        self.cross = nnx.List([PatchCrossAttention(config, rngs=rngs) for _ in range(config.n_decoder_layers)])
        self.decoder = nnx.List([Block(config.local, rngs=rngs) for _ in range(config.n_decoder_layers)])
        self.norm = nnx.LayerNorm(E, rngs=rngs)
        self.head = _linear(rngs, E, 16 + 256 if config.head == "hierarchical" else 256)

    def c(self) -> jax.Array:
        """Curvature c = softplus(raw) > 0, float32 scalar."""
        return jax.nn.softplus(self.curvature[...])

    def encode(
        self, tokens: jax.Array, ngrams: jax.Array, positions: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        """Bytes (B, T), n-gram rows (B, T, N) at positions (T,) → (encoder outputs (B, T, E), cache)."""
        x = self.embed(tokens)
        for i, table in enumerate(self.ngrams):
            x = x + table(ngrams[..., i])
        return _run_blocks(self.encoder, x, positions, cache)

    def global_states(
        self, h: jax.Array, pid: jax.Array, slot: jax.Array | None = None, kv: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encoder outputs (B, T, E), patch ids (B, T) → (Euclidean global states (B, P, D), keys, values).

        Without a cache: every patch slot P = T, and the global blocks' key and value points (L, B, H, T, d). With
        one (kv: keys and values (L, B, H, S, d)), only patch `slot` (B,) of each row, P = 1, and the updated cache.
        """
        c = self.c()
        index = jnp.arange(h.shape[1])[None, :] if kv is None else slot[:, None]  # patch of each slot: (1 | B, P)
        x = poincare.expmap0(self.pool(h, pid[:, None, :] == index[..., None]), c)
        x = poincare.mobius_add(x, poincare.expmap0(self.patch_positions[...][index], c), c)
        keys, values = [], []
        for i, block in enumerate(self.global_blocks):
            x, (k, v) = block(x, c, slot, None if kv is None else (kv[0][i], kv[1][i]))
            keys.append(k)
            values.append(v)
        return poincare.logmap0(x, c), jnp.stack(keys), jnp.stack(values)

    def decode(
        self, h: jax.Array, pid: jax.Array, g: jax.Array, positions: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        """Encoder outputs (B, T, E), their patch ids (B, T), global states (B, P, D) → (log-probs (B, T, V), cache)."""
        memory = jnp.concatenate([jnp.broadcast_to(self.begin[...], (g.shape[0], 1, g.shape[2])), g], axis=1)
        x = h
        for i, (cross, block) in enumerate(zip(self.cross, self.decoder, strict=True)):
            x = x + cross(x, memory, pid)
            x, cache = _run_block(block, i, x, positions, cache)
        out = self.head(self.norm(x))
        return head_log_probs(out, self.config.head), cache

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Teacher-forced log-probs (B, T, V) float32 of bytes (B, T) int."""
        cfg = self.config
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(f"{tokens.shape[1]} bytes exceed the context length {cfg.context_length}")
        tokens = tokens.astype(jnp.int32)
        positions = jnp.arange(tokens.shape[1])
        pid = patch_ids(cfg, tokens)
        h, _ = self.encode(tokens, ngram_ids(tokens, cfg.ngram_sizes, cfg.ngram_table), positions, None)
        return self.decode(h, pid, self.global_states(h, pid)[0], positions, None)[0]

    def step(self, tokens: jax.Array, start: jax.Array, n_valid: jax.Array, state: HakmemState):
        """Incremental pass; see `forward`."""
        cfg = self.config
        B, T = tokens.shape
        tokens = tokens.astype(jnp.int32)
        positions = start + jnp.arange(T)
        buffer = lax.dynamic_update_slice(state.tokens, tokens, (0, start))
        pid_all = patch_ids(cfg, buffer)
        pid = lax.dynamic_slice(pid_all, (0, start), (B, T))
        all_ngrams = ngram_ids(buffer, cfg.ngram_sizes, cfg.ngram_table)
        ngrams = lax.dynamic_slice(all_ngrams, (0, start, 0), (B, T, len(cfg.ngram_sizes)))
        h, encoder = self.encode(tokens, ngrams, positions, state.encoder)
        h_all = lax.dynamic_update_slice(state.h, h, (0, start, 0))
        needed = pid[:, n_valid - 1]  # patches < needed must have current states
        cached = (state.g, state.global_k, state.global_v)
        if T == 1:  # one byte completes at most one patch per row: patch `ready`, run alone against the caches

            def complete() -> tuple[jax.Array, jax.Array, jax.Array]:
                g, k, v = self.global_states(h_all, pid_all, state.ready, (state.global_k, state.global_v))
                write = jnp.arange(state.capacity)[None, :, None] == state.ready[:, None, None]
                return jnp.where(write, g, state.g), k, v

        else:

            def complete() -> tuple[jax.Array, jax.Array, jax.Array]:
                return self.global_states(h_all, pid_all)

        g, global_k, global_v = lax.cond(jnp.any(needed > state.ready), complete, lambda: cached)
        log_probs, decoder = self.decode(h, pid, g, positions, state.decoder)
        ready = jnp.maximum(needed, state.ready)
        return log_probs, HakmemState(buffer, h_all, g, ready, global_k, global_v, encoder, decoder)


def _run_block(
    block: Block, i: int, x: jax.Array, positions: jax.Array, cache: KVCache | None
) -> tuple[jax.Array, KVCache | None]:
    """Layer i of a block stack, reading and writing its slot of `cache` when there is one."""
    x, (k, v) = block(x, positions, None if cache is None else (cache.k[i], cache.v[i]))
    if cache is not None:
        cache = KVCache(cache.k.at[i].set(k), cache.v.at[i].set(v))
    return x, cache


def _run_blocks(
    blocks: nnx.List, x: jax.Array, positions: jax.Array, cache: KVCache | None
) -> tuple[jax.Array, KVCache | None]:
    for i, block in enumerate(blocks):
        x, cache = _run_block(block, i, x, positions, cache)
    return x, cache


def _abstract(config: HakmemConfig) -> Hakmem:
    return nnx.eval_shape(lambda: Hakmem(config, rngs=nnx.Rngs(0)))


@partial(jax.jit, static_argnums=0)
def _init_params(config: HakmemConfig, key: jax.Array) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(Hakmem(config, rngs=nnx.Rngs(key))))


def init(config: HakmemConfig, seed: int = 0) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, params): params a nested dict of float32 arrays, initialised in one compiled program."""
    return nnx.graphdef(_abstract(config)), _init_params(config, jax.random.key(seed))


def param_count(config: HakmemConfig) -> int:
    """Number of trainable scalars, computed from shapes alone (nothing allocated)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(_abstract(config))))


def apply(graphdef: nnx.GraphDef, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """Teacher-forced causal log-probs (B, T, 256) float32 for bytes (B, T) int; row t predicts byte t+1."""
    return nnx.merge(graphdef, params)(tokens)


def forward(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    tokens: jax.Array,
    start: jax.Array | int,
    n_valid: jax.Array | int,
    state: HakmemState,
) -> tuple[jax.Array, HakmemState]:
    """Feed bytes (B, T) at positions start…start+T−1 (start + T ≤ capacity), the first n_valid real.

    Returns (log-probs (B, T, V), new state); rows ≥ n_valid are meaningless, and the padding they wrote is
    overwritten by later calls before any real position can read it. The local blocks run against their KV caches;
    patch boundaries and n-gram rows are recomputed over the byte buffer (cheap, O(S)). The hyperbolic global stack
    runs only when a patch completes (a new patch starts in this call): for one byte (T = 1) on the completed patch
    alone against the global blocks' key/value caches; for a wider chunk, which may complete several, over all S
    patch slots of the buffer (refilling those caches).
    """
    return nnx.merge(graphdef, params).step(tokens, jnp.asarray(start), jnp.asarray(n_valid), state)


def loss_fn(graphdef: nnx.GraphDef, params: dict[str, Any], batch: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats over a (B, T) int batch (predicts bytes 1…T−1 from those before)."""
    log_probs = apply(graphdef, params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(log_probs, batch[:, 1:]).mean()


@partial(jax.jit, donate_argnums=5)
def _run(
    graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, start: jax.Array, n_valid: jax.Array, state: HakmemState
) -> tuple[jax.Array, HakmemState]:
    """(log-probs (V,) after the n_valid-th byte, state)."""
    log_probs, state = forward(graphdef, params, tokens, start, n_valid, state)
    return log_probs[0, n_valid - 1], state


class HakmemDecoder:
    """The `generate.Decoder` of a HAKMEM model: incremental, one byte per step.

    State: a `HakmemState` of the loop's capacity. Per step the local encoder and decoder each run one position
    against their KV caches, and the hyperbolic global stack runs only on the steps that complete a patch, for that
    patch alone against its own key/value caches. Known cost: patch boundaries (a scan) and n-gram hashes are
    recomputed over the whole byte buffer each step, O(S) but cheap next to the attention. Prompts run in chunks of
    at most PREFILL_CHUNK bytes padded to power-of-two widths, compiled once per (width, capacity).
    The returned "logits" are log-probabilities (a valid logit vector for the sampler).
    """

    vocab_size = 256

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        *,
        stop_ids: Iterable[int] = (),
        context_length: int | None = None,
    ):
        config = nnx.merge(graphdef, params).config
        if not isinstance(config, HakmemConfig):
            raise TypeError(f"HakmemDecoder needs a HAKMEM model, got one configured by {type(config).__name__}")
        limit = config.context_length
        context_length = limit if context_length is None else context_length
        if not 1 < context_length <= limit:
            raise ValueError(f"context_length must be in 2…{limit} (the model's positions), got {context_length}")
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.context_length = context_length
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self._compiled: dict[tuple[int, int], Any] = {}
        self.last_timings: dict[str, float] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def _executable(self, width: int, capacity: int):
        """The compiled run for (width, capacity); compile time goes into last_timings."""
        if (width, capacity) not in self._compiled:
            t0 = time.perf_counter()
            state = jax.eval_shape(partial(init_state, self.config, 1, capacity))
            tokens = jax.ShapeDtypeStruct((1, width), jnp.int32)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            lowered = _run.lower(self.graphdef, self.params, tokens, scalar, scalar, state)
            self._compiled[width, capacity] = lowered.compile()
            spent = time.perf_counter() - t0
            self.last_timings["compile_seconds"] = self.last_timings.get("compile_seconds", 0.0) + spent
        return self._compiled[width, capacity]

    @staticmethod
    def _chunks(n: int, start: int, capacity: int) -> list[tuple[int, int, int]]:
        """(offset, length, padded width) of each chunk feeding n bytes at `start`."""
        if start + n > capacity:
            raise InvalidPromptError(f"{n} bytes at position {start} do not fit a state of {capacity} positions")
        chunks = []
        for offset in range(0, n, PREFILL_CHUNK):
            length = min(PREFILL_CHUNK, n - offset)
            chunks.append((offset, length, prompt_width(length, capacity - start - offset)))
        return chunks

    def run(self, token_ids: Sequence[int], start: int, state: HakmemState) -> tuple[jax.Array, HakmemState]:
        """Feed token_ids at positions start…: (log-probs (V,) float32 for the next byte, new state)."""
        log_probs = None
        for offset, length, width in self._chunks(len(token_ids), start, state.capacity):
            padded = np.zeros((1, width), np.int32)
            padded[0, :length] = token_ids[offset : offset + length]
            fn = self._executable(width, state.capacity)
            log_probs, state = fn(self.graphdef, self.params, padded, np.int32(start + offset), np.int32(length), state)
        return log_probs, state

    def prepare(self, prompt_len: int, capacity: int) -> None:
        """Compile every executable a generation of this size needs, before it is timed."""
        self.last_timings = {"compile_seconds": 0.0}
        for _, _, width in [*self._chunks(prompt_len, 0, capacity), (0, 1, 1)]:
            self._executable(width, capacity)

    def prefill(self, prompt_ids: Sequence[int], capacity: int) -> tuple[jax.Array, HakmemState]:
        return self.run(prompt_ids, 0, init_state(self.config, 1, capacity))

    def step(self, state: HakmemState, token: int, position: int) -> tuple[jax.Array, HakmemState]:
        return self.run([token], position, state)

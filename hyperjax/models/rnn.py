"""Byte-level recurrent language model: byte embedding, stacked GRU or LSTM layers run with `lax.scan`, 256-way head.

Pure entry points over plain pytrees: `init` gives `(graphdef, params)`, params being a nested dict of float32
arrays (`nnx.to_pure_dict` form) and the graphdef a leafless pytree, so `forward`, `apply` and `loss_fn` jit, export
and checkpoint as data. The recurrent state (one carry per layer) is explicit: `forward` takes and returns it, which
is what incremental decoding needs.

Each layer projects its whole input sequence at once (one matmul over B·T) and scans only the hidden-to-hidden part.

Shapes: B batch, T time steps, E embedding dim, H hidden dim, V vocabulary (256 bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

CELLS = ("gru", "lstm")

Carry = Any  # GRU: h (B, H); LSTM: (h, c), each (B, H); float32
State = tuple[Carry, ...]  # one carry per layer


@dataclass(frozen=True)
class ByteRNNConfig:
    """Static sizes of a byte RNN."""

    vocab_size: int = 256
    embed_dim: int = 64
    hidden_dim: int = 256
    n_layers: int = 2
    cell: str = "gru"  # "gru" | "lstm"

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        sizes = {k: getattr(self, k) for k in ("vocab_size", "embed_dim", "hidden_dim", "n_layers")}
        if min(sizes.values()) < 1:
            raise ValueError(f"every size must be at least 1, got {sizes}")


def _input_weights(rngs: nnx.Rngs, in_dim: int, hidden: int, gates: int) -> nnx.Param:
    return nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_dim, gates * hidden), jnp.float32))


def _recurrent_weights(rngs: nnx.Rngs, hidden: int, gates: int) -> nnx.Param:
    """(H, gates·H): one independent orthogonal block per gate."""
    init = nnx.initializers.orthogonal()
    keys = jax.random.split(rngs.params(), gates)
    return nnx.Param(jnp.concatenate([init(k, (hidden, hidden), jnp.float32) for k in keys], axis=1))


def _scan(
    update: Callable[[Carry, jax.Array], tuple[Carry, jax.Array]], carry: Carry, gx: jax.Array, valid: jax.Array
) -> tuple[jax.Array, Carry]:
    """Run `update(carry, gx_t) -> (carry, h_t)` over gx (B, T, G); steps where valid (T,) is False keep the carry."""

    def step(carry: Carry, inputs: tuple[jax.Array, jax.Array]) -> tuple[Carry, jax.Array]:
        g, ok = inputs
        new, out = update(carry, g)
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, carry), out

    carry, ys = lax.scan(step, carry, (jnp.swapaxes(gx, 0, 1), valid))
    return jnp.swapaxes(ys, 0, 1), carry


class GRU(nnx.Module):
    """GRU layer; the reset gate scales the hidden projection including its bias (the cuDNN/PyTorch variant).

    r = σ(x·Wr + h·Ur + b), z = σ(x·Wz + h·Uz + b), n = tanh(x·Wn + bx + r ⊙ (h·Un + bh)), h' = (1 − z) ⊙ n + z ⊙ h.
    """

    def __init__(self, in_dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.hidden_dim = hidden_dim
        self.w_x = _input_weights(rngs, in_dim, hidden_dim, 3)
        self.w_h = _recurrent_weights(rngs, hidden_dim, 3)
        self.b_x = nnx.Param(jnp.zeros(3 * hidden_dim, jnp.float32))
        self.b_h = nnx.Param(jnp.zeros(3 * hidden_dim, jnp.float32))

    def __call__(self, xs: jax.Array, carry: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """xs (B, T, in), carry h (B, H), valid (T,) bool → (outputs (B, T, H), h after the valid steps)."""
        w_h, b_h, H = self.w_h[...], self.b_h[...], self.hidden_dim

        def update(h: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
            gh = h @ w_h + b_h
            r = jax.nn.sigmoid(g[:, :H] + gh[:, :H])
            z = jax.nn.sigmoid(g[:, H : 2 * H] + gh[:, H : 2 * H])
            n = jnp.tanh(g[:, 2 * H :] + r * gh[:, 2 * H :])
            h = (1.0 - z) * n + z * h
            return h, h

        return _scan(update, carry, xs @ self.w_x[...] + self.b_x[...], valid)


class LSTM(nnx.Module):
    """LSTM layer (gates i, f, g, o; forget-gate bias initialised to 1): c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c')."""

    def __init__(self, in_dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.hidden_dim = hidden_dim
        self.w_x = _input_weights(rngs, in_dim, hidden_dim, 4)
        self.w_h = _recurrent_weights(rngs, hidden_dim, 4)
        self.b = nnx.Param(jnp.zeros(4 * hidden_dim, jnp.float32).at[hidden_dim : 2 * hidden_dim].set(1.0))

    def __call__(
        self, xs: jax.Array, carry: tuple[jax.Array, jax.Array], valid: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """xs (B, T, in), carry (h, c) each (B, H), valid (T,) bool → (outputs (B, T, H), carry after valid steps)."""
        w_h, H = self.w_h[...], self.hidden_dim

        def update(carry: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
            h, c = carry
            g = g + h @ w_h
            i, f, o = (jax.nn.sigmoid(g[:, k * H : (k + 1) * H]) for k in (0, 1, 3))
            c = f * c + i * jnp.tanh(g[:, 2 * H : 3 * H])
            h = o * jnp.tanh(c)
            return (h, c), h

        return _scan(update, carry, xs @ self.w_x[...] + self.b[...], valid)


class ByteRNN(nnx.Module):
    """Embedding → n recurrent layers → linear head to V logits."""

    def __init__(self, config: ByteRNNConfig, *, rngs: nnx.Rngs):
        self.config = config
        cell = GRU if config.cell == "gru" else LSTM
        E, H = config.embed_dim, config.hidden_dim
        self.embed = nnx.Embed(config.vocab_size, E, rngs=rngs)
        self.layers = nnx.List([cell(E if i == 0 else H, H, rngs=rngs) for i in range(config.n_layers)])
        self.head = nnx.Linear(H, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, state: State, valid: jax.Array) -> tuple[jax.Array, State]:
        """tokens (B, T) int, state, valid (T,) bool → (logits (B, T, V) float32, state after the valid steps)."""
        x = self.embed(tokens)
        carries = []
        for layer, carry in zip(self.layers, state, strict=True):
            x, carry = layer(x, carry, valid)
            carries.append(carry)
        return self.head(x), tuple(carries)


def _abstract(config: ByteRNNConfig) -> ByteRNN:
    return nnx.eval_shape(lambda: ByteRNN(config, rngs=nnx.Rngs(0)))


@partial(jax.jit, static_argnums=0)
def _init_params(config: ByteRNNConfig, key: jax.Array) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(ByteRNN(config, rngs=nnx.Rngs(key))))


def init(config: ByteRNNConfig, seed: int = 0) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, params): params a nested dict of float32 arrays, initialised in one compiled program."""
    return nnx.graphdef(_abstract(config)), _init_params(config, jax.random.key(seed))


def param_count(config: ByteRNNConfig) -> int:
    """Number of trainable scalars, computed from shapes alone (nothing allocated)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(_abstract(config))))


def initial_state(config: ByteRNNConfig, batch: int = 1) -> State:
    """Zero recurrent state: one carry per layer (GRU h, LSTM (h, c)), each (batch, H) float32."""
    zeros = jnp.zeros((batch, config.hidden_dim), jnp.float32)
    return tuple(zeros if config.cell == "gru" else (zeros, zeros) for _ in range(config.n_layers))


def forward(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    tokens: jax.Array,
    state: State,
    n_valid: jax.Array | int | None = None,
) -> tuple[jax.Array, State]:
    """Feed tokens (B, T) int from `state`: (logits (B, T, V) float32, state after the first n_valid steps).

    `n_valid` (default T) marks trailing steps as padding: they do not advance the state, and their logits are
    meaningless."""
    T = tokens.shape[1]
    valid = jnp.arange(T) < (T if n_valid is None else n_valid)
    return nnx.merge(graphdef, params)(tokens, state, valid)


def apply(graphdef: nnx.GraphDef, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    """Teacher-forced logits (B, T, V) float32 for tokens (B, T) int from the zero state; row t predicts t+1."""
    model = nnx.merge(graphdef, params)
    return model(tokens, initial_state(model.config, tokens.shape[0]), jnp.ones(tokens.shape[1], bool))[0]


def loss_fn(graphdef: nnx.GraphDef, params: dict[str, Any], batch: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats over a (B, T) int batch (predicts bytes 1…T−1 from those before)."""
    logits = apply(graphdef, params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

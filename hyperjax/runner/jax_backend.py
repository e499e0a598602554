"""Run the exported functions with jax alone: `jax.export.deserialize`, then a jit of `Exported.call`.

Weights reach the device through `jax.device_put` of the memory-mapped views, which on the CPU aliases the file's
pages (64-byte aligned) instead of copying them. The state (KV cache or carries) is donated to each call and updated
in place. Executables go to XLA's persistent cache ($HYPERJAX_XLA_CACHE, default $HYPERJAX_HOME/xla-cache, as the
library), so a second start skips compilation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from hyperjax.runner.format import RunnerError, cache_leaves

Cache = tuple[jax.Array, ...]  # the state arrays: a KV cache's keys and values, or an RNN's carries


def _enable_compilation_cache() -> None:
    home = Path(os.environ.get("HYPERJAX_HOME") or Path.home() / ".cache" / "hyperjax")
    cache_dir = Path(os.environ.get("HYPERJAX_XLA_CACHE") or home / "xla-cache")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def default_platform() -> str:
    """The platform jax runs on here by default: 'cpu', 'cuda' or 'rocm'."""
    return jax.default_backend()


class JaxFunctions:
    """The prefill buckets and the decode step of one export, on one device."""

    def __init__(self, directory: Path, manifest: dict[str, Any], weights: list[np.ndarray], platform: str):
        _enable_compilation_cache()
        try:
            self.device = jax.devices(platform)[0]
        except RuntimeError:
            raise RunnerError(f"platform {platform} was exported but is not available on this machine") from None
        self.directory = Path(directory)
        self.files = {f["tokens"]: f["file"] for f in manifest["functions"]}
        self.state = cache_leaves(manifest["cache"])
        self.weights = tuple(jax.device_put(w, self.device) for w in weights)
        self._calls: dict[int, Any] = {}

    def prepare(self, sizes: Iterable[int]) -> None:
        """Compile (or fetch from the persistent cache) the functions for these token counts."""
        for tokens in sizes:
            if tokens not in self._calls:
                exported = export.deserialize(bytearray((self.directory / self.files[tokens]).read_bytes()))
                call = jax.jit(exported.call, donate_argnums=tuple(range(4, 4 + len(self.state))))
                self._calls[tokens] = call.lower(self.weights, *self._specs(tokens)).compile()

    def _specs(self, tokens: int) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Shapes of the non-weight arguments: tokens (1, T), start, n_valid, the state arrays — on this device."""
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        scalar = jax.ShapeDtypeStruct((), np.int32, sharding=sharding)
        state = (jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in self.state)
        return jax.ShapeDtypeStruct((1, tokens), np.int32, sharding=sharding), scalar, scalar, *state

    def new_cache(self) -> Cache:
        return tuple(jnp.zeros(shape, dtype, device=self.device) for shape, dtype in self.state)

    def run(self, tokens: np.ndarray, start: int, n_valid: int, cache: Cache) -> tuple[np.ndarray, Cache]:
        """tokens int32 (1, T) with T an exported size; logits float32 (V,) after the last real token."""
        self.prepare([tokens.shape[1]])
        logits, *state = self._calls[tokens.shape[1]](self.weights, tokens, np.int32(start), np.int32(n_valid), *cache)
        return np.asarray(logits)[0], tuple(state)

"""On-demand layer loading under a memory budget: decoder blocks stream from the memory-mapped GGUF file.

The embedding table / output head and the final norm stay resident (every token needs them); decoder blocks are
copied from the file when a forward pass reaches them and evicted least-recently-used when the resident total would
exceed the budget. After each copy the file pages are released (`madvise(MADV_DONTNEED)`), so the mapping itself
does not grow the process's resident set.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp

from hyperjax.errors import HyperjaxError
from hyperjax.io.gguf import GGUFFile, GGUFTensor, release_pages
from hyperjax.io.llama_gguf import LAYER_TENSORS, host_weight, to_device
from hyperjax.kernels.native import repacked_nbytes
from hyperjax.kernels.quant import QuantizedTensor
from hyperjax.models.llama import LayerParams


class MemoryBudgetError(HyperjaxError, ValueError):
    """The memory budget cannot hold even the always-resident weights plus one decoder block."""


def tree_nbytes(tree: Any) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def parse_bytes(text: str) -> int:
    """'64MB', '1.5GiB', '500k', '1048576' → bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise MemoryBudgetError(f"cannot read {text!r} as a size (examples: 64MB, 1.5GiB, 500k)") from None
    if unit not in units or value <= 0:
        raise MemoryBudgetError(f"cannot read {text!r} as a positive size (units: B, kB, MB, GB, KiB, MiB, GiB)")
    return int(value * units[unit])


class LayerStore:
    """LRU cache of device-resident decoder blocks, loaded from the GGUF file on first use.

    `resident_bytes` counts the blocks held now; `peak_resident_bytes` the most ever held together with
    `fixed_bytes` (embedding, head, final norm), the figure the budget bounds.
    """

    def __init__(self, gguf: GGUFFile, n_layers: int, budget_bytes: int, fixed_bytes: int, native: bool = False):
        self._gguf = gguf
        self.native = native
        self.n_layers = n_layers
        self.budget_bytes = budget_bytes
        self.fixed_bytes = fixed_bytes
        self._layers: OrderedDict[int, LayerParams] = OrderedDict()
        self.resident_bytes = 0
        self.peak_resident_bytes = fixed_bytes
        self.loads = 0
        self.layer_bytes = [self._file_bytes(i) for i in range(n_layers)]
        if fixed_bytes + max(self.layer_bytes) > budget_bytes:
            raise MemoryBudgetError(
                f"a budget of {budget_bytes / 2**20:.1f} MiB cannot hold the resident weights "
                f"({fixed_bytes / 2**20:.1f} MiB: embedding, head, norms) plus one block "
                f"({max(self.layer_bytes) / 2**20:.1f} MiB)"
            )

    def _tensors(self, layer: int) -> dict[str, GGUFTensor]:
        return {role: self._gguf.tensors[f"blk.{layer}.{suffix}"] for role, suffix in LAYER_TENSORS.items()}

    def _file_bytes(self, layer: int) -> int:
        """Bytes block `layer` takes once loaded: its tensors' file bytes, or their repacked size when native."""
        tensors = self._tensors(layer).values()
        if not self.native:
            return sum(t.nbytes for t in tensors)
        return sum(
            repacked_nbytes(w.kind, *w.shape) if isinstance(w, QuantizedTensor) else t.nbytes
            for t, w in ((t, host_weight(t)) for t in tensors)
        )

    def _load(self, layer: int) -> LayerParams:
        weights = {}
        for role, tensor in self._tensors(layer).items():
            host = host_weight(tensor)
            weights[role] = to_device(host, self.native) if self.native else jax.tree.map(jnp.array, host)
            release_pages(tensor)
        self.loads += 1
        return LayerParams(**weights)

    def get(self, layer: int) -> LayerParams:
        """Block `layer` on the device, evicting least-recently-used blocks to stay under the budget."""
        if layer in self._layers:
            self._layers.move_to_end(layer)
            return self._layers[layer]
        need = self.layer_bytes[layer]
        while self._layers and self.fixed_bytes + self.resident_bytes + need > self.budget_bytes:
            _, evicted = self._layers.popitem(last=False)
            self.resident_bytes -= tree_nbytes(evicted)
        params = self._load(layer)
        self._layers[layer] = params
        self.resident_bytes += tree_nbytes(params)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.fixed_bytes + self.resident_bytes)
        return params

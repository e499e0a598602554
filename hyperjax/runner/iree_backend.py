"""Run the IREE-compiled functions (`.vmfb`, llvm-cpu) with the IREE runtime alone, on the `local-task` driver.

Weights are imported as HAL buffers over copy-on-write memory maps of the weight file (no copy; IREE imports only
writable host buffers, and does not keep them alive: the maps are held here). Each function is its own VM module
(all are named after the exported `jit_fn`), so each gets its own context. The KV cache is host memory imported the
same way: exports made with cache update "by_runner" return only the new keys and values, which are written into it
here (older exports return the whole cache, kept in device arrays between calls).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import iree.runtime as rt
import numpy as np

from hyperjax.runner.format import RunnerError, cache_leaves

_ELEMENT_TYPES = {
    "uint8": rt.HalElementType.UINT_8,
    "int8": rt.HalElementType.SINT_8,
    "float16": rt.HalElementType.FLOAT_16,
    "float32": rt.HalElementType.FLOAT_32,
    "int32": rt.HalElementType.SINT_32,
}


@dataclass
class HostCache:
    """A KV cache (cache_shape, each) in host memory, and the HAL buffer views through which IREE reads it."""

    keys: np.ndarray
    values: np.ndarray
    views: tuple[rt.HalBufferView, rt.HalBufferView]


class IreeFunctions:
    """The prefill buckets and the decode step of one IREE export."""

    def __init__(self, directory: Path, manifest: dict[str, Any], weights: list[np.ndarray]):
        self.config = rt.Config("local-task")
        self.directory = Path(directory)
        self.files = {f["tokens"]: f["file"] for f in manifest["functions"]}
        self.state = cache_leaves(manifest["cache"])
        self.cache_update = manifest["cache"].get("update", "in_graph")
        self._host = weights  # the imported buffers alias these maps: they must outlive every call
        self.weights = [self._import(w) for w in weights]
        self._calls: dict[int, Any] = {}

    def _import(self, array: np.ndarray) -> rt.HalBufferView:
        if array.dtype.name not in _ELEMENT_TYPES:
            raise RunnerError(f"weights of dtype {array.dtype.name} are not supported by the IREE runner")
        buffer = self.config.device.allocator.import_host_allocation(
            array, rt.MemoryType.DEVICE_LOCAL | rt.MemoryType.HOST_VISIBLE, rt.BufferUsage.DEFAULT
        )
        return rt.HalBufferView(buffer, array.shape, _ELEMENT_TYPES[array.dtype.name])

    def prepare(self, sizes: Iterable[int]) -> None:
        """Map the modules for these token counts (compiled ahead of time: nothing to compile here)."""
        for tokens in sizes:
            if tokens not in self._calls:
                module = rt.VmModule.mmap(self.config.vm_instance, str(self.directory / self.files[tokens]))
                context = rt.SystemContext(config=self.config, vm_modules=[module])
                self._calls[tokens] = context.modules[module.name]["main"]

    def new_cache(self) -> HostCache | tuple[np.ndarray, ...]:
        if self.cache_update == "in_graph":
            return tuple(np.zeros(shape, dtype) for shape, dtype in self.state)
        # Page-aligned, zero-filled on first touch: the runtime reads these in place on every call.
        keys, values = (np.frombuffer(mmap.mmap(-1, int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype)
                        .reshape(shape) for shape, dtype in self.state)  # fmt: skip
        return HostCache(keys, values, (self._import(keys), self._import(values)))

    def run(self, tokens: np.ndarray, start: int, n_valid: int, cache: Any) -> tuple[np.ndarray, Any]:
        """tokens int32 (1, T) with T an exported size; logits float32 (V,) after the last real token."""
        self.prepare([tokens.shape[1]])
        inputs = cache.views if isinstance(cache, HostCache) else cache
        call = self._calls[tokens.shape[1]]
        logits, *state = call(*self.weights, tokens, np.int32(start), np.int32(n_valid), *inputs)
        if isinstance(cache, HostCache):
            keys, values = state
            cache.keys[:, :, start : start + n_valid] = keys.to_host()[:, :, :n_valid]
            cache.values[:, :, start : start + n_valid] = values.to_host()[:, :, :n_valid]
            return np.asarray(logits.to_host())[0], cache
        return np.asarray(logits.to_host())[0], tuple(state)

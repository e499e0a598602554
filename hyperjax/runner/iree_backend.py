"""Run the IREE-compiled functions (`.vmfb`, llvm-cpu) with the IREE runtime alone, on the `local-task` driver.

Weights are imported as HAL buffers over copy-on-write memory maps of the weight file (no copy; IREE imports only
writable host buffers, and does not keep them alive: the maps are held here). Each function is its own VM module
(all are named after the exported `jit_fn`), so each gets its own context; the KV cache stays in device arrays
between calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import iree.runtime as rt
import numpy as np

from hyperjax.runner.format import RunnerError

_ELEMENT_TYPES = {
    "uint8": rt.HalElementType.UINT_8,
    "int8": rt.HalElementType.SINT_8,
    "float16": rt.HalElementType.FLOAT_16,
    "float32": rt.HalElementType.FLOAT_32,
    "int32": rt.HalElementType.SINT_32,
}


class IreeFunctions:
    """The prefill buckets and the decode step of one IREE export."""

    def __init__(self, directory: Path, manifest: dict[str, Any], weights: list[np.ndarray]):
        self.config = rt.Config("local-task")
        self.directory = Path(directory)
        self.files = {f["tokens"]: f["file"] for f in manifest["functions"]}
        self.cache_spec = manifest["cache"]
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

    def new_cache(self) -> tuple[np.ndarray, np.ndarray]:
        shape, dtype = tuple(self.cache_spec["shape"]), self.cache_spec["dtype"]
        return np.zeros(shape, dtype), np.zeros(shape, dtype)

    def run(self, tokens: np.ndarray, start: int, n_valid: int, cache: tuple) -> tuple[np.ndarray, tuple]:
        """tokens int32 (1, T) with T an exported size; logits float32 (V,) after the last real token."""
        self.prepare([tokens.shape[1]])
        logits, keys, values = self._calls[tokens.shape[1]](
            *self.weights, tokens, np.int32(start), np.int32(n_valid), *cache
        )
        return np.asarray(logits.to_host())[0], (keys, values)

"""Where memory goes: process RSS (current and peak), bytes of weights by format, JAX's live buffers."""

from __future__ import annotations

import resource
import sys
from collections import defaultdict
from typing import Any

import jax
import numpy as np
import psutil

from hyperjax.kernels.native import NativeWeight
from hyperjax.kernels.quant import QuantizedTensor
from hyperjax.kernels.sparse import Q4CSR

_PACKED = (QuantizedTensor, NativeWeight, Q4CSR)


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def live_buffer_bytes() -> int:
    """Bytes held by live JAX arrays on every device."""
    return sum(a.nbytes for a in jax.live_arrays())


def _format_of(leaf: Any) -> str:
    if isinstance(leaf, QuantizedTensor | NativeWeight):
        return leaf.kind
    if isinstance(leaf, Q4CSR):
        return "q4csr"
    return str(np.dtype(leaf.dtype))


def _stack_dims(leaf: QuantizedTensor | NativeWeight | Q4CSR) -> tuple[int, ...]:
    """Leading stack axes of a packed weight: (n_layers,) for a layer stack, () for one matrix."""
    if isinstance(leaf, Q4CSR):
        return tuple(leaf.indices.shape[:-1])
    return tuple(leaf.data.shape[:-2] if isinstance(leaf, NativeWeight) else leaf.packed.shape[:-2])


def weight_bytes_by_format(params: Any) -> dict[str, dict[str, int]]:
    """{format: {"tensors": n, "params": elements, "bytes": bytes held}} over a parameter pytree.

    A `QuantizedTensor` counts its packed nibbles, scales and minimums exactly (a `NativeWeight`, the same blocks
    repacked for the native kernels, counts as its format with its 16-row group padding), a `Q4CSR` ("q4csr") its codes,
    indices, row pointers, scales and offsets (stack padding included) against its dense (rows × cols) parameters;
    layer stacks count every layer.
    """
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, _PACKED))
    for leaf in leaves:
        entry = totals[_format_of(leaf)]
        if isinstance(leaf, _PACKED):
            layers = int(np.prod(_stack_dims(leaf)))
            rows, cols = leaf.shape
            entry["tensors"] += layers
            entry["params"] += layers * rows * cols
            entry["bytes"] += sum(x.nbytes for x in jax.tree.leaves(leaf))
        else:
            entry["tensors"] += 1
            entry["params"] += int(np.prod(leaf.shape))
            entry["bytes"] += leaf.nbytes
    return dict(totals)


def weight_bytes_by_tensor(params: Any) -> dict[str, dict[str, Any]]:
    """{"layers.wq": {"format": "q4_1", "shape": [30, 576, 576], "bytes": n}, ...}: every weight of a pytree.

    Shapes are logical (rows, cols) with any stacked layer axis first; bytes are what the packed form holds.
    """
    is_quantized = lambda x: isinstance(x, _PACKED)  # noqa: E731
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        name = ".".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)
        if is_quantized(leaf):
            shape = [*_stack_dims(leaf), *leaf.shape]
            size = leaf.nbytes
        else:
            shape, size = list(leaf.shape), int(leaf.nbytes)
        out[name] = {"format": _format_of(leaf), "shape": shape, "bytes": size}
    return out


def memory_report(params: Any | None = None) -> dict[str, Any]:
    """A JSON-ready snapshot: RSS now and at peak, JAX live-buffer total, and weights by format and by tensor."""
    report: dict[str, Any] = {
        "rss_bytes": current_rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "jax_live_buffer_bytes": live_buffer_bytes(),
    }
    if params is not None:
        by_format = weight_bytes_by_format(params)
        report["weights_by_format"] = by_format
        report["weights_by_tensor"] = weight_bytes_by_tensor(params)
        report["weight_bytes"] = sum(v["bytes"] for v in by_format.values())
    return report

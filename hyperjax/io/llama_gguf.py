"""Map a `llama` GGUF file onto `LlamaParams`, losslessly: quantized blocks stay packed, nothing is requantized.

With `native=True` the blocks are repacked (still lossless) into the layout of the native kernels
(`hyperjax.kernels.native`) on the host, before they reach the device: one copy of each weight either way.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.errors import GGUFError, UnsupportedTensorTypeError
from hyperjax.io.gguf import GGUFFile, GGUFTensor, release_pages
from hyperjax.kernels.native import repack
from hyperjax.kernels.quant import GGUF_GROUP, QuantizedTensor, from_gguf_blocks
from hyperjax.models.llama import LayerParams, LlamaConfig, LlamaParams, Weight

SUPPORTED_ARCHITECTURES = ("llama",)
_QUANTIZED = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}


def _tensor(gguf: GGUFFile, name: str) -> GGUFTensor:
    try:
        return gguf.tensors[name]
    except KeyError:
        raise GGUFError(f"{gguf.path}: tensor '{name}' is missing") from None


def _check_shape(tensor: GGUFTensor, expected: tuple[int, ...], path: os.PathLike) -> None:
    if tuple(tensor.shape) != expected:
        raise GGUFError(f"{path}: tensor '{tensor.name}' has shape {tuple(tensor.shape)}, expected {expected}")


def host_weight(tensor: GGUFTensor) -> QuantizedTensor | np.ndarray:
    """The tensor as host arrays (packed blocks or a float vector/matrix), still backed by the file map."""
    if tensor.ggml_type in _QUANTIZED:
        return from_gguf_blocks(tensor.data, _QUANTIZED[tensor.ggml_type], tuple(tensor.shape))
    if tensor.ggml_type in ("F32", "F16"):
        return np.asarray(tensor.data)
    raise UnsupportedTensorTypeError(f"tensor '{tensor.name}' has unsupported type {tensor.ggml_type}")


def to_device(weight: QuantizedTensor | np.ndarray, native: bool = False) -> Weight:
    """Host weight → device arrays; GGUF blocks repacked for the native kernels when `native`."""
    if native and isinstance(weight, QuantizedTensor) and weight.group_size == GGUF_GROUP:
        weight = repack(weight)
    return jax.tree.map(jnp.asarray, weight)


def _stack(tensors: list[GGUFTensor], role: str, path: os.PathLike, native: bool = False) -> Weight:
    """Stack one role's per-layer tensors along a new leading axis, filled layer by layer into one host buffer."""
    types = {t.ggml_type for t in tensors}
    if len(types) != 1:
        raise UnsupportedTensorTypeError(
            f"{path}: layers mix tensor types {sorted(types)} for '{role}'; hyperjax needs one type per role"
        )
    first = host_weight(tensors[0])
    leaves, treedef = jax.tree.flatten(first)
    stacked = [np.empty((len(tensors), *leaf.shape), leaf.dtype) for leaf in leaves]
    for i, tensor in enumerate(tensors):
        for buffer, leaf in zip(stacked, jax.tree.leaves(host_weight(tensor)), strict=True):
            buffer[i] = leaf
        release_pages(tensor)
    return to_device(jax.tree.unflatten(treedef, stacked), native)


def resident_params_from_gguf(gguf: GGUFFile, native: bool = False) -> tuple[LlamaConfig, LlamaParams]:
    """Config, and parameters without decoder blocks (`layers` is None): embedding, final norm, output head."""
    path = gguf.path
    embed_tensor = _tensor(gguf, "token_embd.weight")
    if len(embed_tensor.shape) != 2:
        raise GGUFError(f"{path}: token_embd.weight must be 2-D, got shape {tuple(embed_tensor.shape)}")
    config = LlamaConfig.from_gguf_metadata(gguf.metadata, vocab_size=int(embed_tensor.shape[0]))
    _check_shape(embed_tensor, (config.vocab_size, config.dim), path)

    def device_weight(tensor: GGUFTensor) -> Weight:
        weight = to_device(host_weight(tensor), native)
        release_pages(tensor)
        return weight

    output = None
    if "output.weight" in gguf.tensors:
        output_tensor = gguf.tensors["output.weight"]
        _check_shape(output_tensor, (config.vocab_size, config.dim), path)
        output = device_weight(output_tensor)
    final_norm = _tensor(gguf, "output_norm.weight")
    _check_shape(final_norm, (config.dim,), path)
    params = LlamaParams(
        embed=device_weight(embed_tensor),
        layers=None,
        final_norm=jnp.asarray(host_weight(final_norm), jnp.float32),
        output=output,
    )
    return config, params


def layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The (rows, cols) of each decoder block role, and (E,) for the norms."""
    e, hd = config.dim, config.head_dim
    return {
        "attn_norm": (e,),
        "wq": (config.n_heads * hd, e),
        "wk": (config.n_kv_heads * hd, e),
        "wv": (config.n_kv_heads * hd, e),
        "wo": (e, config.n_heads * hd),
        "ffn_norm": (e,),
        "w_gate": (config.ffn_dim, e),
        "w_up": (config.ffn_dim, e),
        "w_down": (e, config.ffn_dim),
    }


def check_layer_shapes(gguf: GGUFFile, config: LlamaConfig) -> dict[str, list[GGUFTensor]]:
    """Every decoder block's tensors, by role, after checking that each exists and has its expected shape."""
    expected = layer_shapes(config)
    per_role: dict[str, list[GGUFTensor]] = {role: [] for role in LAYER_TENSORS}
    for layer in range(config.n_layers):
        for role, suffix in LAYER_TENSORS.items():
            tensor = _tensor(gguf, f"blk.{layer}.{suffix}")
            _check_shape(tensor, expected[role], gguf.path)
            per_role[role].append(tensor)
    return per_role


def params_from_gguf(gguf: GGUFFile, native: bool = False) -> tuple[LlamaConfig, LlamaParams]:
    """Config and packed parameters of a llama GGUF; raises GGUFError on a missing or misshapen tensor."""
    config, resident = resident_params_from_gguf(gguf, native)
    per_role = check_layer_shapes(gguf, config)
    layers = LayerParams(**{role: _stack(ts, role, gguf.path, native) for role, ts in per_role.items()})
    return config, LlamaParams(resident.embed, layers, resident.final_norm, resident.output)

"""Sparse llama GGUF files: the decoder's linear weights as Q4CSR arrays, everything else as the dense file has it.

A weight `blk.{i}.{kind}.weight` (kind: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down) becomes five
1-D tensors named `blk.{i}.{kind}.weight.csr_{part}`:

    codes    I8   ((nnz + 1) // 2,)  4-bit codes, two per byte (bit pattern of Q4CSR.packed, uint8)
    cols     I8 / I16 / I32 (nnz,)   column indices, the narrowest type for the weight's width (bit pattern of uint)
    rows     I32  (rows + 1,)        row pointers
    scales   F16  (rows,)            per-row step d
    offsets  F16  (rows,)            per-row offset o

The (rows, cols) shape follows from the llama config. Embeddings, norms and the output head are copied unchanged,
and so is all metadata (tokenizer, chat template, config), with `hyperjax.sparse.*` keys added: `version` (1),
`format` ("q4csr"), `pattern` ("unstructured" or "N:M"), `sparsity` (requested fraction of zeros), `scope` ("row"),
`kinds` (the sparse tensor kinds) and `source` (the dense file's name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from hyperjax.errors import GGUFError, QuantizationError
from hyperjax.io.gguf import GGUFFile, release_pages, write_gguf
from hyperjax.io.llama_gguf import LAYER_TENSORS, host_weight, layer_shapes, resident_params_from_gguf
from hyperjax.kernels.sparse import Q4CSR, from_arrays, index_dtype, stack
from hyperjax.models.llama import LayerParams, LlamaConfig, LlamaParams

PREFIX = "hyperjax.sparse"
VERSION = 1
FORMAT = "q4csr"
SPARSE_ROLES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
KINDS = tuple(LAYER_TENSORS[role].removesuffix(".weight") for role in SPARSE_ROLES)
PARTS = ("codes", "cols", "rows", "scales", "offsets")
_INT_TYPES = {np.dtype(np.uint8): "I8", np.dtype(np.uint16): "I16", np.dtype(np.int32): "I32"}


def is_sparse(gguf: GGUFFile) -> bool:
    """Whether the file carries hyperjax sparse weights (a `hyperjax.sparse.version` key)."""
    return f"{PREFIX}.version" in gguf.metadata


def csr_name(weight_name: str, part: str) -> str:
    """File name of one CSR part of a weight, e.g. ('blk.0.attn_q.weight', 'cols') → 'blk.0.attn_q.weight.csr_cols'."""
    return f"{weight_name}.csr_{part}"


def csr_tensors(weight_name: str, t: Q4CSR) -> dict[str, tuple[str, np.ndarray]]:
    """The five GGUF tensors of an unstacked Q4CSR, as `write_gguf` takes them (integer parts as raw bytes)."""
    if t.indices.ndim != 1 or t.nnz == 0:
        raise QuantizationError(f"'{weight_name}': a sparse file stores unstacked matrices with at least one nonzero")
    cols = np.asarray(t.indices)
    return {
        csr_name(weight_name, "codes"): ("I8", np.asarray(t.packed)),
        csr_name(weight_name, "cols"): (_INT_TYPES[cols.dtype], cols.view(np.uint8)),
        csr_name(weight_name, "rows"): ("I32", np.asarray(t.row_ptr, np.int32).view(np.uint8)),
        csr_name(weight_name, "scales"): ("F16", np.asarray(t.scales)),
        csr_name(weight_name, "offsets"): ("F16", np.asarray(t.offsets)),
    }


def write_sparse_gguf(
    path: str | os.PathLike, source: GGUFFile, sparse: Mapping[str, Q4CSR], info: Mapping[str, Any]
) -> Path:
    """Write `source` with each weight named in `sparse` replaced by its CSR tensors; `info` adds
    `hyperjax.sparse.*` keys (given without the prefix) to the copied metadata. Returns the path."""
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for name, tensor in source.tensors.items():
        if name in sparse:
            tensors |= csr_tensors(name, sparse[name])
        else:
            tensors[name] = (tensor.ggml_type, tensor.data)
    metadata = dict(source.metadata) | {f"{PREFIX}.version": VERSION, f"{PREFIX}.format": FORMAT}
    metadata |= {f"{PREFIX}.{key}": value for key, value in info.items()}
    return write_gguf(path, source.architecture, metadata, tensors)


def _check_header(gguf: GGUFFile) -> None:
    version, fmt = gguf.get(f"{PREFIX}.version"), gguf.get(f"{PREFIX}.format")
    if version != VERSION or fmt != FORMAT:
        raise GGUFError(
            f"{gguf.path}: sparse format {fmt!r} version {version!r} is not supported (reads {FORMAT!r} {VERSION})"
        )
    kinds = gguf.get(f"{PREFIX}.kinds")
    if kinds is None or sorted(kinds) != sorted(KINDS):
        raise GGUFError(f"{gguf.path}: '{PREFIX}.kinds' is {kinds!r}; this version needs all of {list(KINDS)}")


def read_csr(gguf: GGUFFile, weight_name: str, shape: tuple[int, int]) -> Q4CSR:
    """One weight's CSR tensors as a validated Q4CSR (on the device).

    Raises GGUFError for a missing part or one of the wrong type or rank, QuantizationError (naming the file and
    weight) for CSR arrays that are inconsistent: see `hyperjax.kernels.sparse.from_arrays`.
    """
    cols_type = _INT_TYPES[index_dtype(shape[1])]
    expected = {"codes": "I8", "cols": cols_type, "rows": "I32", "scales": "F16", "offsets": "F16"}
    arrays = {}
    for part in PARTS:
        name = csr_name(weight_name, part)
        tensor = gguf.tensors.get(name)
        if tensor is None:
            raise GGUFError(f"{gguf.path}: sparse tensor '{name}' is missing")
        if tensor.ggml_type != expected[part] or len(tensor.shape) != 1:
            raise GGUFError(
                f"{gguf.path}: tensor '{name}' is {tensor.ggml_type} of shape {tensor.shape}; "
                f"expected a 1-D {expected[part]} tensor"
            )
        arrays[part] = tensor.data
    try:
        t = from_arrays(
            arrays["codes"].view(np.uint8),
            arrays["cols"].view(index_dtype(shape[1])),
            arrays["rows"],
            arrays["scales"],
            arrays["offsets"],
            shape,
        )
    except QuantizationError as exc:
        raise QuantizationError(f"{gguf.path}: sparse weight '{weight_name}': {exc}") from exc
    for part in PARTS:
        release_pages(gguf.tensors[csr_name(weight_name, part)])
    return t


def _norms(gguf: GGUFFile, config: LlamaConfig, suffix: str) -> jnp.ndarray:
    rows = []
    for layer in range(config.n_layers):
        name = f"blk.{layer}.{suffix}"
        tensor = gguf.tensors.get(name)
        if tensor is None or tuple(tensor.shape) != (config.dim,):
            found = "missing" if tensor is None else f"of shape {tensor.shape}"
            raise GGUFError(f"{gguf.path}: tensor '{name}' is {found}, expected shape ({config.dim},)")
        rows.append(np.asarray(host_weight(tensor), np.float32))
    return jnp.asarray(np.stack(rows))


def sparse_params_from_gguf(gguf: GGUFFile) -> tuple[LlamaConfig, LlamaParams]:
    """Config and parameters of a sparse llama GGUF: each linear role a layer stack of Q4CSR (`kernels.sparse.stack`
    pads every layer to the role's largest nnz), norms float32, embedding and head as in the dense file."""
    _check_header(gguf)
    config, resident = resident_params_from_gguf(gguf)
    shapes = layer_shapes(config)
    weights: dict[str, Any] = {}
    for role, suffix in LAYER_TENSORS.items():
        if role in SPARSE_ROLES:
            layers = [read_csr(gguf, f"blk.{i}.{suffix}", shapes[role]) for i in range(config.n_layers)]
            weights[role] = stack(layers)
        else:
            weights[role] = _norms(gguf, config, suffix)
    return config, LlamaParams(resident.embed, LayerParams(**weights), resident.final_norm, resident.output)

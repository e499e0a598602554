"""Magnitude pruning of a llama model's decoder linear weights into sparse 4-bit CSR (Q4CSR), and what it costs.

The attention (q, k, v, output) and FFN (gate, up, down) weights of every block are pruned; the token embedding
(tied output head), a separate output head and the norms stay dense. Pruning reads the dense weights dequantized
to float32 and keeps, per row, the largest |w|: a fraction of each row (unstructured) or N of every M consecutive
weights along the input axis (N:M). Row-wise pruning gives every row the same length, so a layer stack runs without
padding (see `kernels.sparse.stack`). The survivors are re-encoded in Q4CSR's per-row sign-magnitude code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from hyperjax.api import load
from hyperjax.errors import HyperjaxError
from hyperjax.evaluate import Perplexity, perplexity
from hyperjax.io.gguf import read_gguf
from hyperjax.io.llama_gguf import (
    SUPPORTED_ARCHITECTURES,
    check_layer_shapes,
    host_weight,
    layer_shapes,
    resident_params_from_gguf,
)
from hyperjax.io.sparse_gguf import KINDS, SPARSE_ROLES, is_sparse, write_sparse_gguf
from hyperjax.kernels.native import NativeWeight
from hyperjax.kernels.quant import QuantizedTensor, dequantize
from hyperjax.kernels.sparse import Q4CSR, from_dense, magnitude_mask, n_m_mask, stack
from hyperjax.models.llama import LayerParams, LlamaConfig, LlamaParams, dequantize_params

UNSTRUCTURED = "unstructured"
KEPT_DENSE = "token embedding (tied output head), output head if separate, RMSNorm weights"
# Characters of held-out text read per requested evaluation token: BPE tokens of English average about 4.
_CHARS_PER_TOKEN = 16


class SparsityError(HyperjaxError, ValueError):
    """A sparsity or N:M pattern is out of range, or a model cannot be pruned."""


@dataclass(frozen=True)
class Sparsity:
    """What to prune: `fraction` of each row by magnitude, or with `n_m` the smallest M − N of every M."""

    fraction: float
    n_m: tuple[int, int] | None = None

    @property
    def pattern(self) -> str:
        return UNSTRUCTURED if self.n_m is None else f"{self.n_m[0]}:{self.n_m[1]}"


def parse_sparsity(sparsity: float | None = None, pattern: str | None = None) -> Sparsity:
    """A `Sparsity` from a fraction in [0, 1) and/or an "N:M" pattern (both given: they must agree)."""
    if pattern is None:
        if sparsity is None:
            raise SparsityError("give a sparsity (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
        if not 0.0 <= sparsity < 1.0:
            raise SparsityError(f"sparsity must lie in [0, 1), got {sparsity}")
        return Sparsity(float(sparsity))
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise SparsityError(f"cannot read pattern {pattern!r}; write N:M, e.g. 2:4") from None
    if not 1 <= n <= m:
        raise SparsityError(f"an N:M pattern needs 1 ≤ N ≤ M, got {pattern}")
    fraction = 1 - n / m
    if sparsity is not None and abs(sparsity - fraction) > 1e-9:
        raise SparsityError(f"pattern {pattern} prunes {fraction:g} of the weights, not the sparsity {sparsity:g}")
    return Sparsity(fraction, (n, m))


def prune(w: np.ndarray, spec: Sparsity) -> Q4CSR:
    """float weights (rows, cols) → Q4CSR of the entries kept by `spec` (row-wise magnitude or N:M)."""
    mask = magnitude_mask(w, spec.fraction, "row") if spec.n_m is None else n_m_mask(w, *spec.n_m)
    return from_dense(w, mask)


def _float32(w: QuantizedTensor | np.ndarray | jax.Array) -> np.ndarray:
    return np.asarray(dequantize(w) if isinstance(w, QuantizedTensor) else w, np.float32)


def sparsify_params(params: LlamaParams, config: LlamaConfig, spec: Sparsity) -> LlamaParams:
    """The same model with every decoder linear weight pruned into a stacked Q4CSR (in memory, no file)."""
    if params.layers is None:
        raise SparsityError("a model streamed under a memory budget cannot be pruned in memory; load it whole")
    roles = {}
    for role in SPARSE_ROLES:
        stacked = getattr(params.layers, role)
        if not isinstance(stacked, QuantizedTensor | NativeWeight | jax.Array | np.ndarray):
            raise SparsityError(f"cannot prune '{role}' of type {type(stacked).__name__}")
        dense = np.asarray(dequantize_params(stacked))  # (layers, rows, cols) float32 from either kernel layout
        roles[role] = stack([prune(np.asarray(w, np.float32), spec) for w in dense])
    return LlamaParams(params.embed, LayerParams(**{**vars(params.layers), **roles}), params.final_norm, params.output)


@dataclass(frozen=True)
class SparsifyReport:
    """Sizes of a sparsified file against its dense source; bytes of the pruned tensors and of whole files."""

    source: Path
    output: Path
    pattern: str
    params: int  # elements of the pruned tensors
    nonzeros: int  # of them kept
    dense_bytes: int  # the pruned tensors as stored in the source (e.g. Q4_1 blocks)
    sparse_bytes: int  # their CSR arrays in the output
    source_file_bytes: int
    file_bytes: int

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzeros / self.params


def sparsify_file(source: str | os.PathLike, output: str | os.PathLike, spec: Sparsity) -> SparsifyReport:
    """Prune the decoder linear weights of the llama GGUF `source` and write a sparse GGUF to `output`."""
    source, output = Path(source), Path(output)
    if source.resolve() == output.resolve():
        raise SparsityError(f"{output}: the output would overwrite the model it is pruned from")
    gguf = read_gguf(source, architectures=SUPPORTED_ARCHITECTURES)
    if is_sparse(gguf):
        raise SparsityError(f"{source} is already sparse; prune its dense source instead")
    config, _ = resident_params_from_gguf(gguf)
    per_role = check_layer_shapes(gguf, config)
    shapes = layer_shapes(config)
    sparse: dict[str, Q4CSR] = {}
    params = dense_bytes = 0
    for role in SPARSE_ROLES:
        for tensor in per_role[role]:
            t = prune(_float32(host_weight(tensor)), spec)
            if t.nnz == 0:
                raise SparsityError(f"{source}: sparsity {spec.fraction:g} leaves no weight in '{tensor.name}'")
            sparse[tensor.name] = t
            params += int(np.prod(shapes[role]))
            dense_bytes += tensor.nbytes
    info = {"pattern": spec.pattern, "sparsity": spec.fraction, "scope": "row", "kinds": list(KINDS)}
    write_sparse_gguf(output, gguf, sparse, {**info, "source": source.name})
    return SparsifyReport(
        source=source,
        output=output,
        pattern=spec.pattern,
        params=params,
        nonzeros=sum(t.nnz for t in sparse.values()),
        dense_bytes=dense_bytes,
        sparse_bytes=sum(t.nbytes for t in sparse.values()),
        source_file_bytes=source.stat().st_size,
        file_bytes=output.stat().st_size,
    )


def default_heldout_path() -> Path:
    """Tiny Shakespeare: $HYPERJAX_SHARED/data/tinyshakespeare.txt, else ../shared/data/ beside the repository."""
    shared = os.environ.get("HYPERJAX_SHARED")
    root = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared"
    return root / "data" / "tinyshakespeare.txt"


def heldout_text(path: str | os.PathLike | None = None, max_tokens: int | None = None) -> str:
    """The last 10 % (by bytes) of a text file, the validation split; with `max_tokens`, only its first
    16 characters per token (enough for that many BPE tokens, and quick to tokenize)."""
    path = Path(path) if path is not None else default_heldout_path()
    if not path.is_file():
        raise SparsityError(f"no held-out text at {path}; pass another file or skip the evaluation")
    data = path.read_bytes()
    text = data[len(data) * 9 // 10 :].decode("utf-8", errors="ignore")
    return text if max_tokens is None else text[: max_tokens * _CHARS_PER_TOKEN]


def compare_perplexity(
    dense: str | os.PathLike, sparse: str | os.PathLike, text: str, max_tokens: int
) -> tuple[Perplexity, Perplexity]:
    """Perplexity of the dense and the sparse model on the same text, over its first `max_tokens` tokens."""
    return tuple(perplexity(load(path), text, max_tokens=max_tokens) for path in (dense, sparse))

"""`hyperjax sparsify`: magnitude and N:M pruning into sparse 4-bit CSR files that load, run and validate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import hyperjax
from hyperjax.cli import app
from hyperjax.errors import GGUFError, QuantizationError
from hyperjax.io.gguf import read_gguf, write_gguf
from hyperjax.io.layer_store import MemoryBudgetError
from hyperjax.io.llama_gguf import host_weight
from hyperjax.io.sparse_gguf import KINDS, csr_name, read_csr
from hyperjax.kernels.quant import dequantize
from hyperjax.kernels.sparse import DENSE_BATCH, from_dense, magnitude_mask, matmul, n_m_mask, spmv, stack, to_dense
from hyperjax.sparsify import SparsityError, parse_sparsity, sparsify_file, sparsify_params

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def sparse_files(tiny_llama_gguf, tmp_path_factory) -> dict[str, Path]:
    """The tiny model sparsified at 0, 0.5 and 0.9 and with 2:4, keyed by the pattern string."""
    out = tmp_path_factory.mktemp("sparse")
    specs = {"0": parse_sparsity(0.0), "0.5": parse_sparsity(0.5), "0.9": parse_sparsity(0.9)}
    specs["2:4"] = parse_sparsity(pattern="2:4")
    return {key: sparsify_file(tiny_llama_gguf, out / f"tiny-{key}.gguf", spec).output for key, spec in specs.items()}


@pytest.fixture(scope="module")
def dense_weights(tiny_llama_gguf) -> dict[str, np.ndarray]:
    """float32 (rows, cols) of every pruned tensor of the dense source, by weight name."""
    gguf = read_gguf(tiny_llama_gguf)
    names = [n for n in gguf.tensors if n.startswith("blk.") and n.split(".")[2] in KINDS]
    return {n: np.asarray(dequantize(host_weight(gguf.tensors[n]))) for n in names}


def _stored(path: Path, name: str, shape: tuple[int, int]):
    return read_csr(read_gguf(path), name, shape)


def _decoded(t) -> np.ndarray:
    """float32 (rows, cols) of a Q4CSR, decoded in numpy straight from the format: code q = 8·sign + m in nibble
    k % 2 of byte k // 2, value (−1)^sign · (o + m·d) with the row's step d and offset o; zeros elsewhere."""
    rows = np.repeat(np.arange(t.shape[0]), np.diff(np.asarray(t.row_ptr)))
    k = np.arange(t.nnz)
    q = (np.asarray(t.packed)[k // 2] >> (4 * (k % 2))) & 0xF
    d, o = np.asarray(t.scales, np.float32)[rows], np.asarray(t.offsets, np.float32)[rows]
    dense = np.zeros(t.shape, np.float32)
    dense[rows, np.asarray(t.indices)] = np.where(q >= 8, -1, 1) * (o + (q & 7) * d)
    return dense


def _kept(t) -> np.ndarray:
    """bool (rows, cols): where a Q4CSR stores a nonzero."""
    kept = np.zeros(t.shape, bool)
    kept[np.repeat(np.arange(t.shape[0]), np.diff(np.asarray(t.row_ptr))), np.asarray(t.indices)] = True
    return kept


def test_sparse_file_loads_generates_and_stays_sparse_in_memory(sparse_files):
    model = hyperjax.load(sparse_files["0.5"])
    result = model.generate("to be", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert len(result.token_ids) == 8
    memory = model.info()["memory"]
    sparse = memory["weights_by_format"]["q4csr"]
    assert sparse["tensors"] == 7 * 2 and sparse["params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64)
    w_down = {"format": "q4csr", "shape": [2, 64, 96], "bytes": model.params.layers.w_down.nbytes}
    assert memory["weights_by_tensor"]["layers.w_down"] == w_down
    sparse_info = model.info()["sparse"]
    assert sparse_info["pattern"] == "unstructured" and sparse_info["kinds"] == list(KINDS)
    assert sparse_info["version"] == 1 and sparse_info["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("n_tokens", [10, 100])  # 10 (bucket 16): sparse windows; 100 (bucket 128): dense GEMM
def test_sparse_forward_equals_its_dense_twin(sparse_files, n_tokens):
    model = hyperjax.load(sparse_files["0.9"])
    ids = model.tokenize(TEXT * 2)[:n_tokens]
    assert len(ids) == n_tokens
    sparse, twin = model.logits(ids), model.to_float32().logits(ids)
    np.testing.assert_allclose(sparse, twin, rtol=1e-4, atol=1e-4 * np.abs(twin).max())


def test_sparsity_zero_only_requantizes(tiny_llama_gguf, sparse_files, dense_weights):
    for name, w in dense_weights.items():
        t = _stored(sparse_files["0"], name, w.shape)
        decoded = _decoded(t)
        assert np.array_equal(_kept(t), w != 0)  # nothing pruned but exact zeros
        half_step = np.asarray(t.scales, np.float32)[:, None] / 2
        assert np.all(np.abs(decoded - w) <= half_step * (1 + 1e-3) + 1e-7)
    np.testing.assert_array_equal(decoded, np.asarray(to_dense(t)))  # the kernel's decoder agrees with the format
    # The logits move only by the 8-level per-row code's rounding, far less than when 90 % of the weights go.
    dense = hyperjax.load(tiny_llama_gguf)
    ids = dense.tokenize(TEXT)
    reference = dense.logits(ids)
    errors = [np.linalg.norm(hyperjax.load(sparse_files[k]).logits(ids) - reference) for k in ("0", "0.9")]
    assert errors[0] < 0.6 * np.linalg.norm(reference) and errors[0] < errors[1]


@pytest.mark.parametrize("key", ["0.5", "0.9", "2:4"])
def test_pruned_tensors_have_the_requested_pattern_exactly(sparse_files, dense_weights, key):
    for name, w in dense_weights.items():
        kept = _kept(_stored(sparse_files[key], name, w.shape))
        if key == "2:4":
            expected = n_m_mask(w, 2, 4)
            assert kept.reshape(w.shape[0], -1, 4).sum(-1).max() <= 2
        else:
            expected = magnitude_mask(w, float(key))
            assert np.all(expected.sum(1) == w.shape[1] - round(float(key) * w.shape[1]))
        assert np.array_equal(kept, expected & (w != 0)), name


def test_sparse_file_is_smaller_at_high_sparsity(tiny_llama_gguf, tmp_path):
    report = sparsify_file(tiny_llama_gguf, tmp_path / "s.gguf", parse_sparsity(0.9))
    assert report.file_bytes == report.output.stat().st_size < report.source_file_bytes
    assert report.sparse_bytes < report.dense_bytes
    assert report.sparsity == pytest.approx(0.9, abs=0.01)
    stored = read_gguf(report.output)
    csr_bytes = sum(t.nbytes for n, t in stored.tensors.items() if ".csr_" in n)
    assert csr_bytes == report.sparse_bytes


def _rewrite(src: Path, dst: Path, name: str, change) -> Path:
    """Copy a GGUF with tensor `name` replaced by change(type, array) → (type, array) (or dropped if None)."""
    gguf = read_gguf(src)
    tensors = {}
    for n, t in gguf.tensors.items():
        entry = (t.ggml_type, np.array(t.data))
        if n == name:
            entry = change(*entry)
            if entry is None:
                continue
        ggml_type, data = entry
        tensors[n] = (ggml_type, data if ggml_type.startswith("F") else data.view(np.uint8))
    return write_gguf(dst, "llama", gguf.metadata, tensors)


def _col_out_of_range(ggml_type, cols):
    cols[3] = 64
    return ggml_type, cols


def _row_ptr_decreasing(ggml_type, rows):
    rows[2] = rows[1] - 1
    return ggml_type, rows


@pytest.mark.parametrize(
    ("part", "change", "error", "message"),
    [
        ("cols", _col_out_of_range, QuantizationError, r"column index 64 in row 0 is outside 0\.\.63"),
        ("rows", _row_ptr_decreasing, QuantizationError, r"row_ptr decreases"),
        ("cols", lambda t, a: ("I32", a.astype(np.int32)), GGUFError, r"is I32 .* expected a 1-D I8 tensor"),
        ("scales", lambda t, a: None, GGUFError, r"'blk\.0\.attn_q\.weight\.csr_scales' is missing"),
    ],
)
def test_corrupt_sparse_file_is_rejected_with_a_named_error(sparse_files, tmp_path, part, change, error, message):
    bad = _rewrite(sparse_files["0.5"], tmp_path / "bad.gguf", csr_name("blk.0.attn_q.weight", part), change)
    with pytest.raises(error, match=message) as info:
        hyperjax.load(bad)
    assert "bad.gguf" in str(info.value)


def test_unknown_sparse_version_and_memory_budget_are_refused(sparse_files, tmp_path):
    gguf = read_gguf(sparse_files["0.9"])
    tensors = {n: (t.ggml_type, t.data if t.ggml_type.startswith(("F", "Q")) else t.data.view(np.uint8))
               for n, t in gguf.tensors.items()}  # fmt: skip
    future = write_gguf(tmp_path / "v2.gguf", "llama", gguf.metadata | {"hyperjax.sparse.version": 2}, tensors)
    with pytest.raises(GGUFError, match="version 2 is not supported"):
        hyperjax.load(future)
    with pytest.raises(MemoryBudgetError, match="sparse model loads whole"):
        hyperjax.load(sparse_files["0.9"], memory_budget="64MB")
    with pytest.raises(SparsityError, match="already sparse"):
        sparsify_file(sparse_files["0.9"], tmp_path / "again.gguf", parse_sparsity(0.5))


@pytest.mark.parametrize(
    ("sparsity", "pattern", "message"),
    [(None, None, "give a sparsity"), (1.0, None, r"\[0, 1\)"), (None, "2-4", "write N:M"),
     (None, "5:4", "1 ≤ N ≤ M"), (0.9, "2:4", "prunes 0.5")],
)  # fmt: skip
def test_parse_sparsity_errors(sparsity, pattern, message):
    with pytest.raises(SparsityError, match=message):
        parse_sparsity(sparsity, pattern)


def test_stack_pads_layers_and_every_slice_computes_its_own_matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 24, 40)).astype(np.float32)
    # Unequal nnz and uneven rows: unstructured, global-scope and N:M layers in one stack.
    layers = [
        from_dense(w[0], magnitude_mask(w[0], 0.3)),
        from_dense(w[1], magnitude_mask(w[1], 0.9, "global")),
        from_dense(w[2], n_m_mask(w[2], 1, 4)),
    ]
    stacked = stack(layers)
    assert stacked.indices.shape == (3, max(t.nnz for t in layers)) and stacked.windows == 24
    x = jnp.asarray(rng.standard_normal((80, 40)), jnp.float32)

    @jax.jit
    def run(t, i, x):
        layer = jax.tree.map(lambda leaf: leaf[i], t)
        return to_dense(layer), spmv(x[0], layer), matmul(x[:4], layer), matmul(x, layer)

    assert x.shape[0] > DENSE_BATCH  # the last product takes the dense GEMM path
    for i, t in enumerate(layers):
        dense, y1, y4, y80 = run(stacked, i, x)
        expected = np.asarray(to_dense(t))
        np.testing.assert_array_equal(np.asarray(dense), expected)
        for y, rows in ((y1, x[:1]), (y4, x[:4]), (y80, x)):
            np.testing.assert_allclose(np.asarray(y).reshape(-1, 24), np.asarray(rows) @ expected.T, atol=1e-4)
    assert matmul(x.reshape(4, 20, 40), layers[0]).shape == (4, 20, 24)
    with pytest.raises(QuantizationError, match="one shape"):
        stack([layers[0], from_dense(w[0][:, :20])])


def test_cli_sparsify_reports_sizes_and_perplexity_then_generate_runs_the_file(tiny_llama_gguf, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    out = tmp_path / "tiny-sparse.gguf"
    args = ["sparsify", str(tiny_llama_gguf), "-o", str(out), "--pattern", "2:4"]
    result = CliRunner().invoke(app, [*args, "--eval-text", str(text), "--eval-tokens", "32"])
    assert result.exit_code == 0, result.output
    assert "pruned tensors" in result.output and "whole file" in result.output and "kept dense" in result.output
    assert "perplexity on the held-out text (31 tokens): dense int4" in result.output
    quiet = CliRunner().invoke(app, [*args, "--no-eval"])
    assert quiet.exit_code == 0 and "perplexity" not in quiet.output
    env = dict(os.environ, HYPERJAX_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "hyperjax", "generate", "to be", "--model", str(out), "-n", "4", "--stats"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "generated 4 tok" in proc.stderr and "q4csr" in proc.stderr


def test_sparsify_params_in_memory_matches_the_file(tiny_llama_gguf, sparse_files):
    dense, from_file = hyperjax.load(tiny_llama_gguf), hyperjax.load(sparse_files["2:4"])
    in_memory = sparsify_params(dense.params, dense.config, parse_sparsity(pattern="2:4"))
    for role in ("wq", "w_down"):
        a, b = getattr(in_memory.layers, role), getattr(from_file.params.layers, role)
        assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))

"""`hyperjax quantize` and `hyperjax generate` on trained byte models."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from hyperjax.cli import app
from hyperjax.errors import CheckpointError
from hyperjax.kernels.quant import QuantizedTensor
from hyperjax.train import artifacts


def test_quantize_roundtrip_keeps_structure_and_bits_per_byte(full_run, tmp_path):
    model, params, meta = artifacts.load_run(full_run)
    assert meta["step"] in (4, 8)
    flat = artifacts.quantize_params(params, "q4_0")
    quantized = [k for k, v in flat.items() if isinstance(v, QuantizedTensor)]
    assert "blocks/0/attn/qkv/kernel" in quantized and "embed/embedding" not in quantized
    assert artifacts.quantized_bytes(flat) < 0.5 * artifacts.float_bytes(params)
    artifacts.save_quantized(tmp_path / "q", flat, meta)
    loaded_model, loaded, _ = artifacts.load_quantized(tmp_path / "q")
    assert loaded_model.config == model.config
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(loaded), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.2 * scale + 1e-7, err_msg=str(path))
    before = artifacts.val_bits_per_byte(model, params, meta)
    after = artifacts.val_bits_per_byte(loaded_model, loaded, meta)
    assert before == pytest.approx(meta["val_bpb"], rel=1e-5) and abs(after - before) < 0.25


def test_cli_quantize_then_generate_from_run_and_quantized(full_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "int4"
    result = runner.invoke(app, ["quantize", str(full_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "bits/byte" in result.output and (out / "weights.npz").is_file()
    for model in (full_run, out):
        result = runner.invoke(app, ["generate", "ROMEO:", "--model", str(model), "-n", "8", "--temperature", "0"])
        assert result.exit_code == 0, result.output
        assert "generated 8 bytes" in result.output


def test_not_a_run_is_a_named_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        artifacts.load_run(tmp_path)
    (tmp_path / "quantized.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a readable quantized"):
        artifacts.load_quantized(tmp_path)

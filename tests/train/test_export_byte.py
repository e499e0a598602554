"""A trained byte model through `hyperjax export` and the lean runner: greedy output equals the library's."""

from __future__ import annotations

import json

import pytest

from hyperjax.export import ExportError, export_model
from hyperjax.generate import generate_tokens
from hyperjax.kernels.sampling import SamplingConfig
from hyperjax.models.byte_decoder import encode_text
from hyperjax.runner.cli import main, run
from hyperjax.runner.format import read_manifest
from hyperjax.train import artifacts, load_config, train
from tests.train.conftest import tiny_options

PROMPT = "ROMEO: é"  # a two-byte character: the runner's tokens are raw bytes


def library_greedy(run_dir, max_tokens: int) -> list[int]:
    model, params, _ = artifacts.load_byte_model(run_dir)
    decoder = artifacts.decoder(model, params)
    greedy = SamplingConfig(temperature=0.0)
    return generate_tokens(decoder, encode_text(PROMPT), max_new_tokens=max_tokens, sampling=greedy).token_ids


def runner_greedy(directory, capsys, max_tokens: int) -> list[int]:
    capsys.readouterr()
    assert run([str(directory), PROMPT, "--temperature", "0", "-n", str(max_tokens), "--stats-json"]) == 0
    return json.loads(capsys.readouterr().err.strip().splitlines()[-1])["token_ids"]


@pytest.fixture(scope="module")
def rnn_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("rnn")
    options = tiny_options(corpus, out, model="rnn", model_options={"hidden_dim": 32}, steps=4, optimizer="adamw")
    train(load_config(**options), progress=False)
    return out


@pytest.mark.parametrize("target", ["jax", "iree"])
def test_transformer_run_exports_and_runs_like_the_library(full_run, tmp_path, capsys, target):
    if target == "iree":
        pytest.importorskip("iree.compiler")
    out = tmp_path / "export"
    manifest = export_model(full_run, out, max_context=32, target=target)
    assert manifest["model"]["kind"] == "transformer" and manifest["tokenizer"]["kind"] == "bytes"
    assert "tokenizer.json" not in manifest["files"] and not (out / "tokenizer.json").exists()
    assert len(read_manifest(out)["cache"]["leaves"]) == 2  # keys and values
    assert runner_greedy(out, capsys, 12) == library_greedy(full_run, 12)


def test_rnn_run_and_quantized_model_export(rnn_run, tmp_path, capsys):
    out = tmp_path / "export"
    manifest = export_model(rnn_run, out, max_context=64)
    assert manifest["model"]["kind"] == "rnn" and manifest["cache"]["update"] == "in_graph"
    assert runner_greedy(out, capsys, 12) == library_greedy(rnn_run, 12)
    _, params, meta = artifacts.load_run(rnn_run)
    quantized = artifacts.save_quantized(tmp_path / "q", artifacts.quantize_params(params), meta)
    export_model(quantized, tmp_path / "qexport", max_context=64)  # int4 blocks, exported dequantized
    assert runner_greedy(tmp_path / "qexport", capsys, 12) == library_greedy(quantized, 12)


def test_byte_export_refuses_chat(full_run, tmp_path, capsys):
    out = tmp_path / "export"
    export_model(full_run, out, max_context=32)
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), PROMPT, "--chat"])
    assert exit_info.value.code == 1 and "no chat template" in capsys.readouterr().err
    with pytest.raises(ExportError, match="max context"):
        export_model(full_run, tmp_path / "too-long", max_context=64)  # the transformer has 32 positions

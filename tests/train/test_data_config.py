"""Data loading, splitting and batch order; config files and flags."""

from __future__ import annotations

import numpy as np
import pytest

from hyperjax.errors import DataError, TrainConfigError
from hyperjax.train.config import load_config, model_config
from hyperjax.train.data import load_bytes, split, train_batch, val_batches


def test_text_and_npy_load_as_the_same_memory_mapped_bytes(corpus, tmp_path):
    text = load_bytes(corpus)
    array_path = tmp_path / "corpus.npy"
    np.save(array_path, np.frombuffer(corpus.read_bytes(), np.uint8))
    array = load_bytes(array_path)
    assert isinstance(text, np.memmap) and isinstance(array, np.memmap)
    assert text.dtype == array.dtype == np.uint8 and np.array_equal(text, array)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", b"", "empty"),
        ("wide.npy", np.zeros(10, np.int32), "1-D uint8"),
        ("broken.npy", b"not an array", "not a readable .npy"),
    ],
)
def test_bad_data_is_a_named_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_bytes(path)


def test_split_keeps_the_last_tenth_for_validation_and_refuses_short_data():
    data = np.arange(100, dtype=np.uint8)
    train, val = split(data, window=5)
    assert np.array_equal(train, data[:90]) and np.array_equal(val, data[90:])
    with pytest.raises(DataError, match="window of 33"):
        split(data, window=33)


def test_batches_are_a_function_of_seed_and_step(corpus):
    data = load_bytes(corpus)
    a = train_batch(data, seed=1, step=7, accum=2, batch=3, window=9)
    assert a.shape == (2, 3, 9) and a.dtype == np.int32
    assert np.array_equal(a, train_batch(data, seed=1, step=7, accum=2, batch=3, window=9))
    assert not np.array_equal(a, train_batch(data, seed=1, step=8, accum=2, batch=3, window=9))
    assert not np.array_equal(a, train_batch(data, seed=2, step=7, accum=2, batch=3, window=9))
    text = bytes(a[1, 2].astype(np.uint8))
    assert text in corpus.read_bytes()


def test_validation_windows_do_not_overlap():
    data = np.arange(200, dtype=np.uint8)
    batches = val_batches(data, n_batches=3, batch=2, window=10)
    assert batches.shape == (3, 2, 10)
    assert np.array_equal(batches.reshape(-1), np.arange(60))


def test_toml_file_with_flags_on_top(tmp_path, corpus):
    path = tmp_path / "run.toml"
    path.write_text(f'data = "{corpus}"\nmodel = "rnn"\nsteps = 50\n[model_options]\nhidden_dim = 64\ncell = "lstm"\n')
    config = load_config(path, steps=7, lr=None, model_options={"n_layers": 1})
    assert (config.model, config.steps, config.lr) == ("rnn", 7, 1e-3)
    assert dict(config.model_options) == {"hidden_dim": 64, "cell": "lstm", "n_layers": 1}
    assert model_config(config.model, config.context, config.model_options).cell == "lstm"


@pytest.mark.parametrize(
    ("toml", "overrides", "message"),
    [
        ("steps = [", {}, "not valid TOML"),
        ("stepz = 3", {}, "unknown training option"),
        ("", {"optimizer": "lion"}, "optimizer = 'lion'"),
        ("", {"batch_size": 0}, "batch_size"),
        ("", {"data": ""}, "no training data"),
    ],
)
def test_bad_configs_are_named_errors(tmp_path, corpus, toml, overrides, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(TrainConfigError, match=message):
        load_config(path, **({"data": str(corpus)} | overrides))


def test_missing_config_file_and_bad_model_options(tmp_path):
    with pytest.raises(TrainConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(TrainConfigError, match="unknown transformer option"):
        model_config("transformer", 32, {"width": 3})
    with pytest.raises(TrainConfigError, match="invalid rnn options"):
        model_config("rnn", 32, {"cell": "tanh"})


def test_model_option_flags_parse_as_toml_values():
    from hyperjax.train.command import _model_options

    parsed = _model_options(["dim=32", "cell=lstm", "ngram_sizes=[3, 4]", "patch_threshold = 2.5"])
    assert parsed == {"dim": 32, "cell": "lstm", "ngram_sizes": [3, 4], "patch_threshold": 2.5}
    with pytest.raises(TrainConfigError, match="KEY=VALUE"):
        _model_options(["dim"])

"""The training loop in process: exact resume, unreadable checkpoints skipped, NaN steps skipped, JSONL metrics."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from hyperjax.errors import CheckpointError
from hyperjax.train import checkpoint, load_config, metrics, train
from hyperjax.train.data import load_bytes, split, train_batch
from hyperjax.train.loop import abstract_state
from hyperjax.train.model import byte_model
from hyperjax.train.parallel import data_mesh, replicated
from hyperjax.train.step import make_optimizer, make_train_step
from tests.train.conftest import tiny_options


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if r["kind"] == "train"}


def _truncate_files(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_resume_reproduces_the_uninterrupted_losses_and_skips_an_unreadable_step(full_run, corpus, tmp_path, caplog):
    resumed = tmp_path / "resumed"
    shutil.copytree(full_run / "checkpoints", resumed / "checkpoints")
    (resumed / "metrics.jsonl").write_text((full_run / "metrics.jsonl").read_text())
    _truncate_files(resumed / "checkpoints" / "8")  # step 8 listed but corrupted: resume from 4
    with caplog.at_level(logging.WARNING, logger="hyperjax.train"):
        train(load_config(**tiny_options(corpus, resumed)), resume=True, progress=False)
    assert "checkpoint step 8" in caplog.text and "unreadable" in caplog.text
    full, again = _losses(full_run), _losses(resumed)
    assert list(again) == list(range(1, 9))
    assert again == full  # bit-equal floats: same data order, same Q-controller state and exploration key


def test_every_checkpoint_unreadable_is_a_named_error(full_run, tmp_path, corpus):
    broken = tmp_path / "broken"
    shutil.copytree(full_run / "checkpoints", broken / "checkpoints")
    for step in ("4", "8"):
        _truncate_files(broken / "checkpoints" / step)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        train(load_config(**tiny_options(corpus, broken)), resume=True, progress=False)


def test_existing_checkpoints_need_resume_and_matching_options(full_run, tmp_path, corpus):
    with pytest.raises(CheckpointError, match="--resume"):
        train(load_config(**tiny_options(corpus, full_run)), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(full_run / "checkpoints", copy / "checkpoints")
    with pytest.raises(CheckpointError, match="batch_size"):
        train(load_config(**tiny_options(corpus, copy, batch_size=8, steps=9)), resume=True, progress=False)


def test_metrics_jsonl_has_train_and_validation_records(full_run):
    records = metrics(full_run)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    for r in train_records:
        assert {"loss", "bpb", "grad_norm", "lr", "momentum", "skipped_steps", "bytes_per_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["bpb"] == pytest.approx(r["loss"] / np.log(2))
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [4, 8] and all(0 < r["val_bpb"] < 9 for r in val)
    assert len({r["lr"] for r in train_records}) > 1  # the Q-controller moves the learning rate


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("hakmem", {"dim": 32, "global_dim": 32, "n_global_layers": 1, "n_decoder_layers": 1, "ngram_table": 256}),
        ("rnn", {"embed_dim": 16, "hidden_dim": 32, "n_layers": 1, "cell": "lstm"}),
    ],
)
def test_other_models_trace_through_the_same_step(corpus, tmp_path, name, options):
    """HAKMEM and the RNN take the transformer's path (compiling them is too slow for this suite): the train step
    traces to a new state of the same structure and a scalar loss."""
    config = load_config(**tiny_options(corpus, tmp_path, model=name, model_options=options))
    model = byte_model(config.model, config.context, config.model_options)
    state = abstract_state(model, config, replicated(data_mesh()))
    step = make_train_step(model.loss, make_optimizer(config))
    new_state, out = jax.eval_shape(step, state, jax.ShapeDtypeStruct((2, 4, 33), np.int32))
    assert jax.tree.structure(new_state) == jax.tree.structure(state) and out["loss"].shape == ()


def test_nonfinite_steps_are_skipped_inside_the_loop(corpus, tmp_path):
    """Byte 255 is given a NaN embedding; exactly the steps whose batch holds it are skipped, params unchanged."""
    data = bytearray(corpus.read_bytes())
    data[::300] = b"\xff" * len(data[::300])
    poisoned = tmp_path / "poisoned.txt"
    poisoned.write_bytes(bytes(data))
    opts = tiny_options(poisoned, tmp_path / "run", save_every=1, keep=20)
    config = load_config(**opts | {"steps": 1})
    train(config, progress=False)

    model = byte_model(config.model, config.context, config.model_options)
    target = abstract_state(model, config, replicated(data_mesh()))
    manager = checkpoint.open_manager(config.out)
    _, state, meta = checkpoint.restore(manager, target)
    params = jax.tree.map(np.array, state.params)
    params["embed"]["embedding"][255] = np.nan
    manager.delete(1)
    checkpoint.save(manager, state._replace(params=params), meta, meta["val_loss"])
    manager.wait_until_finished()
    manager.close()

    train(load_config(**opts), resume=True, progress=False)
    train_data, _ = split(load_bytes(poisoned), config.context + 1)
    holds_255 = [bool((train_batch(train_data, config.seed, s, 2, 4, 33) == 255).any()) for s in range(1, 8)]
    assert any(holds_255) and not all(holds_255)
    skipped = {r["step"]: r["skipped_steps"] for r in metrics(config.out) if r["kind"] == "train"}
    assert [skipped[s] for s in range(2, 9)] == list(np.cumsum(holds_255))

    manager = checkpoint.open_manager(config.out, read_only=True)
    by_step = {s: checkpoint.restore_step(manager, s, target)[0].params for s in manager.all_steps()}
    for s, bad in zip(range(2, 9), holds_255, strict=True):
        same = jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True), by_step[s - 1], by_step[s]))
        assert same == bad, f"step {s}: skipped={bad} but params unchanged={same}"

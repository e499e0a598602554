"""Data parallelism: 8 emulated CPU devices, and two processes of 2 devices each joined by jax.distributed, give the
losses of one device; a checkpoint saved on 8 devices restores on one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from hyperjax.train import checkpoint, load_config, metrics, train
from hyperjax.train.loop import abstract_state
from hyperjax.train.model import byte_model
from hyperjax.train.parallel import data_mesh, replicated
from tests.train.conftest import tiny_options, write_toml

EIGHT_DEVICES = """
import json, sys
import jax
import numpy as np
import pytest
from hyperjax.train import load_config, train
from hyperjax.train.parallel import batch_sharding, data_mesh, put_batch
assert len(jax.devices()) == 8, jax.devices()
shards = put_batch(np.zeros((2, 8, 33), np.int32), batch_sharding(data_mesh())).addressable_shards
assert sorted(s.data.shape for s in shards) == [(2, 1, 33)] * 8
state = train(load_config(**json.loads(sys.argv[1])), progress=False)
assert len(state.params["embed"]["embedding"].sharding.device_set) == 8
"""


OPTIONS = {"batch_size": 8, "steps": 4, "optimizer": "adamw", "lr": 3e-3, "schedule": "constant"}


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> tuple[Path, Any]:
    """(run directory, final state) of the one-device reference run."""
    out = tmp_path_factory.mktemp("one")
    state = train(load_config(**tiny_options(corpus, out, **OPTIONS)), progress=False)
    assert len(jax.devices()) == 1
    return out, state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(corpus, tmp_path, single):
    out = tmp_path / "two"
    config = write_toml(tmp_path / "two.toml", tiny_options(corpus, out, **OPTIONS))
    env = os.environ | {"JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu", "HYPERJAX_XLA_CACHE": str(tmp_path / "x")}
    command = [sys.executable, "-m", "hyperjax", "train", "--config", str(config), "--no-progress"]
    command += ["--coordinator", f"localhost:{_free_port()}", "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen([*command, str(i)], env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    np.testing.assert_allclose(_losses(out), _losses(single[0]), rtol=2e-5)
    assert (out / "checkpoints" / "4").is_dir()


def test_eight_devices_match_one_and_their_checkpoint_restores_on_one(corpus, tmp_path, single):
    sharded = tiny_options(corpus, tmp_path / "eight", **OPTIONS)
    env = os.environ | {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, json.dumps(sharded)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(single[0]), rtol=2e-5)

    config = load_config(**sharded)
    model = byte_model(config.model, config.context, config.model_options)
    manager = checkpoint.open_manager(config.out, read_only=True)
    step, restored, _ = checkpoint.restore(manager, abstract_state(model, config, replicated(data_mesh())))
    assert step == 4
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(single[1].params), strict=True):
        assert a.sharding.device_set == b.sharding.device_set
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    train(load_config(**sharded | {"steps": 5}), resume=True, progress=False)
    assert [r["step"] for r in metrics(config.out) if r["kind"] == "train"] == [1, 2, 3, 4, 5]

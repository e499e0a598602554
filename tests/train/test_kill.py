"""`hyperjax train` killed with SIGKILL at random moments, then resumed: same losses as an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from hyperjax.train import load_config, metrics, train
from tests.train.conftest import tiny_options, write_toml


def _options(corpus: Path, out: Path) -> dict:
    return tiny_options(corpus, out, steps=24, eval_every=3, save_every=3, keep=2)


def _train(config: Path, env: dict[str, str], resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "hyperjax", "train", "--config", str(config), "--no-progress"]
    return subprocess.Popen(
        [*args, *(["--resume"] if resume else [])], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_then_resume_matches_the_uninterrupted_run(corpus, tmp_path):
    env = os.environ | {"HYPERJAX_XLA_CACHE": str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu"}
    full = tmp_path / "full"
    train(load_config(**_options(corpus, full)), progress=False)  # in process: the same programs as a subprocess's

    killed = tmp_path / "killed"
    config = write_toml(tmp_path / "killed.toml", _options(corpus, killed))
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = _train(config, env, resume=True)
        seen = _lines(killed / "metrics.jsonl")
        deadline = time.monotonic() + 120
        while proc.poll() is None and _lines(killed / "metrics.jsonl") <= seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # a random moment of training: a step, a save, a validation pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
    assert kills >= 1
    last = _train(config, env, resume=True)
    _, err = last.communicate(timeout=240)
    assert last.returncode == 0, err

    def losses(out: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in metrics(out) if r["kind"] == "train"]

    assert losses(killed) == losses(full) and len(losses(full)) == 24
    final = metrics(killed)[-1]
    assert final["kind"] == "val" and final["step"] == 24
    assert not [p for p in (killed / "checkpoints").iterdir() if "tmp" in p.name]

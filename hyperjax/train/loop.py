"""The training loop: data, model and optimizer from a `TrainConfig`, jitted steps, validation, checkpoints, JSONL.

Resuming restores the newest readable checkpoint (params, optimizer state with the Q-controller's table and key,
step); since batches are a function of (seed, step) and the steps are deterministic, the losses after a resume are
those of the uninterrupted run. Metric lines of steps after the restored one (written by the interrupted process)
are dropped from `metrics.jsonl`, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hyperjax.errors import CheckpointError
from hyperjax.train import checkpoint
from hyperjax.train.config import RESUME_FIELDS, TrainConfig
from hyperjax.train.data import load_bytes, split, train_batch, val_batches
from hyperjax.train.model import ByteModel, byte_model
from hyperjax.train.parallel import batch_sharding, check_batch, data_mesh, put_batch, replicated, to_host
from hyperjax.train.step import TrainState, init_state, make_eval_step, make_optimizer, make_train_step

log = logging.getLogger("hyperjax.train")
FORMAT = "hyperjax-train/1"
METRICS_FILE = "metrics.jsonl"


def abstract_state(model: ByteModel, config: TrainConfig, sharding: jax.sharding.Sharding) -> TrainState:
    """Shapes, dtypes and shardings of the `TrainState` of (model, config), for restoring into."""
    shapes = jax.eval_shape(lambda: init_state(model.init_params(config.seed), make_optimizer(config)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


class Programs(NamedTuple):
    """The jitted functions of a run: `init(seed) → state`, `step(state, batch)`, `evaluate(params, batches)`."""

    init: Callable[[int], TrainState]
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[Any, jax.Array], jax.Array]


_PROGRAMS: dict[str, Programs] = {}


def programs(model: ByteModel, config: TrainConfig, mesh: jax.sharding.Mesh) -> Programs:
    """The run's jitted functions, shared by every run in this process with the same model, optimizer and devices
    (so that a resume or a second run in one process compiles nothing)."""
    decays = config.optimizer in ("adamw", "sgd") and config.schedule == "cosine"
    fields = {k: config.to_dict()[k] for k in (*RESUME_FIELDS, *(["steps"] if decays else []))}
    key = json.dumps([model.name, model.config_dict(), fields, [d.id for d in mesh.devices.flat]], sort_keys=True)
    if key not in _PROGRAMS:
        repl, batch_sh = replicated(mesh), batch_sharding(mesh)
        optimizer = make_optimizer(config)
        _PROGRAMS[key] = Programs(
            init=jax.jit(lambda seed: init_state(model.init_params(seed), optimizer), out_shardings=repl),
            step=jax.jit(
                make_train_step(model.loss, optimizer),
                in_shardings=(repl, batch_sh),
                out_shardings=repl,
                donate_argnums=0,
            ),
            evaluate=jax.jit(make_eval_step(model.loss), in_shardings=(repl, batch_sh), out_shardings=repl),
        )
    return _PROGRAMS[key]


def _check_resumable(meta: dict[str, Any], config: TrainConfig, directory: Path) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a hyperjax training checkpoint (format {meta.get('format')!r})")
    saved, current = meta["train_config"], json.loads(json.dumps(config.to_dict()))
    changed = [k for k in RESUME_FIELDS if saved.get(k) != current[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} → {current[k]!r}" for k in changed)
        raise CheckpointError(f"cannot resume {directory} with different options ({diffs})")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL records of `path`, a line torn by a killed writer (only ever the last) left out."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the JSONL records of steps ≤ `step`."""
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in _read_records(path) if r["step"] <= step))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainState:
    """Train the configured byte model, writing checkpoints and `metrics.jsonl` under `config.out`.

    resume: continue from the newest readable checkpoint in `config.out` (start afresh when there is none); without
    it, a directory that already holds checkpoints is refused. Returns the final state (replicated over the devices)."""
    out = Path(config.out)
    window = config.context + 1
    train_data, val_data = split(load_bytes(config.data), window, config.val_fraction)
    mesh = data_mesh()
    check_batch(config.batch_size, mesh)
    repl, batch_sh = replicated(mesh), batch_sharding(mesh)
    model = byte_model(config.model, config.context, config.model_options)
    run = programs(model, config, mesh)

    out.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.open_manager(out, config.keep)
    restored, last_val = None, float("nan")
    if resume:
        restored = checkpoint.restore(manager, abstract_state(model, config, repl))
    elif manager.all_steps():
        raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    if restored is None:
        state = run.init(config.seed)
    else:
        step, state, meta = restored
        _check_resumable(meta, config, out)
        last_val = meta["val_bpb"]
        for later in [s for s in manager.all_steps() if s > step]:  # unreadable ones: the resumed run rewrites them
            manager.delete(later)
        log.info("resuming from step %d of %s", step, manager.directory)
    start = int(to_host(state.step))
    primary = jax.process_index() == 0  # in a multi-process run, process 0 alone writes metrics and shows progress
    metrics_path = out / METRICS_FILE
    if primary:
        _truncate_metrics(metrics_path, start)

    val = put_batch(val_batches(val_data, config.eval_batches, config.batch_size, window), batch_sh)
    bytes_per_step = config.accum * config.batch_size * config.context
    header = {"model": model.name, "model_config": model.config_dict(), "train_config": config.to_dict()}

    def record(rec: dict[str, Any], sink: Any) -> None:
        if primary:
            sink.write(json.dumps(rec) + "\n")
            sink.flush()

    sink_context = metrics_path.open("a") if primary else contextlib.nullcontext()
    with sink_context as sink, _progress(progress and primary) as bar:
        task = bar.add_task("train", total=config.steps, completed=start, status="")
        t0 = time.perf_counter()
        for s in range(start + 1, config.steps + 1):
            host_batch = train_batch(train_data, config.seed, s - 1, config.accum, config.batch_size, window)
            batch = put_batch(host_batch, batch_sh)
            state, step_metrics = run.step(state, batch)
            last = s == config.steps
            if s % config.log_every == 0 or last:
                m = {k: v.item() for k, v in to_host(step_metrics).items()}
                elapsed = time.perf_counter() - t0
                rec = {"kind": "train", "step": s, **m, "bpb": m["loss"] / math.log(2), "elapsed_s": elapsed}
                rec["bytes_per_s"] = (s - start) * bytes_per_step / max(elapsed, 1e-9)
                record(rec, sink)
                bar.update(task, status=f"loss {m['loss']:.3f} · {rec['bpb']:.3f} bpb · val {last_val:.3f} bpb")
            saving = s % config.save_every == 0 or last
            if s % config.eval_every == 0 or saving:
                val_loss = float(to_host(run.evaluate(state.params, val)))
                last_val = val_loss / math.log(2)
                record({"kind": "val", "step": s, "val_loss": val_loss, "val_bpb": last_val}, sink)
            if saving:
                meta = {"format": FORMAT, **header, "step": s, "val_loss": val_loss, "val_bpb": last_val}
                checkpoint.save(manager, state, meta, val_loss)
            bar.update(task, completed=s)
    manager.wait_until_finished()
    manager.close()
    return state


def metrics(out: str | Path) -> list[dict[str, Any]]:
    """The records of `out`/metrics.jsonl, in order."""
    return _read_records(Path(out) / METRICS_FILE)

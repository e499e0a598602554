"""Checkpoints with orbax: async saves, the last N kept plus the best by validation loss, atomic steps.

A step directory holds `state` (the `TrainState` pytree) and `meta` (JSON: the training config, the model config,
the step and its validation loss). Orbax writes each step into a temporary directory and renames it when complete,
so a process killed mid-save leaves no half step behind; a step that is listed but cannot be read (truncated or
corrupted files) is reported and skipped for the newest readable one before it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from hyperjax.errors import CheckpointError

log = logging.getLogger("hyperjax.train")


def open_manager(directory: str | Path, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Manager of `directory`/checkpoints keeping the `keep` newest steps and the one of least validation loss."""
    policy = AnyPreservationPolicy(
        [
            LatestN(n=keep),
            BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(Path(directory).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, state: Any, meta: dict[str, Any], val_loss: float) -> None:
    """Start an async save of step `state.step` (returns before the files are written)."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, metrics={"val_loss": float(val_loss)})


def _candidates(manager: ocp.CheckpointManager, best_first: bool) -> list[int]:
    steps = sorted(manager.all_steps(), reverse=True)
    best = manager.best_step() if best_first else None
    return [best, *[s for s in steps if s != best]] if best is not None else steps


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any | None) -> tuple[Any, dict[str, Any]]:
    """(state or None, meta) of one step; orbax's exception when it is unreadable."""
    items = {"meta": ocp.args.JsonRestore()}
    if abstract_state is not None:
        items["state"] = ocp.args.StandardRestore(abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored.get("state") if abstract_state is not None else None, dict(restored["meta"])


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any | None = None, best_first: bool = False
) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest readable step (the best by validation loss first when `best_first`).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s whose shardings place the restored arrays; None reads
    the meta only (state None). Unreadable steps are logged as warnings and skipped. Returns None when the
    directory has no step; raises CheckpointError when it has some but none is readable."""
    failures = []
    for step in _candidates(manager, best_first):
        try:
            state, meta = restore_step(manager, step, abstract_state)
        except Exception as exc:  # orbax, tensorstore and JSON raise many kinds; each means this step is unusable
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log.warning("checkpoint step %d in %s is unreadable, skipping it (%s)", step, manager.directory, reason)
            failures.append(step)
            continue
        return step, state, meta
    if failures:
        raise CheckpointError(f"no readable checkpoint in {manager.directory} (unreadable steps: {failures})")
    return None

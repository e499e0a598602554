"""Byte data for training: a memory-mapped file, a train/validation split, and batches fixed by (seed, step).

A batch for step s is a pure function of (seed, s): its window offsets come from a NumPy generator seeded with both,
so a resumed run reads exactly the bytes the uninterrupted one would have, whatever happened in between.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hyperjax.errors import DataError


def load_bytes(path: str | Path) -> np.ndarray:
    """uint8 (N,) memory-mapped bytes of a file, or of a 1-D uint8 `.npy` array (`np.load(mmap_mode="r")`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"training data is empty: {path}")
    if path.suffix == ".npy":
        try:
            data = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise DataError(f"{path}: not a readable .npy array: {exc}") from None
        if data.dtype != np.uint8 or data.ndim != 1:
            raise DataError(f"{path}: expected a 1-D uint8 array, got {data.dtype} of shape {data.shape}")
        if data.size == 0:
            raise DataError(f"training data is empty: {path}")
        return data
    return np.memmap(path, dtype=np.uint8, mode="r")


def split(data: np.ndarray, window: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) views: the last `val_fraction` of the bytes validates; each must hold one `window`."""
    n_val = int(len(data) * val_fraction)
    train, val = data[: len(data) - n_val], data[len(data) - n_val :]
    if min(len(train), len(val)) < window:
        raise DataError(
            f"{len(data)} bytes split into {len(train)} train and {len(val)} validation bytes: each needs at least "
            f"one window of {window} bytes (context + 1)"
        )
    return train, val


def batch_offsets(seed: int, step: int, n: int, window: int, shape: tuple[int, ...]) -> np.ndarray:
    """int64 `shape` start offsets of windows in 0…n − window for `step` of a run seeded by `seed`."""
    return np.random.default_rng([seed, step]).integers(0, n - window + 1, size=shape)


def gather(data: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """int32 (*offsets.shape, window): the windows of `data` starting at `offsets`."""
    flat = offsets.reshape(-1)
    out = np.stack([np.asarray(data[o : o + window]) for o in flat]) if flat.size else np.zeros((0, window))
    return out.astype(np.int32).reshape(*offsets.shape, window)


def train_batch(data: np.ndarray, seed: int, step: int, accum: int, batch: int, window: int) -> np.ndarray:
    """int32 (accum, batch, window): the micro-batches of training step `step`."""
    return gather(data, batch_offsets(seed, step, len(data), window, (accum, batch)), window)


def val_batches(data: np.ndarray, n_batches: int, batch: int, window: int) -> np.ndarray:
    """int32 (k, batch, window), k ≤ n_batches: consecutive non-overlapping windows from the start of `data`.

    At least one batch: when fewer than `batch` windows fit, windows wrap around (the same bytes may repeat)."""
    fit = len(data) // window
    k = max(1, min(n_batches, fit // batch))
    offsets = (np.arange(k * batch) % fit) * window
    return gather(data, offsets.reshape(k, batch), window)

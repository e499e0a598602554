"""Next-token sampling in numpy, with the library's semantics (`hyperjax.kernels.sampling`), for the lean runner.

Order (llama.cpp's chain): repetition penalty → top-k → top-p → min-p → temperature → draw. Top-p and min-p see
probabilities at temperature 1 over what top-k kept; tokens tied with a threshold are kept together. Temperature 0
is the argmax of the penalized logits (the first one on ties, as `jnp.argmax`). The random stream is numpy's, so
sampled (not greedy) output differs from the library's for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """temperature 0 → greedy; top_k 0, top_p 1, min_p 0, repeat_penalty 1 → off."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0

    def check(self) -> str | None:
        """A one-line description of the first option out of range, or None."""
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            return f"temperature must be a finite number ≥ 0, got {self.temperature}"
        if self.top_k < 0:
            return f"top_k must be ≥ 0 (0 disables it), got {self.top_k}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1] (1 disables it), got {self.top_p}"
        if not 0 <= self.min_p < 1:
            return f"min_p must be in [0, 1) (0 disables it), got {self.min_p}"
        if not (np.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            return f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty}"
        return None


def penalize(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """float32 (V,): each distinct recent token's logit divided by `penalty` if positive, else multiplied."""
    out = np.array(logits, np.float32)
    if penalty == 1.0 or not recent:
        return out
    seen = np.unique(np.asarray(recent, np.int64))
    values = out[seen]
    out[seen] = np.where(values > 0, values / np.float32(penalty), values * np.float32(penalty))
    return out


def filtered(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """float32 (V,) logits after top-k, top-p and min-p (removed → −inf), divided by the temperature."""
    x = np.asarray(logits, np.float32)
    keep = np.ones(x.shape, bool)
    if 0 < sampling.top_k < x.size:
        keep &= x >= np.partition(x, x.size - sampling.top_k)[x.size - sampling.top_k]
    x_max = x.max()
    weights = np.where(keep, np.exp(x - x_max), 0.0)
    if sampling.top_p < 1:
        order = np.argsort(-x[keep], kind="stable")
        kept_x, kept_w = x[keep][order], weights[keep][order]
        cut = np.searchsorted(np.cumsum(kept_w), sampling.top_p * weights.sum())
        keep &= x >= kept_x[min(cut, kept_x.size - 1)]
    if sampling.min_p > 0:
        keep &= x >= x_max + np.log(np.float32(sampling.min_p))
    return np.where(keep, x / np.float32(sampling.temperature), -np.inf).astype(np.float32)


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator, recent: Sequence[int] = ()) -> int:
    """One token id from logits (V,) float32; `recent` is the repetition window (prompt included)."""
    x = penalize(logits, recent, sampling.repeat_penalty)
    if sampling.temperature == 0:
        return int(np.argmax(x))
    z = filtered(x, sampling)
    p = np.exp(z.astype(np.float64) - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))

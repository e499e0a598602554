"""Held-out quality of a language model: perplexity over a text, window by window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hyperjax.errors import InvalidPromptError


@dataclass(frozen=True)
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perplexity(model, text: str, *, context: int = 256, max_tokens: int | None = None) -> Perplexity:
    """Perplexity of `model` (anything with `tokenize` and teacher-forced `logits`) on `text`.

    The text is cut into non-overlapping windows of `context` tokens; within each, every token after the first is
    scored given the tokens before it in the window. `max_tokens` caps the tokens read (for quick comparisons).
    """
    ids = model.tokenize(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise InvalidPromptError("perplexity needs a text of at least two tokens")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        window = ids[start : start + context]
        if len(window) < 2:
            break
        log_probs = _log_softmax(np.asarray(model.logits(window), np.float64))
        targets = np.asarray(window[1:])
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return Perplexity(tokens=count, nll=total / count)

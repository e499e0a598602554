"""Perplexity over windows of a text."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hyperjax
from hyperjax.errors import InvalidPromptError
from hyperjax.evaluate import perplexity


def test_perplexity_equals_mean_nll_of_teacher_forced_logits(tiny_llama_gguf):
    model = hyperjax.load(tiny_llama_gguf)
    text = "to be or not to be, that is the question"
    ids = model.tokenize(text)
    logits = model.logits(ids).astype(np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    expected = -np.mean(log_probs[np.arange(len(ids) - 1), ids[1:]])
    result = perplexity(model, text, context=len(ids))
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    windowed = perplexity(model, text, context=8)
    assert windowed.tokens == len(ids) - math.ceil((len(ids) - 1) / 8)


def test_perplexity_needs_two_tokens(tiny_llama_gguf):
    with pytest.raises(InvalidPromptError):
        perplexity(hyperjax.load(tiny_llama_gguf), "a")

"""Parity with llama.cpp on SmolLM2-135M-Instruct Q4_1 (reference outputs in ../shared/reference), on both kernel
paths: the pure-JAX kernels (float activations) and the native ones (int8 activations, as llama.cpp)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SHARED

REFERENCE = SHARED / "reference" / "smollm2_q4_1_llamacpp.json"
CASES = json.loads(REFERENCE.read_text())["cases"]


@pytest.fixture(scope="module", params=["jax", "native"])
def kernel_model(request, smollm2_path, native_library):
    """SmolLM2 on each kernel path."""
    import hyperjax

    model = hyperjax.load(smollm2_path, kernels=request.param)
    assert model.kernels == request.param
    return model


@pytest.fixture(scope="module")
def teacher_forced(kernel_model):
    """Per case: hyperjax logits over prompt + llama.cpp's greedy tokens, and llama.cpp's top-5."""
    out = []
    for case in CASES:
        tokens = case["prompt_tokens"] + case["greedy_tokens"]
        logits = kernel_model.logits(tokens)
        out.append((logits, np.array(case["teacher_forced_top5_ids"]), np.array(case["teacher_forced_top5_logits"])))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:24] for c in CASES])
def test_tokenization_matches_llama_cpp(smollm2_model, case):
    assert smollm2_model.tokenize(case["prompt"]) == case["prompt_tokens"]


def test_teacher_forced_argmax_agrees_with_llama_cpp(teacher_forced):
    agree, total = 0, 0
    for logits, top5_ids, top5_logits in teacher_forced:
        n = min(len(logits), len(top5_ids))
        ours = logits[:n].argmax(-1)
        theirs = top5_ids[:n, 0]
        margin = top5_logits[:n, 0] - top5_logits[:n, 1]
        confident = margin >= 0.5
        assert np.array_equal(ours[confident], theirs[confident]), "argmax differs where llama.cpp is confident"
        assert all(o in row for o, row in zip(ours, top5_ids[:n], strict=True)), "argmax outside llama.cpp top-5"
        agree += int((ours == theirs).sum())
        total += n
    assert agree / total >= 0.95, f"argmax agreement {agree / total:.3f} < 0.95"


def test_teacher_forced_logits_close_to_llama_cpp(teacher_forced):
    diffs = []
    for logits, top5_ids, top5_logits in teacher_forced:
        n = min(len(logits), len(top5_ids))
        ours = np.take_along_axis(logits[:n], top5_ids[:n], axis=-1)
        diffs.append(np.abs(ours - top5_logits[:n]).ravel())
    diffs = np.concatenate(diffs)
    assert np.percentile(diffs, 99) <= 1.0, f"p99 |Δlogit| = {np.percentile(diffs, 99):.3f}"
    assert diffs.max() <= 1.5, f"max |Δlogit| = {diffs.max():.3f}"


def test_greedy_generation_follows_llama_cpp(kernel_model):
    """Greedy decoding through the KV cache reproduces llama.cpp's tokens until their first near-tie."""
    case = CASES[0]
    result = kernel_model.generate(case["prompt"], max_tokens=16, temperature=0.0)
    margins = np.array(case["teacher_forced_top5_logits"])[:, 0] - np.array(case["teacher_forced_top5_logits"])[:, 1]
    n_prompt = len(case["prompt_tokens"])
    unambiguous = next(
        (i for i in range(16) if margins[n_prompt - 1 + i] < 0.5),
        16,
    )
    assert unambiguous > 0
    assert result.token_ids[:unambiguous] == case["greedy_tokens"][:unambiguous]

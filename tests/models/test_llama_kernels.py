"""The kernel choice at load: native and pure-JAX paths hold the same weights and agree; the choice resolves and
falls back as documented."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import hyperjax
from hyperjax import api
from hyperjax.errors import HyperjaxError
from hyperjax.kernels import native
from hyperjax.kernels.native import NativeWeight
from hyperjax.kernels.quant import QuantizedTensor


@pytest.fixture(scope="module")
def both(tiny_llama_gguf, native_library):
    return hyperjax.load(tiny_llama_gguf, kernels="jax"), hyperjax.load(tiny_llama_gguf, kernels="native")


def _leaf_types(model) -> set[type]:
    packed = (QuantizedTensor, NativeWeight)
    return {type(leaf) for leaf in jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, packed))}


def test_native_path_holds_the_same_weights(both) -> None:
    """Every packed weight is repacked (embedding/tied head included) losslessly: the fp32 twins are identical."""
    pure, fast = both
    assert QuantizedTensor in _leaf_types(pure) and NativeWeight not in _leaf_types(pure)
    assert NativeWeight in _leaf_types(fast) and QuantizedTensor not in _leaf_types(fast)
    for a, b in zip(jax.tree.leaves(pure.to_float32().params), jax.tree.leaves(fast.to_float32().params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_native_logits_agree_with_pure_jax(both) -> None:
    """int8 activations move the logits by a small fraction of their spread, and rarely the argmax."""
    pure, fast = both
    tokens = pure.tokenize("hello world, the quick brown fox")
    a, b = pure.logits(tokens), fast.logits(tokens)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    result = fast.generate("hello", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert len(result.token_ids) == 8


def test_resolve_kernels(monkeypatch, capsys, native_library) -> None:
    monkeypatch.delenv("HYPERJAX_KERNELS", raising=False)
    assert api.resolve_kernels() == "native"
    assert api.resolve_kernels("jax") == "jax"
    monkeypatch.setenv("HYPERJAX_KERNELS", "jax")
    assert api.resolve_kernels() == "jax"
    with pytest.raises(HyperjaxError, match="unknown kernels 'fast'"):
        api.resolve_kernels("fast")


def test_auto_falls_back_with_one_notice(monkeypatch, capsys) -> None:
    """Without the library, "auto" runs the pure-JAX kernels and says so once; "native" is a named error."""
    monkeypatch.delenv("HYPERJAX_KERNELS", raising=False)
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "native kernel library not built")
    monkeypatch.setattr(api, "_notified", False)
    assert api.resolve_kernels() == "jax"
    assert api.resolve_kernels("auto") == "jax"
    err = capsys.readouterr().err
    assert err.count("native kernels unavailable (native kernel library not built)") == 1
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(native.NativeKernelError, match="requested but unavailable"):
        api.resolve_kernels("native")

"""Ahead-of-time export of a llama model for the lean runner (`hyperjax export MODEL -o DIR`, `hyperjax-run`).

The exported functions are `models.llama.forward` at fixed shapes, with every weight an *argument* (no constant is
baked into the graph): one per prefill bucket (16…256 tokens, powers of two) and the decode step (1 token), all
with the KV cache at a fixed capacity, `max_context`. The jax target serializes them with `jax.export` for the
platforms asked (cross-platform lowering: an export for cpu and cuda is made on a CPU-only machine); the IREE
target compiles the same StableHLO for the host CPU (`llvm-cpu`) into `.vmfb` modules. The packed weights go to one
raw file with 64-byte aligned tensors (int4 stays two weights per byte), the tokenizer to `tokenizer.json`, and a
versioned manifest records the config, sampling defaults, buckets, platforms and the sha256 of every file
(`hyperjax.runner.format`; fields in `docs/design.md`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from hyperjax import __version__
from hyperjax.errors import HyperjaxError
from hyperjax.kernels.quant import QuantizedTensor
from hyperjax.kernels.sampling import SamplingConfig
from hyperjax.models.llama import KVCache, LlamaConfig, LlamaParams, forward, forward_new_kv
from hyperjax.models.llama_runtime import PREFILL_CHUNK
from hyperjax.runner.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TARGETS,
    TOKENIZER,
    WEIGHTS,
    sha256_file,
    weight_layout,
)

DEFAULT_MAX_CONTEXT = 1024
JAX_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
IREE_BACKEND = "llvm-cpu"
CACHE_UPDATES = ("in_graph", "by_runner")


class ExportError(HyperjaxError):
    """The export cannot be made as asked (options out of range, a platform or target unavailable)."""


def prefill_buckets(max_context: int) -> list[int]:
    """Prompt chunk sizes: powers of two from 16 up to min(PREFILL_CHUNK, max_context)."""
    buckets = [16]
    while buckets[-1] * 2 <= min(PREFILL_CHUNK, max_context):
        buckets.append(buckets[-1] * 2)
    return buckets


def weight_arrays(params: LlamaParams) -> list[tuple[str, np.ndarray]]:
    """(dotted path, host array) of every parameter leaf, in pytree order (the functions' argument order)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(jax.tree_util.keystr(path, simple=True, separator="."), np.asarray(leaf)) for path, leaf in flat]


def cache_shape(config: LlamaConfig, capacity: int) -> tuple[int, ...]:
    """(n_layers, 1, capacity, n_kv_heads, head_dim): keys, and values, of a batch-1 cache."""
    return (config.n_layers, 1, capacity, config.n_kv_heads, config.head_dim)


def export_forward(
    params: LlamaParams,
    config: LlamaConfig,
    tokens: int,
    capacity: int,
    platforms: Sequence[str],
    cache_update: str = "in_graph",
) -> export.Exported:
    """`forward` for (1, tokens) token ids at cache capacity `capacity`, weights as arguments.

    Signature: (weights tuple in `weight_arrays` order, tokens int32 (1, T), start int32 (), n_valid int32 (),
    keys float32, values float32 (cache_shape)) → (logits float32 (1, V) after the last real token, keys, values).
    With cache_update "in_graph" the outputs are the whole updated cache (the inputs are donated, so XLA updates it
    in place); with "by_runner" they are only this call's keys and values (L, 1, T, K, D), which the runner writes
    at `start` itself: for runtimes such as IREE that would otherwise copy the whole cache on every call.
    """
    if cache_update not in CACHE_UPDATES:
        raise ExportError(f"unknown cache update {cache_update!r}; choose one of {', '.join(CACHE_UPDATES)}")
    leaves, treedef = jax.tree.flatten(params)

    def fn(weights, token_ids, start, n_valid, keys, values):
        cache = KVCache(keys, values, capacity)
        weights = jax.tree.unflatten(treedef, weights)
        if cache_update == "by_runner":
            return forward_new_kv(weights, config, token_ids, start, n_valid, cache)
        logits, cache = forward(weights, config, token_ids, start, n_valid, cache)
        return logits, cache.keys, cache.values

    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    kv = jax.ShapeDtypeStruct(cache_shape(config, capacity), jnp.float32)
    specs = (
        tuple(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves),
        jax.ShapeDtypeStruct((1, tokens), jnp.int32),
        scalar,
        scalar,
        kv,
        kv,
    )
    donate = (4, 5) if cache_update == "in_graph" else ()
    try:
        return export.export(jax.jit(fn, donate_argnums=donate), platforms=tuple(platforms))(*specs)
    except (ValueError, NotImplementedError) as exc:
        raise ExportError(f"cannot lower the model for platforms {', '.join(platforms)}: {exc}") from None


def _iree_compiler() -> Any:
    """The `iree.compiler` module; ExportError when the [iree] extra is not installed."""
    try:
        from iree import compiler
    except ImportError:
        raise ExportError("--target iree needs the IREE compiler: pip install 'hyperjax[iree]'") from None
    return compiler


def compile_iree(mlir: str) -> bytes:
    """An IREE VM flatbuffer (.vmfb) of a StableHLO module, for the host CPU."""
    compiler = _iree_compiler()
    try:
        return compiler.compile_str(
            mlir,
            target_backends=[IREE_BACKEND],
            input_type="stablehlo",
            extra_args=["--iree-llvmcpu-target-cpu=host", "--iree-opt-level=O3"],
        )
    except compiler.CompilerToolError as exc:
        raise ExportError(f"IREE could not compile the module: {str(exc).strip().splitlines()[0]}") from None


def _check_options(config: LlamaConfig, platforms: Sequence[str], max_context: int, target: str) -> None:
    if target not in TARGETS:
        raise ExportError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    unknown = [p for p in platforms if p not in JAX_PLATFORMS]
    if not platforms or unknown:
        raise ExportError(f"platforms must be among {', '.join(JAX_PLATFORMS)}, got {', '.join(platforms) or 'none'}")
    if target == "iree" and list(platforms) != ["cpu"]:
        raise ExportError("the IREE target compiles for the host CPU only: use --platforms cpu")
    if target == "iree":
        _iree_compiler()
    if not (16 <= max_context <= config.context_length and max_context % 16 == 0):
        raise ExportError(
            f"max context must be a multiple of 16 in [16, {config.context_length}] (the model's context), "
            f"got {max_context}"
        )


def _write_weights(path: Path, arrays: Sequence[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    entries = weight_layout(arrays)
    with open(path, "wb") as f:
        for entry, (_, array) in zip(entries, arrays, strict=True):
            f.write(b"\0" * (entry["offset"] - f.tell()))
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return entries


def export_model(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    platforms: Sequence[str] = ("cpu",),
    max_context: int | None = None,
    target: str = "jax",
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Export a registered model name or GGUF path into `out_dir`; returns the manifest written last.

    `max_context` (default min(DEFAULT_MAX_CONTEXT, the model's context)) is the KV cache capacity: prompt plus
    output. `log` receives a line per step.
    """
    from hyperjax.api import load

    llm = load(model, kernels="jax")  # a portable graph: no custom calls into hyperjax's native library
    config, params, tokenizer = llm.config, llm.params, llm.tokenizer
    max_context = min(DEFAULT_MAX_CONTEXT, config.context_length) if max_context is None else max_context
    platforms = list(dict.fromkeys(platforms))
    _check_options(config, platforms, max_context, target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buckets = prefill_buckets(max_context)
    # IREE writes a float copy of a weight it dequantizes outside a reduction, and copies a cache it is given back.
    matmul, cache_update = ("reduce", "by_runner") if target == "iree" else ("dot", "in_graph")
    traced = jax.tree.map(
        lambda w: dataclasses.replace(w, matmul=matmul) if isinstance(w, QuantizedTensor) else w,
        params,
        is_leaf=lambda w: isinstance(w, QuantizedTensor),
    )
    functions = []
    for tokens in (1, *buckets):
        name = "step" if tokens == 1 else f"prefill_{tokens}"
        exported = export_forward(traced, config, tokens, max_context, platforms, cache_update)
        if target == "jax":
            file = f"{name}.jaxexp"
            (out / file).write_bytes(exported.serialize())
        else:
            log(f"compiling {name} with IREE ({IREE_BACKEND})")
            file = f"{name}.vmfb"
            (out / file).write_bytes(compile_iree(exported.mlir_module()))
        functions.append({"name": name, "tokens": tokens, "file": file})
        log(f"wrote {file}")
    entries = _write_weights(out / WEIGHTS, weight_arrays(params))
    log(f"wrote {WEIGHTS} ({(out / WEIGHTS).stat().st_size / 2**20:.1f} MiB)")
    (out / TOKENIZER).write_text(tokenizer.to_json(), encoding="utf-8")
    files = [WEIGHTS, TOKENIZER, *(f["file"] for f in functions)]
    defaults = dataclasses.asdict(SamplingConfig())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": target,
        "platforms": platforms,
        "model": {"name": llm.gguf.get("general.name", None), "source": Path(llm.path).name},
        "config": dataclasses.asdict(config),
        "max_context": max_context,
        "buckets": buckets,
        "cache": {"shape": list(cache_shape(config, max_context)), "dtype": "float32", "update": cache_update},
        "functions": functions,
        "weights": {"file": WEIGHTS, "tensors": entries},
        "tokenizer": {
            "file": TOKENIZER,
            "stop_ids": sorted(tokenizer.eot_ids),
            "bos_text": "" if tokenizer.bos_id is None else tokenizer.token_text(tokenizer.bos_id),
            "eos_text": "" if tokenizer.eos_id is None else tokenizer.token_text(tokenizer.eos_id),
            "chat_template": tokenizer.chat_template,
        },
        "sampling_defaults": defaults,
        "versions": {"jax": jax.__version__, "hyperjax": __version__},
        "files": {name: sha256_file(out / name) for name in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {MANIFEST}")
    return manifest

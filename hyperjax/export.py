"""Ahead-of-time export of a model for the lean runner (`hyperjax export MODEL -o DIR`, `hyperjax-run`).

The exported functions are `models.llama.forward` (or, for a trained byte transformer or RNN, `ByteDecoder.forward`)
at fixed shapes, with every weight an *argument* (no constant is baked into the graph): one per prefill bucket
(16…256 tokens, powers of two; from 4 for IREE) and the decode step (1 token), all with the state (KV cache or
recurrent carries) at a fixed capacity, `max_context`. The jax target serializes them with `jax.export` for the
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
from functools import partial
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
# IREE's prefill writes each layer's weights out as float32 scratch, more of it the longer the chunk: 32-token chunks
# keep a 127-token prompt's peak RSS at 169 MiB (184 with 256-token chunks) for 0.7x the prefill speed.
IREE_MAX_BUCKET = 32


class ExportError(HyperjaxError):
    """The export cannot be made as asked (options out of range, a platform or target unavailable)."""


def prefill_buckets(max_context: int, smallest: int = 16, largest: int = PREFILL_CHUNK) -> list[int]:
    """Prompt chunk sizes: powers of two from `smallest` up to min(largest, max_context)."""
    buckets = [smallest]
    while buckets[-1] * 2 <= min(largest, max_context):
        buckets.append(buckets[-1] * 2)
    return buckets


def weight_arrays(params: Any) -> list[tuple[str, np.ndarray]]:
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
    specs = (_leaf_specs(leaves), jax.ShapeDtypeStruct((1, tokens), jnp.int32), scalar, scalar, kv, kv)
    return _lower(fn, specs, (4, 5) if cache_update == "in_graph" else (), platforms)


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


def _check_target(platforms: Sequence[str], target: str) -> None:
    if target not in TARGETS:
        raise ExportError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    unknown = [p for p in platforms if p not in JAX_PLATFORMS]
    if not platforms or unknown:
        raise ExportError(f"platforms must be among {', '.join(JAX_PLATFORMS)}, got {', '.join(platforms) or 'none'}")
    if target == "iree" and list(platforms) != ["cpu"]:
        raise ExportError("the IREE target compiles for the host CPU only: use --platforms cpu")
    if target == "iree":
        _iree_compiler()


def _context(max_context: int | None, context_length: int) -> int:
    """The export's capacity: `max_context`, by default min(DEFAULT_MAX_CONTEXT, the model's context)."""
    max_context = min(DEFAULT_MAX_CONTEXT, context_length) if max_context is None else max_context
    if not (16 <= max_context <= context_length and max_context % 16 == 0):
        raise ExportError(
            f"max context must be a multiple of 16 in [16, {context_length}] (the model's context), got {max_context}"
        )
    return max_context


def _lower(fn: Callable[..., Any], specs: Sequence[Any], donate: tuple[int, ...], platforms: Sequence[str]):
    try:
        return export.export(jax.jit(fn, donate_argnums=donate), platforms=tuple(platforms))(*specs)
    except (ValueError, NotImplementedError) as exc:
        raise ExportError(f"cannot lower the model for platforms {', '.join(platforms)}: {exc}") from None


def _leaf_specs(tree: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass
class _Plan:
    """What `export_model` writes for one model: the weights, a lowering per token count, manifest sections."""

    weights: Any  # the pytree whose leaves go to weights.bin, in argument order
    lower: Callable[[int], export.Exported]
    max_context: int
    buckets: list[int]
    cache: dict[str, Any]
    model: dict[str, Any]
    config: dict[str, Any]
    tokenizer: dict[str, Any]
    tokenizer_json: str | None  # None: a byte model, whose tokens are the UTF-8 bytes themselves


def _llama_plan(
    model: str | os.PathLike | None, max_context: int | None, max_bucket: int, target: str, platforms: list[str]
) -> _Plan:
    from hyperjax.api import load

    llm = load(model, kernels="jax")  # a portable graph: no custom calls into hyperjax's native library
    config, params, tokenizer = llm.config, llm.params, llm.tokenizer
    max_context = _context(max_context, config.context_length)
    # IREE writes a float copy of a weight it dequantizes outside a reduction, and copies a cache it is given back.
    # Its short prompts get a 4-token bucket, computed by multiply-reduce like the decode step (quant.REDUCE_MAX_ROWS).
    matmul, cache_update = ("reduce", "by_runner") if target == "iree" else ("dot", "in_graph")
    traced = jax.tree.map(
        lambda w: dataclasses.replace(w, matmul=matmul) if isinstance(w, QuantizedTensor) else w,
        params,
        is_leaf=lambda w: isinstance(w, QuantizedTensor),
    )
    kv = {"shape": list(cache_shape(config, max_context)), "dtype": "float32"}
    return _Plan(
        weights=params,
        lower=lambda tokens: export_forward(traced, config, tokens, max_context, platforms, cache_update),
        max_context=max_context,
        buckets=prefill_buckets(max_context, smallest=4 if target == "iree" else 16, largest=max_bucket),
        cache={"leaves": [kv, kv], "update": cache_update},
        model={"kind": "llama", "name": llm.gguf.get("general.name", None), "source": Path(llm.path).name},
        config=dataclasses.asdict(config),
        tokenizer={
            "kind": "bpe",
            "file": TOKENIZER,
            "stop_ids": sorted(tokenizer.eot_ids),
            "bos_text": "" if tokenizer.bos_id is None else tokenizer.token_text(tokenizer.bos_id),
            "eos_text": "" if tokenizer.eos_id is None else tokenizer.token_text(tokenizer.eos_id),
            "chat_template": tokenizer.chat_template,
        },
        tokenizer_json=tokenizer.to_json(),
    )


def _byte_plan(path: Path, max_context: int | None, max_bucket: int, platforms: list[str]) -> _Plan:
    """A trained byte transformer or RNN (a `hyperjax train` run, or its `hyperjax quantize` output: float32 weights,
    dequantized, since the byte models compute in float)."""
    from hyperjax.models.byte_decoder import ByteDecoder
    from hyperjax.train.artifacts import load_byte_model

    byte_model, params, _ = load_byte_model(path)
    if byte_model.name == "hakmem":
        raise ExportError("HAKMEM decodes patch by patch and cannot be exported yet: export a transformer or rnn run")
    decoder = ByteDecoder(byte_model.graphdef, params)
    max_context = _context(max_context, decoder.context_length)
    weights, weights_def = jax.tree.flatten(params)
    state = jax.eval_shape(partial(decoder.initial_state, max_context))
    state_leaves, state_def = jax.tree.flatten(state)

    def lower(tokens: int) -> export.Exported:
        def fn(weights, token_ids, start, n_valid, *state_in):
            logits, new = decoder.forward(
                jax.tree.unflatten(weights_def, weights),
                token_ids,
                start,
                n_valid,
                jax.tree.unflatten(state_def, state_in),
            )
            return (logits[None], *jax.tree.leaves(new))

        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        specs = (_leaf_specs(weights), jax.ShapeDtypeStruct((1, tokens), jnp.int32), scalar, scalar, *state_leaves)
        return _lower(fn, specs, tuple(range(4, 4 + len(state_leaves))), platforms)

    return _Plan(
        weights=params,
        lower=lower,
        max_context=max_context,
        buckets=prefill_buckets(max_context, largest=max_bucket),
        cache={"leaves": [{"shape": list(x.shape), "dtype": x.dtype.name} for x in state_leaves], "update": "in_graph"},
        model={"kind": byte_model.name, "name": f"byte {byte_model.name}", "source": Path(path).name},
        config=byte_model.config_dict(),
        tokenizer={"kind": "bytes", "stop_ids": [], "bos_text": "", "eos_text": "", "chat_template": None},
        tokenizer_json=None,
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
    max_bucket: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Export a registered model name, a GGUF path, or a trained byte model (a `hyperjax train` run directory or its
    `hyperjax quantize` output) into `out_dir`; returns the manifest written last.

    `max_context` (default min(DEFAULT_MAX_CONTEXT, the model's context)) is the KV cache capacity: prompt plus
    output. `max_bucket` is the largest prefill chunk (a power of two from 16 to PREFILL_CHUNK; default
    PREFILL_CHUNK, and IREE_MAX_BUCKET for IREE): smaller chunks lower the peak memory of long prompts and prefill
    them more slowly. `log` receives a line per step.
    """
    platforms = list(dict.fromkeys(platforms))
    _check_target(platforms, target)
    max_bucket = (IREE_MAX_BUCKET if target == "iree" else PREFILL_CHUNK) if max_bucket is None else max_bucket
    if max_bucket not in prefill_buckets(PREFILL_CHUNK):
        raise ExportError(f"max bucket must be a power of two from 16 to {PREFILL_CHUNK}, got {max_bucket}")
    if model is not None and Path(model).is_dir():
        plan = _byte_plan(Path(model), max_context, max_bucket, platforms)
    else:
        plan = _llama_plan(model, max_context, max_bucket, target, platforms)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    functions = []
    for tokens in (1, *plan.buckets):
        name = "step" if tokens == 1 else f"prefill_{tokens}"
        exported = plan.lower(tokens)
        if target == "jax":
            file = f"{name}.jaxexp"
            (out / file).write_bytes(exported.serialize())
        else:
            log(f"compiling {name} with IREE ({IREE_BACKEND})")
            file = f"{name}.vmfb"
            (out / file).write_bytes(compile_iree(exported.mlir_module()))
        functions.append({"name": name, "tokens": tokens, "file": file})
        log(f"wrote {file}")
    entries = _write_weights(out / WEIGHTS, weight_arrays(plan.weights))
    log(f"wrote {WEIGHTS} ({(out / WEIGHTS).stat().st_size / 2**20:.1f} MiB)")
    files = [WEIGHTS, *(f["file"] for f in functions)]
    if plan.tokenizer_json is not None:
        (out / TOKENIZER).write_text(plan.tokenizer_json, encoding="utf-8")
        files.insert(1, TOKENIZER)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": target,
        "platforms": platforms,
        "model": plan.model,
        "config": plan.config,
        "max_context": plan.max_context,
        "buckets": plan.buckets,
        "cache": plan.cache,
        "functions": functions,
        "weights": {"file": WEIGHTS, "tensors": entries},
        "tokenizer": plan.tokenizer,
        "sampling_defaults": dataclasses.asdict(SamplingConfig()),
        "versions": {"jax": jax.__version__, "hyperjax": __version__},
        "files": {name: sha256_file(out / name) for name in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {MANIFEST}")
    return manifest

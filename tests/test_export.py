"""`hyperjax export` and the lean runner `hyperjax-run`: format, faithfulness to the library, import boundary,
failure messages, and a run in a fresh virtual environment holding only the runner's dependencies."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

import hyperjax
from hyperjax.export import ExportError, export_model, weight_arrays
from hyperjax.io.gguf import read_gguf
from hyperjax.io.tokenizer import Tokenizer
from hyperjax.kernels.sampling import SamplingConfig, filter_logits
from hyperjax.runner import procmem
from hyperjax.runner.cli import main, open_functions
from hyperjax.runner.format import ALIGNMENT, MANIFEST, cache_leaves, map_weights, read_manifest, sha256_file
from hyperjax.runner.jax_backend import JaxFunctions
from hyperjax.runner.loop import generate, plan_chunks
from hyperjax.runner.sampling import Sampling, filtered, sample
from hyperjax.runner.text import encode, render_chat, token_byte_table

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "hello there, tiny model"
LONG_PROMPT = "the quick brown fox jumps over the lazy dog; " * 8  # > 256 tokens: two prefill chunks
# Modules the runner must never import (prefixes). With the IREE target, jax is forbidden too.
FORBIDDEN = (
    "flax", "optax", "orbax", "gguf", "jinja2", "typer", "rich", "psutil",
    "hyperjax.models", "hyperjax.api", "hyperjax.io", "hyperjax.kernels", "hyperjax.generate", "hyperjax.export",
    "hyperjax.cli",
)  # fmt: skip
DRIVER = (
    "import json, sys\n"
    "from hyperjax.runner.cli import run\n"
    "code = run(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(json.dumps(sorted(sys.modules)))\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_gguf):
    """The library on the pure-JAX kernels: the graph an export carries (the native kernels are not exported)."""
    return hyperjax.load(tiny_llama_gguf, kernels="jax")


@pytest.fixture(scope="module")
def tiny_export(tiny_llama_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(tiny_llama_gguf, out, platforms=["cpu", "cuda"], max_context=512)
    return out


def library_greedy(model, prompt: str, max_tokens: int) -> list[int]:
    return model.generate(prompt, max_tokens=max_tokens, temperature=0.0).token_ids


def run_driver(directory: Path, tmp_path: Path, *args: str) -> tuple[dict, list[str]]:
    """Run the runner in a fresh interpreter; (its statistics, the modules it had imported)."""
    modules_file = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(modules_file), str(directory), *args, "--stats-json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return stats, json.loads(modules_file.read_text())


def forbidden_in(modules: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in (*FORBIDDEN, *extra))]


def test_manifest_lists_files_with_checksums_and_aligned_packed_weights(tiny_export, tiny_model):
    manifest = read_manifest(tiny_export)
    assert manifest["format_version"] == 1 and manifest["target"] == "jax"
    assert manifest["platforms"] == ["cpu", "cuda"]
    assert manifest["buckets"] == [16, 32, 64, 128, 256] and manifest["max_context"] == 512
    kv = {"shape": [2, 1, 512, 2, 16], "dtype": "float32"}
    assert manifest["cache"] == {"leaves": [kv, kv], "update": "in_graph"} and manifest["model"]["kind"] == "llama"
    # A manifest written before `leaves` (one shape and dtype for the keys/values pair) still reads the same.
    assert cache_leaves(kv) == cache_leaves(manifest["cache"]) == [((2, 1, 512, 2, 16), "float32")] * 2
    assert manifest["config"]["n_layers"] == 2 and manifest["tokenizer"]["stop_ids"] == [257, 259]
    for name, digest in manifest["files"].items():
        assert sha256_file(tiny_export / name) == digest
    expected = weight_arrays(tiny_model.params)
    entries = manifest["weights"]["tensors"]
    assert [e["name"] for e in entries] == [name for name, _ in expected]
    assert all(e["offset"] % ALIGNMENT == 0 for e in entries)
    for view, (name, array) in zip(map_weights(tiny_export, manifest), expected, strict=True):
        assert view.dtype == array.dtype and np.array_equal(view, array), name
    packed = dict(expected)["layers.wq.packed"]
    assert packed.dtype == np.uint8 and packed.shape == (2, 64, 32)  # int4: two weights per byte


def test_functions_take_weights_as_arguments_for_every_platform(tiny_export):
    manifest = read_manifest(tiny_export)
    n_weights = len(manifest["weights"]["tensors"])
    for function in manifest["functions"]:
        exported = jax.export.deserialize(bytearray((tiny_export / function["file"]).read_bytes()))
        assert exported.platforms == ("cpu", "cuda")
        assert len(exported.in_avals) == n_weights + 5
        assert exported.in_avals[n_weights].shape == (1, function["tokens"])
    assert sorted(f["tokens"] for f in manifest["functions"]) == [1, 16, 32, 64, 128, 256]


def test_jax_runner_aliases_the_mapped_weight_file(tiny_export):
    manifest = read_manifest(tiny_export)
    views = map_weights(tiny_export, manifest)
    functions = JaxFunctions(tiny_export, manifest, views, "cpu")
    assert [w.unsafe_buffer_pointer() for w in functions.weights] == [v.ctypes.data for v in views]


def test_tokenizer_json_and_chat_template_work_as_the_library(tiny_model, tiny_export):
    library = tiny_model.tokenizer
    exported = HFTokenizer.from_str(library.to_json())
    assert list(token_byte_table(exported)) == [library.token_bytes(i) for i in range(library.vocab_size)]
    for text in (PROMPT, "<|im_start|>user\nhé ✓ 12345<|im_end|>\n", "  tt\t\n"):
        assert encode(exported, text) == library.encode(text)
    info = read_manifest(tiny_export)["tokenizer"]
    rendered = render_chat(info["chat_template"], "hi", info["bos_text"], info["eos_text"])
    assert rendered == tiny_model.chat_prompt([{"role": "user", "content": "hi"}])


@pytest.mark.model
def test_smollm2_tokenizer_json_matches_the_library(smollm2_path):
    library = Tokenizer.from_gguf_metadata(read_gguf(smollm2_path).metadata)
    exported = HFTokenizer.from_str(library.to_json())
    assert list(token_byte_table(exported)) == [library.token_bytes(i) for i in range(library.vocab_size)]
    text = library.apply_chat_template([{"role": "user", "content": "Ünïcode, numbers 123456 and code: x+=1"}])
    assert encode(exported, text) == library.encode(text)


def test_prefill_chunks_stay_inside_the_cache():
    buckets = [16, 32, 64, 128, 256]
    assert plan_chunks(5, 512, buckets) == [(0, 5, 16)]
    assert plan_chunks(300, 512, buckets) == [(0, 256, 256), (256, 44, 64)]
    assert plan_chunks(390, 400, buckets) == [(0, 256, 256), (256, 128, 128), (384, 6, 16)]
    for n, capacity in ((15, 16), (399, 400), (1000, 1024), (33, 48)):
        plan = plan_chunks(n, capacity, buckets)
        assert sum(count for _, count, _ in plan) == n
        assert all(start + bucket <= capacity and count <= bucket for start, count, bucket in plan)


def test_numpy_sampler_keeps_the_library_filter_set():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(300).astype(np.float32) * 3
    for top_k, top_p, min_p in ((40, 0.95, 0.05), (0, 0.5, 0.0), (5, 1.0, 0.0), (0, 1.0, 0.2)):
        ours = np.isfinite(filtered(logits, Sampling(1.0, top_k, top_p, min_p)))
        config = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
        assert np.array_equal(ours, np.isfinite(np.asarray(jax.jit(filter_logits)(logits, config))))
    assert sample(logits, Sampling(temperature=0.0), rng) == int(np.argmax(logits))
    drawn = {sample(logits, Sampling(1.0, 2, 1.0, 0.0), rng) for _ in range(50)}
    assert drawn <= set(np.argsort(logits)[-2:].tolist())
    penalized = sample(logits, Sampling(0.0, 0, 1.0, 0.0, repeat_penalty=1e6), rng, recent=[int(np.argmax(logits))])
    assert penalized == int(np.argsort(logits)[-2])


def test_runner_greedy_equals_library_and_imports_stay_lean(tiny_export, tiny_model, tmp_path):
    stats, modules = run_driver(tiny_export, tmp_path, PROMPT, "--temperature", "0", "-n", "24")
    assert stats["token_ids"] == library_greedy(tiny_model, PROMPT, 24)
    assert "jax" in modules and forbidden_in(modules) == []


def test_runner_greedy_equals_library_across_prefill_chunks(tiny_export, tiny_model):
    manifest = read_manifest(tiny_export)
    tokenizer = HFTokenizer.from_file(str(tiny_export / "tokenizer.json"))
    prompt_ids = encode(tokenizer, LONG_PROMPT)
    assert 256 < len(prompt_ids) < 480
    result = generate(
        open_functions(tiny_export, manifest, None),
        prompt_ids,
        capacity=manifest["max_context"],
        buckets=manifest["buckets"],
        stop_ids=frozenset(manifest["tokenizer"]["stop_ids"]),
        token_bytes=token_byte_table(tokenizer),
        sampling=Sampling(temperature=0.0),
        max_tokens=16,
    )
    assert result.token_ids == library_greedy(tiny_model, LONG_PROMPT, 16)


def run_main(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def export_copy(tiny_export, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_export, tmp_path / "copy"))


def test_missing_file_is_one_line(export_copy, capsys):
    (export_copy / "step.jaxexp").unlink()
    assert "file step.jaxexp is missing" in run_main(capsys, export_copy, PROMPT)
    (export_copy / MANIFEST).unlink()
    assert "not an exported model" in run_main(capsys, export_copy, PROMPT)


def test_wrong_checksum_is_one_line(export_copy, capsys):
    weights = export_copy / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "weights.bin: checksum mismatch" in run_main(capsys, export_copy, PROMPT)


def test_newer_or_incomplete_manifest_is_one_line(export_copy, capsys):
    manifest = json.loads((export_copy / MANIFEST).read_text())
    (export_copy / MANIFEST).write_text(json.dumps(manifest | {"format_version": 2}))
    assert "format version 2 is newer than this runner reads (up to 1)" in run_main(capsys, export_copy, PROMPT)
    del manifest["buckets"]
    (export_copy / MANIFEST).write_text(json.dumps(manifest))
    assert "the manifest lacks buckets" in run_main(capsys, export_copy, PROMPT)


def test_platform_not_exported_is_one_line(tiny_export, capsys):
    assert "exported for cpu, cuda, not tpu" in run_main(capsys, tiny_export, PROMPT, "--platform", "tpu")


def test_prompt_longer_than_the_export_is_one_line(tiny_export, capsys):
    message = run_main(capsys, tiny_export, LONG_PROMPT * 2)
    assert "this export holds 512 (prompt plus output)" in message


def test_export_refuses_bad_options(tiny_llama_gguf, tmp_path):
    with pytest.raises(ExportError, match="multiple of 16"):
        export_model(tiny_llama_gguf, tmp_path / "a", max_context=100)
    with pytest.raises(ExportError, match="host CPU only"):
        export_model(tiny_llama_gguf, tmp_path / "b", platforms=["cpu", "cuda"], target="iree")


def test_export_command_writes_a_directory_or_one_error_line(tiny_llama_gguf, tmp_path):
    def export_cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "hyperjax", "export", str(tiny_llama_gguf), "-o", str(tmp_path / "x"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    proc = export_cli("--max-context", "32", "--platforms", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "x")["buckets"] == [16, 32]
    proc = export_cli("--max-context", "100")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "max context must be a multiple of 16" in proc.stderr
    proc = export_cli("--max-bucket", "48")
    assert proc.returncode == 1 and "max bucket must be a power of two" in proc.stderr


def test_smaller_prefill_chunks_give_the_same_tokens(tiny_llama_gguf, tiny_model, tmp_path):
    out = tmp_path / "small-chunks"
    assert export_model(tiny_llama_gguf, out, max_context=512, max_bucket=32)["buckets"] == [16, 32]
    stats, _ = run_driver(out, tmp_path, LONG_PROMPT, "--temperature", "0", "-n", "8")
    assert stats["prompt_tokens"] > 256 and stats["token_ids"] == library_greedy(tiny_model, LONG_PROMPT, 8)


def test_iree_runner_greedy_equals_library_without_jax(tiny_llama_gguf, tiny_model, tmp_path):
    pytest.importorskip("iree.compiler")
    pytest.importorskip("iree.runtime")
    out = tmp_path / "iree"
    export_model(tiny_llama_gguf, out, max_context=64, target="iree")
    manifest = read_manifest(out)
    assert sorted(f["file"] for f in manifest["functions"])[0].endswith(".vmfb")
    assert manifest["cache"]["update"] == "by_runner"  # the functions return only new keys and values
    stats, modules = run_driver(out, tmp_path, PROMPT, "--temperature", "0", "-n", "24")
    assert stats["token_ids"] == library_greedy(tiny_model, PROMPT, 24)
    assert "iree.runtime" in modules and forbidden_in(modules, extra=("jax", "jaxlib")) == []
    # Every weight page is read through the one mapping of the file.
    assert stats["weights_resident_bytes"] == pytest.approx(stats["weights_file_bytes"], abs=mmap.PAGESIZE)
    assert manifest["buckets"] == [4, 8, 16, 32]  # a short prompt: one multiply-reduce call of 4 rows
    stats, _ = run_driver(out, tmp_path, "hi", "--temperature", "0", "-n", "8")
    assert stats["prompt_tokens"] <= 4 and stats["token_ids"] == library_greedy(tiny_model, "hi", 8)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps is Linux's")
def test_procmem_counts_the_resident_pages_of_a_mapped_file(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(64 * mmap.PAGESIZE))
    mapped = np.memmap(path, np.uint8, "r")
    assert procmem.resident_bytes_of(path) == 0  # mapped, not yet read
    int(mapped[: 8 * mmap.PAGESIZE : mmap.PAGESIZE].sum())  # read 8 pages
    resident = procmem.resident_bytes_of(path)
    assert 8 * mmap.PAGESIZE <= resident <= 64 * mmap.PAGESIZE  # the kernel may map neighbours, never past the file
    now = procmem.status()
    assert now["rss_bytes"] <= now["peak_rss_bytes"] and now["file_bytes"] >= resident
    assert procmem.resident_bytes_of(tmp_path / "not-mapped") == 0


@pytest.mark.venv
def test_runner_in_a_fresh_venv_with_only_its_dependencies(tiny_export, tiny_model, tmp_path):
    """A new venv with numpy, tokenizers, jax (and its own requirements) and flatbuffers, and hyperjax installed
    without dependencies: the console script runs a copy of the export and matches the library."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    runtime = ("numpy", "tokenizers", "jax", "jaxlib", "ml_dtypes", "opt_einsum", "scipy", "flatbuffers")
    subprocess.run([*pip, *(f"{name}=={version(name)}" for name in runtime)], check=True, timeout=900)
    source = tmp_path / "src"
    shutil.copytree(ROOT / "hyperjax", source / "hyperjax", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([*pip, str(source)], check=True, timeout=900)
    directory = Path(shutil.copytree(tiny_export, tmp_path / "export"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(venv / "bin" / "hyperjax-run"), str(directory), PROMPT, "--temperature", "0", "-n", "24", "--stats-json"],
        capture_output=True, text=True, timeout=300, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1])["token_ids"] == library_greedy(tiny_model, PROMPT, 24)
    (directory / "tokenizer.json").write_text("{}")
    proc = subprocess.run(
        [str(venv / "bin" / "hyperjax-run"), str(directory), PROMPT],
        capture_output=True, text=True, timeout=300, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "checksum mismatch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

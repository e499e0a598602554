"""The `hyperjax` command and `hyperjax.load`, end to end: real processes, real files, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hyperjax
from hyperjax.errors import GGUFError, InvalidPromptError, ModelNotFoundError


def run_cli(*args: str, home=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["HYPERJAX_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "hyperjax", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_generate_prints_text_and_one_summary_line(tiny_llama_gguf, tmp_path):
    proc = run_cli("generate", "hello", "--model", str(tiny_llama_gguf), "-n", "6", "--temperature", "0", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    summary = [line for line in proc.stderr.splitlines() if "tok/s" in line]
    assert len(summary) == 1
    assert "prompt 5 tok" in summary[0] and "generated" in summary[0] and "peak RSS" in summary[0]


def test_generate_is_deterministic_for_a_seed(tiny_llama_gguf, tmp_path):
    args = ("generate", "abc", "--model", str(tiny_llama_gguf), "-n", "8", "--seed", "3", "--no-stream")
    first, second = run_cli(*args, home=tmp_path), run_cli(*args, home=tmp_path)
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "hi", "--model", "/nonexistent/model.gguf"), "neither a file nor a registered model"),
        (("generate", "", "--model", "{tiny}"), "prompt is empty"),
        (("generate", "hi", "--model", "{tiny}", "--top-p", "2"), "top_p"),
        (("generate", "hi", "--model", "{bad}"), "not a GGUF file"),
    ],
)
def test_errors_are_one_line_without_traceback(tiny_llama_gguf, tmp_path, args, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    args = tuple(a.format(tiny=tiny_llama_gguf, bad=bad) for a in args)
    proc = run_cli(*args, home=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_tokenize_and_model_info(tiny_llama_gguf, tmp_path):
    proc = run_cli("tokenize", "hi t<|im_end|>", "--model", str(tiny_llama_gguf), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["104", "105", "256", "259"]
    info = run_cli("model", "info", "--model", str(tiny_llama_gguf), "--json", home=tmp_path)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["file"]["architecture"] == "llama"
    assert report["file"]["tensors_by_type"] == {"Q8_0": 1, "F32": 5, "Q4_1": 14}
    assert report["memory"]["weights_by_format"]["q4_1"]["tensors"] == 14
    assert report["config"]["n_layers"] == 2


def test_python_api_generate_tokenize_logits(tiny_llama_gguf):
    model = hyperjax.load(tiny_llama_gguf)
    ids = model.tokenize("hello")
    assert model.detokenize(ids) == "hello"
    logits = model.logits(ids)
    assert logits.shape == (len(ids), model.config.vocab_size)
    greedy = model.generate("hello", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert greedy.token_ids[0] == int(logits[-1].argmax())
    chat = model.generate([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.0, ignore_eos=True)
    assert chat.prompt_tokens == len(model.tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))


def test_python_api_errors(tiny_llama_gguf, tmp_path):
    with pytest.raises(ModelNotFoundError):
        hyperjax.load(tmp_path / "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama_gguf.read_bytes()[:-1000])
    with pytest.raises(GGUFError, match="truncated"):
        hyperjax.load(truncated)
    model = hyperjax.load(tiny_llama_gguf)
    with pytest.raises(InvalidPromptError):
        model.generate("")
    with pytest.raises(InvalidPromptError):
        model.logits([])

"""`hyperjax shell` driven through its stdin as a real process, against a real MCP server process on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperjax.config import load_config
from hyperjax.shell import ShellError, parse_generate
from tests.test_mcp_server import ROOT, TOKEN, server_process

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_gguf):
    import hyperjax

    return hyperjax.load(tiny_llama_gguf)


@pytest.fixture(scope="module")
def remote_url(tiny_llama_gguf) -> Iterator[str]:
    with server_process(tiny_llama_gguf, token=TOKEN) as (_, url):
        yield url


def run_shell(script: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERJAX_")} | {"HYPERJAX_HOME": str(home)}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "hyperjax", "shell", *args],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=300,
        check=False,
    )


def assert_in_order(text: str, *parts: str) -> None:
    """Each part occurs in `text` after the previous one."""
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= 0, f"{part!r} not found after position {position} in:\n{text}"
        position = found + len(part)


def test_every_command_through_stdin(tiny_llama_gguf, tiny_model, remote_url, tmp_path):
    expected = tiny_model.generate("hello", max_tokens=6, **GREEDY).text
    ids = tiny_model.tokenize("hi t<|im_end|>")
    saved = tmp_path / "saved.toml"
    script = f"""\
help
config show
config set sampling.max_tokens 6
config set sampling.temperature 0
config get sampling.max_tokens
model load {tiny_llama_gguf}
model info
tokenize hi t<|im_end|>
generate --ignore-eos hello
mcp status
hybrid status
hybrid force-remote
mcp connect {remote_url} --token wrong-token
mcp connect {remote_url} --token {TOKEN}
mcp status
hybrid force-remote
generate --ignore-eos hello
hybrid force-local
generate --ignore-eos hello
hybrid policy prefer-remote
hybrid off
generate --ignore-eos hello
hybrid on
hybrid status
config set hybrid.nope 1
config get hybrid.token
frobnicate now
generate --top-k lots hello
stats
stats --json
config save {saved}
mcp disconnect
mcp status
exit
generate this line is never run
"""
    proc = run_shell(script, tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, proc.stderr  # some commands failed on purpose: a script learns it from the status
    assert "Traceback" not in out + proc.stderr
    assert_in_order(
        out,
        "commands:",
        "mcp connect URL",
        "sampling.temperature = 0.8  (default)",
        "hybrid.remote_url = unset  (default)",
        "sampling.max_tokens = 6\n",
        "sampling.temperature = 0.0\n",
        "sampling.max_tokens = 6\n",
        f"loaded tiny-test-llama from {tiny_llama_gguf}",
        "tiny-test-llama · llama · ",
        "n_layers=2",
        "weights in memory: ",
        " ".join(map(str, ids)) + f"\n[{len(ids)} tokens]",
        f"{expected}\n[local · 6 tokens · ",
        "not connected",
        "hybrid off · policy local (configured prefer-local) · remote none",
        "error: policy 'remote' needs a remote server: mcp connect URL first",
        f"error: cannot connect to {remote_url}: RemoteRefusedError",
        "Unauthorized",
        f"connected to {remote_url} · remote model tiny-test-llama · hybrid on, policy prefer-local",
        f"connected to {remote_url} · token set · remote model tiny-test-llama · 0 generations served",
        "hybrid on · policy remote (configured remote)",
        f"{expected}\n[remote · 6 tokens · ",
        "hybrid on · policy local (configured local)",
        f"{expected}\n[local · 6 tokens · ",
        "hybrid on · policy prefer-remote (configured prefer-remote)",
        "hybrid off · policy local (configured prefer-remote)",
        f"{expected}\n[local · 6 tokens · ",
        "hybrid on · policy prefer-remote",
        "hybrid on · policy prefer-remote (configured prefer-remote) · remote " + remote_url,
        "error: unknown key 'hybrid.nope'",
        "hybrid.token = (hidden)",
        "error: unknown command 'frobnicate' (type help)",
        "error: sampling.top_k must be an integer, got 'lots'",
        "timings (ms)",
        "local: 3 requests, 0 errors, 0 fallbacks, 18 tokens",
        "remote: 1 requests, 0 errors, 0 fallbacks, 6 tokens",
        f"saved {saved}",
        "disconnected · hybrid off (its policy needs a remote)",
        "not connected",
    )
    assert out.count("error: ") == 5 and "never run" not in out
    stats = json.JSONDecoder().raw_decode(out[out.index("\n{\n") + 1 :])[0]
    assert stats["local"]["timings"]["request"]["count"] == 3 and stats["remote"]["timings"]["request"]["count"] == 1
    assert stats["local"]["timings"]["load"]["count"] == 1
    assert stats["remote"]["timings"]["decode"]["count"] == 1 and stats["policy"] == "prefer-remote"
    config = load_config(saved, environ={}).config
    assert config.sampling.max_tokens == 6 and config.sampling.temperature == 0.0
    assert config.hybrid.policy == "prefer-remote" and config.hybrid.remote_url == remote_url
    assert config.hybrid.token == TOKEN and config.model.name == str(tiny_llama_gguf)


def test_config_file_sets_defaults_and_a_clean_script_exits_zero(tiny_llama_gguf, tiny_model, tmp_path):
    (tmp_path / "hyperjax.toml").write_text(
        f'[model]\nname = "{tiny_llama_gguf}"\n\n[sampling]\ntemperature = 0\nmax_tokens = 4\n'
    )
    proc = run_shell("generate --ignore-eos once\n", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(tiny_model.generate("once", max_tokens=4, **GREEDY).text + "\n[local · 4 tokens")


def test_bad_config_file_is_one_line_with_its_line_number(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampling]\n\ntop_k = 1.5\n")
    proc = run_shell("exit\n", tmp_path, "--config", str(bad))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{bad}:3: sampling.top_k must be an integer" in proc.stderr


@pytest.mark.parametrize(
    ("arg", "options", "prompt"),
    [
        ("hello world", {}, "hello world"),
        ("-n 4 --temperature 0 --chat  don't stop", {"max_tokens": 4, "temperature": 0.0, "chat": True}, "don't stop"),
        ("--seed 3 -- -dash first", {"seed": 3}, "-dash first"),
    ],
)
def test_parse_generate(arg, options, prompt):
    assert parse_generate(arg) == (options, prompt)


@pytest.mark.parametrize(
    ("arg", "message"), [("--top-k", "needs a value"), ("--bogus 1 hi", "unknown option"), ("", "needs a prompt")]
)
def test_parse_generate_errors(arg, message):
    with pytest.raises(ShellError, match=message):
        parse_generate(arg)


def test_bare_command_on_a_terminal_is_the_shell_with_history(tmp_path):
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERJAX_")} | {"HYPERJAX_HOME": str(tmp_path)}
    env |= {"PYTHONPATH": str(ROOT), "TERM": "dumb"}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyperjax"], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, f"{marker!r} not seen in {seen!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)

    try:
        read_until(b"hyperjax> ")
        os.write(master, b"config get sampling.seed\n")
        read_until(b"sampling.seed = 0")
        os.write(master, b"bogus\n")
        read_until(b"error: unknown command 'bogus'")
        os.write(master, b"exit\n")
        assert proc.wait(timeout=30) == 0  # a failed command does not change a terminal session's status
    finally:
        proc.kill()
        os.close(master)
    history = (tmp_path / "shell_history").read_text().splitlines()
    assert history[-3:] == ["config get sampling.seed", "bogus", "exit"]

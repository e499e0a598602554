"""The MCP server, driven by the SDK's real client over streamable HTTP (a server process on loopback) and stdio."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from hyperjax.serve_mcp import ServerConfigError, check_bind, main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123"
GREEDY = {"temperature": 0.0}
CALL_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model_path: Path, *args: str, token: str | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A `python -m serve.mcp_server` HTTP process on a free loopback port; yields (process, URL) once it listens."""
    port = free_port()
    command = [sys.executable, "-m", "serve.mcp_server", "--model", str(model_path), "--port", str(port), *args]
    if token:
        command += ["--token", token]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "server did not start listening within 60 s"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield proc, f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()


async def _connect_and_call(client: Client, calls: list[tuple[str, dict[str, Any]]], progress: list | None) -> list:
    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append((value, total, message))

    async with client:
        return [await client.call_tool(name, args, progress_callback=on_progress) for name, args in calls]


def http_client(url: str, token: str | None) -> tuple[Client, httpx2.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(CALL_TIMEOUT_S))
    return Client(streamable_http_client(url, http_client=http), cache=None), http


def call_http(url: str, calls: list[tuple[str, dict[str, Any]]], token: str | None = TOKEN, progress=None) -> list:
    """Open one MCP session over HTTP and make `calls` in order; bounded by a timeout."""

    async def run() -> list:
        client, http = http_client(url, token)
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with http:
                return await _connect_and_call(client, calls, progress)

    return anyio.run(run)


def leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_gguf):
    import hyperjax

    return hyperjax.load(tiny_llama_gguf)


@pytest.fixture(scope="module")
def server_url(tiny_llama_gguf) -> Iterator[str]:
    limits = ("--max-tokens", "480", "--max-prompt-bytes", "256")
    with server_process(tiny_llama_gguf, *limits, token=TOKEN) as (_, url):
        yield url


def test_generate_over_http_equals_local_greedy_and_streams_progress(server_url, tiny_model):
    progress: list = []
    (result,) = call_http(
        server_url, [("generate", {"prompt": "Once upon", "max_tokens": 24, **GREEDY})], progress=progress
    )
    expected = tiny_model.generate("Once upon", max_tokens=24, **GREEDY)
    assert not result.is_error
    out = result.structured_content
    assert out["text"] == expected.text and out["tokens"] == len(expected.token_ids) == 24
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == expected.prompt_tokens
    assert len(progress) >= 12 and all(total == 24 for _, total, _ in progress)
    assert [p for p, _, _ in progress] == list(range(1, len(progress) + 1))
    assert "".join(message for _, _, message in progress) == expected.text


def test_chat_messages_tokenize_and_model_info(server_url, tiny_model):
    messages = [{"role": "user", "content": "hi there"}]
    calls = [
        ("generate", {"messages": messages, "max_tokens": 8, **GREEDY}),
        ("tokenize", {"text": "a t"}),
        ("model_info", {}),
    ]
    chat, tokens, info = call_http(server_url, calls)
    assert chat.structured_content["text"] == tiny_model.generate(messages, max_tokens=8, **GREEDY).text
    assert tokens.structured_content == {"token_ids": tiny_model.tokenize("a t"), "count": 2}
    assert info.structured_content["name"] == "tiny-test-llama"
    assert info.structured_content["limits"] == {"max_prompt_bytes": 256, "max_tokens": 480}


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_refused(server_url, token):
    with pytest.raises(BaseException) as info:
        call_http(server_url, [("model_info", {})], token=token)
    error = leaf(info.value)
    assert isinstance(error, MCPError) and "Unauthorized" in str(error), repr(error)
    response = httpx2.post(server_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, timeout=10)
    assert response.status_code == 401 and "Unauthorized" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"prompt": "x", "max_tokens": 481}, "max_tokens must be in [1, 480]"),
        ({"prompt": "x" * 257, "max_tokens": 4}, "257 bytes"),
        ({"max_tokens": 4}, "exactly one of"),
        ({"prompt": "x", "max_tokens": 4, "temperature": -1.0}, "SamplingConfigError"),
    ],
)
def test_limits_and_bad_options_give_tool_errors(server_url, args, message):
    bad, good = call_http(server_url, [("generate", args), ("tokenize", {"text": "ok"})])
    assert bad.is_error and message in bad.content[0].text, bad.content
    assert not good.is_error


def test_concurrent_clients_each_get_their_own_output(server_url, tiny_model):
    n = 8
    requests = [{"prompt": f"client {i} says", "max_tokens": 16, "temperature": 0.9, "seed": i} for i in range(n)]
    outputs: dict[int, dict] = {}

    async def one(i: int) -> None:
        client, http = http_client(server_url, TOKEN)
        async with http:
            (result,) = await _connect_and_call(client, [("generate", requests[i])], None)
        outputs[i] = result.structured_content

    async def run() -> None:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)

    anyio.run(run)
    for i, request in enumerate(requests):
        expected = tiny_model.generate(request.pop("prompt"), **request)
        assert outputs[i]["text"] == expected.text, i


def test_cancelled_generation_stops_and_frees_the_worker(server_url):
    long = {"prompt": "long", "max_tokens": 480, "ignore_eos": True, **GREEDY}

    async def run() -> tuple[dict, dict]:
        client, http = http_client(server_url, TOKEN)
        async with http, client:
            with anyio.fail_after(CALL_TIMEOUT_S):
                await client.call_tool("generate", long)  # compile the long shape
                before = (await client.call_tool("model_info", {})).structured_content["generations"]
                seen = anyio.Event()

                async def on_progress(value: float, total: float | None, message: str | None) -> None:
                    seen.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: client.call_tool("generate", long, progress_callback=on_progress))
                    await seen.wait()
                    tg.cancel_scope.cancel()
                result = await client.call_tool("generate", {"prompt": "short", "max_tokens": 1, **GREEDY})
                assert not result.is_error
                return before, (await client.call_tool("model_info", {})).structured_content["generations"]

    before, after = anyio.run(run)
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0, after
    assert after["text_chunks"] - before["text_chunks"] < 240, (before, after)


def test_stdio_generate_equals_local_greedy(tiny_llama_gguf, tiny_model):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "serve.mcp_server", "--model", str(tiny_llama_gguf), "--transport", "stdio"],
        cwd=str(ROOT),
    )

    async def run() -> list:
        with anyio.fail_after(CALL_TIMEOUT_S):
            calls = [("generate", {"prompt": "Once upon", "max_tokens": 24, **GREEDY}), ("tokenize", {"text": "t"})]
            return await _connect_and_call(Client(params, cache=None), calls, None)

    result, tokens = anyio.run(run)
    assert result.structured_content["text"] == tiny_model.generate("Once upon", max_tokens=24, **GREEDY).text
    assert tokens.structured_content["token_ids"] == tiny_model.tokenize("t")


def test_refuses_to_bind_beyond_loopback_without_token(tiny_llama_gguf, capsys, monkeypatch):
    monkeypatch.delenv("HYPERJAX_MCP_TOKEN", raising=False)
    assert main(["--model", str(tiny_llama_gguf), "--host", "0.0.0.0"]) == 2
    assert "refusing to bind 0.0.0.0 without a token" in capsys.readouterr().err
    with pytest.raises(ServerConfigError):
        check_bind("192.168.1.5", None)
    check_bind("192.168.1.5", "secret")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)

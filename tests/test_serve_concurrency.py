"""32 clients at once against a real MCP server process: each gets its own prompt's greedy output, none is lost."""

from __future__ import annotations

import time

import anyio

from tests.test_mcp_server import TOKEN, _connect_and_call, call_http, http_client, server_process

CLIENTS = 32
OPTIONS = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def test_32_concurrent_clients_each_get_their_own_greedy_output(tiny_llama_gguf):
    import hyperjax

    model = hyperjax.load(tiny_llama_gguf)
    prompts = [f"client {i} asks about {'abcdefghijklmnopqrstuvwxyz'[i % 26] * (1 + i // 26)}" for i in range(CLIENTS)]
    expected = [model.generate(p, **OPTIONS).text for p in prompts]
    assert len(set(expected)) > CLIENTS // 2  # distinct answers: a swapped reply would be caught
    outputs: dict[int, str] = {}

    with server_process(tiny_llama_gguf, token=TOKEN) as (_, url):
        call_http(url, [("generate", {"prompt": "warm up", **OPTIONS})])

        async def one(i: int) -> None:
            client, http = http_client(url, TOKEN)
            async with http:
                (result,) = await _connect_and_call(client, [("generate", {"prompt": prompts[i], **OPTIONS})], None)
            assert not result.is_error, result.content
            outputs[i] = result.structured_content["text"]

        async def run() -> None:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(CLIENTS):
                        tg.start_soon(one, i)

        t0 = time.perf_counter()
        anyio.run(run)
        elapsed = time.perf_counter() - t0
        (info,) = call_http(url, [("model_info", {})])
    assert [outputs[i] for i in range(CLIENTS)] == expected
    counts = info.structured_content["generations"]
    assert counts["completed"] == CLIENTS + 1 and counts["failed"] == counts["cancelled"] == counts["active"] == 0
    assert elapsed < 60

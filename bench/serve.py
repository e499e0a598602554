"""Serving speed of the MCP server and the hybrid dispatcher's overhead, in one invocation.

A `python -m serve.mcp_server` process on a loopback port serves the model; after a warm-up, 1, 8 and 32 concurrent
clients (each one MCP session over streamable HTTP, requests back to back) share `--requests` greedy generations of
`--max-tokens` tokens: requests/s and p50/p95 latency per level, and the server's RSS before and after them all. Then,
in this process: the median time of a direct `Model.generate`, of the same call through `HybridDispatcher` with
policy local, and through the dispatcher to the server (policy remote: one session per request, as it does), the
three taking turns.

    python bench/serve.py                                  # SmolLM2 Q4_1, 1000 requests, 4 new tokens each
    python bench/serve.py --model path/to.gguf --requests 300 --max-tokens 8

Writes bench/results/serve.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx2
import psutil
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from hyperjax.hybrid import HybridDispatcher, percentile

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: str | None):
    """A server process on a free loopback port; yields (pid, URL) once it accepts connections."""
    port = free_port()
    command = [sys.executable, "-m", "serve.mcp_server", "--port", str(port), "--token", TOKEN, "--max-tokens", "4096"]
    if model:
        command += ["--model", model]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not listen within 300 s")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield proc.pid, f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


def request_args(i: int, max_tokens: int) -> dict:
    return {"prompt": f"Request {i}: a note about", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


async def client_loop(url: str, next_index: Callable[[], int | None], max_tokens: int, latencies: list[float]) -> None:
    """One MCP session making requests back to back until the shared budget is spent."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(600))
    async with http, Client(streamable_http_client(url, http_client=http), cache=None) as client:
        while (i := next_index()) is not None:
            t0 = time.perf_counter()
            result = await client.call_tool("generate", request_args(i, max_tokens))
            if result.is_error:
                raise RuntimeError(f"request {i} failed: {result.content}")
            latencies.append(time.perf_counter() - t0)


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` generations shared by `clients` concurrent sessions: requests/s and latency percentiles."""
    issued = iter(range(requests))
    latencies: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(client_loop, url, lambda: next(issued, None), max_tokens, latencies)

    t0 = time.perf_counter()
    anyio.run(main)
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "max_ms": max(latencies) * 1000,
    }


def medians_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each call, the calls taking turns so that drifting load affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def dispatcher_overhead(model_name: str | None, url: str, max_tokens: int, repeats: int) -> dict:
    """Median ms of a direct local call, the same through the dispatcher (local), and through it to the server."""
    import hyperjax

    model = hyperjax.load(model_name)
    args = request_args(0, max_tokens)
    prompt = args.pop("prompt")
    local = HybridDispatcher(model, policy="local")
    remote = HybridDispatcher(model, url, token=TOKEN, policy="remote", timeout_s=600, retries=0)
    for call in (lambda: model.generate(prompt, **args), lambda: remote.generate(prompt, **args)):
        call()  # compile, open the first connection
    calls = {
        "direct": lambda: model.generate(prompt, **args),
        "local": lambda: local.generate(prompt, **args),
        "remote": lambda: remote.generate(prompt, **args),
    }
    ms = medians_ms(calls, repeats)
    direct, via_local, via_remote = ms["direct"], ms["local"], ms["remote"]
    assert remote.stats()["remote"]["fallbacks"] == 0, "the remote side failed during the benchmark"
    return {
        "repeats": repeats,
        "direct_ms": direct,
        "dispatcher_local_ms": via_local,
        "dispatcher_remote_ms": via_remote,
        "local_overhead_ms": via_local - direct,
        "remote_overhead_ms": via_remote - direct,
    }


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="registered name or GGUF path (default: SmolLM2 Q4_1)")
    parser.add_argument("--requests", type=int, default=1000, help="generations in all, shared by the three levels")
    parser.add_argument("--max-tokens", type=int, default=4, help="new tokens per request (greedy, EOS ignored)")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each dispatcher-overhead measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    if args.requests < len(LEVELS):
        parser.error(f"--requests must be at least {len(LEVELS)}")

    with server(args.model) as (pid, url):
        process = psutil.Process(pid)
        print(f"server pid {pid} at {url}; warming up", flush=True)
        run_level(url, 2, 8, args.max_tokens)
        rss_before = process.memory_info().rss
        levels = []
        for clients, requests in zip(LEVELS, split(args.requests, len(LEVELS)), strict=True):
            levels.append(run_level(url, clients, requests, args.max_tokens))
            print(f"  done: {clients} client(s), {requests} requests", flush=True)
        rss_after = process.memory_info().rss
        overhead = dispatcher_overhead(args.model, url, args.max_tokens, args.repeats)

    print(f"\n{'clients':>8}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for level in levels:
        print(
            f"{level['clients']:>8}{level['requests']:>10}{level['requests_per_s']:>9.2f}{level['p50_ms']:>9.1f}"
            f"{level['p95_ms']:>9.1f}{level['max_ms']:>9.1f}"
        )
    total = sum(level["requests"] for level in levels)
    print(
        f"server RSS: {rss_before / 2**20:.1f} MiB after warm-up, {rss_after / 2**20:.1f} MiB after {total} requests "
        f"({(rss_after - rss_before) / 2**20:+.1f} MiB)"
    )
    print(
        f"median of {overhead['repeats']}: direct {overhead['direct_ms']:.1f} ms · dispatcher, local "
        f"{overhead['dispatcher_local_ms']:.1f} ms ({overhead['local_overhead_ms']:+.2f} ms) · dispatcher, remote "
        f"{overhead['dispatcher_remote_ms']:.1f} ms ({overhead['remote_overhead_ms']:+.1f} ms)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "command": " ".join(sys.argv),
        "max_tokens": args.max_tokens,
    }
    results = {"levels": levels, "rss_before_bytes": rss_before, "rss_after_bytes": rss_after, "overhead": overhead}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The hybrid dispatcher against real MCP server processes on loopback: routing, timeouts, fallback and statistics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from hyperjax.errors import HyperjaxError
from hyperjax.hybrid import HybridDispatcher, LocalLimits, Timing, percentile
from tests.test_mcp_server import TOKEN, free_port, server_process

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_gguf):
    import hyperjax

    return hyperjax.load(tiny_llama_gguf)


@pytest.fixture(scope="module")
def remote_url(tiny_llama_gguf) -> Iterator[str]:
    with server_process(tiny_llama_gguf, token=TOKEN) as (_, url):
        yield url


@pytest.fixture
def stalled_url() -> Iterator[str]:
    """A loopback TCP server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/mcp"
    stop.set()
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()
    listener.close()


def test_remote_answer_equals_local_greedy(remote_url, tiny_model):
    dispatcher = HybridDispatcher(tiny_model, remote_url, token=TOKEN, policy="remote", timeout_s=60)
    progress: list = []
    result = dispatcher.generate("Once upon", max_tokens=20, on_progress=lambda *p: progress.append(p), **GREEDY)
    assert result.side == "remote" and not result.fell_back and result.error is None
    assert result.text == tiny_model.generate("Once upon", max_tokens=20, **GREEDY).text
    assert result.tokens == 20 and result.tokens_per_s > 0 and result.latency_s > 0
    assert progress and all(side == "remote" for side, _ in progress)
    stats = dispatcher.stats()
    assert stats["remote"]["count"] == 1 and stats["remote"]["errors"] == 0 and stats["local"]["count"] == 0


def test_remote_killed_mid_generation_completes_locally(tiny_llama_gguf, tiny_model):
    options = {"max_tokens": 480, "ignore_eos": True, **GREEDY}
    expected = tiny_model.generate("story", **options)
    with server_process(tiny_llama_gguf) as (proc, url):
        dispatcher = HybridDispatcher(tiny_model, url, policy="remote", timeout_s=60, retries=1)
        assert dispatcher.generate("warm", max_tokens=480, ignore_eos=True).side == "remote"  # compile remotely
        killed_at: list[int] = []

        def kill_on_progress(side: str, chunks: int) -> None:
            if side == "remote" and not killed_at:
                proc.kill()
                killed_at.append(chunks)

        t0 = time.perf_counter()
        result = dispatcher.generate("story", on_progress=kill_on_progress, **options)
        elapsed = time.perf_counter() - t0
    assert killed_at == [1]
    assert result.side == "local" and result.fell_back and result.error
    assert result.text == expected.text and result.tokens == 480
    assert elapsed < 30
    stats = dispatcher.stats()
    assert stats["remote"]["count"] == 1 and stats["remote"]["errors"] == 2 and stats["remote"]["fallbacks"] == 1
    assert stats["local"]["count"] == 1 and stats["local"]["fallbacks"] == 1


def test_stalled_remote_times_out_then_falls_back(stalled_url, tiny_model):
    tiny_model.generate("stall", max_tokens=8, **GREEDY)  # compile locally first: time only the dispatch
    dispatcher = HybridDispatcher(tiny_model, stalled_url, policy="prefer-remote", timeout_s=1.0, retries=2)
    t0 = time.perf_counter()
    result = dispatcher.generate("stall", max_tokens=8, **GREEDY)
    elapsed = time.perf_counter() - t0
    assert result.side == "local" and result.fell_back and "RemoteTimeoutError" in result.error
    assert 1.0 <= elapsed < 1.0 + 3.0
    assert dispatcher.stats()["remote"]["errors"] == 1  # a timeout is not retried


def test_wrong_token_falls_back_without_retry(remote_url, tiny_model):
    dispatcher = HybridDispatcher(tiny_model, remote_url, token="wrong", policy="remote", timeout_s=30, retries=3)
    result = dispatcher.generate("hi", max_tokens=4, **GREEDY)
    assert result.side == "local" and result.fell_back
    assert "RemoteRefusedError" in result.error and "Unauthorized" in result.error
    assert dispatcher.stats()["remote"]["errors"] == 1


def test_unreachable_remote_is_retried_then_falls_back(tiny_model):
    url = f"http://127.0.0.1:{free_port()}/mcp"
    dispatcher = HybridDispatcher(tiny_model, url, policy="remote", timeout_s=10, retries=2)
    result = dispatcher.generate("hi", max_tokens=4, **GREEDY)
    assert result.side == "local" and result.fell_back and "ConnectError" in result.error
    assert dispatcher.stats()["remote"]["errors"] == 3


def test_remote_tool_error_falls_back(remote_url, tiny_model):
    dispatcher = HybridDispatcher(tiny_model, remote_url, token=TOKEN, policy="remote", timeout_s=30)
    result = dispatcher.generate("hi", max_tokens=5000, **GREEDY)
    assert result.side == "local" and "max_tokens must be in" in result.error


def test_prefer_local_sends_requests_beyond_local_limits_remote(remote_url, tiny_model):
    limits = LocalLimits(max_tokens=16, max_prompt_bytes=64)
    dispatcher = HybridDispatcher(tiny_model, remote_url, token=TOKEN, local_limits=limits, timeout_s=60)
    assert dispatcher.generate("hi", max_tokens=8, **GREEDY).side == "local"
    assert dispatcher.generate("hi", max_tokens=32, **GREEDY).side == "remote"
    assert dispatcher.generate("x" * 65, max_tokens=8, **GREEDY).side == "remote"
    assert dispatcher.generate([{"role": "user", "content": "y" * 65}], max_tokens=8, **GREEDY).side == "remote"


def test_auto_tries_both_sides_then_prefers_the_faster(remote_url, tiny_model):
    dispatcher = HybridDispatcher(tiny_model, remote_url, token=TOKEN, policy="auto", timeout_s=60, explore=0.0)
    sides = [dispatcher.generate("auto", max_tokens=16, **GREEDY).side for _ in range(2)]
    assert sides == ["remote", "local"]
    stats = dispatcher.stats()
    faster = max(("local", "remote"), key=lambda side: stats[side]["mean_tokens_per_s"])
    assert dispatcher.choose("auto", 16) == faster
    dispatcher.explore = 1.0
    assert dispatcher.choose("auto", 16) != faster


def test_lazy_loader_runs_only_on_fallback(remote_url, tiny_model):
    loads: list[int] = []

    def loader():
        loads.append(1)
        return tiny_model

    dispatcher = HybridDispatcher(loader, remote_url, token=TOKEN, policy="remote", timeout_s=60)
    assert dispatcher.generate("lazy", max_tokens=4, **GREEDY).side == "remote" and not loads
    dispatcher.token = "wrong"
    assert dispatcher.generate("lazy", max_tokens=4, **GREEDY).side == "local" and loads == [1]
    assert dispatcher.generate("lazy", max_tokens=4, **GREEDY).side == "local" and loads == [1]


def test_stats_export_json(tmp_path, tiny_model):
    dispatcher = HybridDispatcher(tiny_model, policy="local")
    result = dispatcher.generate("hi", max_tokens=4, **GREEDY)
    assert result.side == "local" and not result.fell_back
    stats = json.loads(dispatcher.export_stats(tmp_path / "stats.json").read_text())
    assert stats["policy"] == "local" and stats["local"]["count"] == 1
    assert stats["local"]["last_latency_s"] == pytest.approx(result.latency_s)
    assert stats["remote"]["count"] == 0 and stats["remote"]["mean_latency_s"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "fastest"}, "unknown policy"),
        ({"policy": "remote"}, "needs a remote_url"),
        ({"policy": "local", "timeout_s": 0}, "timeout_s must be positive"),
    ],
)
def test_invalid_configuration(tiny_model, kwargs, message):
    with pytest.raises(HyperjaxError, match=message):
        HybridDispatcher(tiny_model, **kwargs)


def test_percentile_matches_numpy_linear():
    import numpy as np

    assert percentile(range(1, 101), 95) == pytest.approx(95.05)
    assert percentile([3.0], 95) == 3.0 and percentile([1.0, 2.0], 50) == 1.5
    sample = list(np.random.default_rng(0).exponential(size=257))
    for q in (0, 50, 95, 99, 100):
        assert percentile(sample, q) == pytest.approx(np.percentile(sample, q))
    with pytest.raises(ValueError):
        percentile([], 95)


def test_timing_summary_exact_and_p95_over_the_window():
    timing = Timing(window=20)
    assert timing.summary() == {"count": 0, "min_s": None, "mean_s": None, "max_s": None, "p95_s": None}
    for ms in range(1, 101):  # 1..100 ms; the window keeps 81..100
        timing.add(ms / 1000)
    summary = timing.summary()
    assert summary["count"] == 100 and summary["min_s"] == 0.001 and summary["max_s"] == 0.1
    assert summary["mean_s"] == pytest.approx(0.0505)
    assert summary["p95_s"] == pytest.approx(percentile([ms / 1000 for ms in range(81, 101)], 95))


def test_timings_per_operation_local_and_remote(remote_url, tiny_model):
    dispatcher = HybridDispatcher(lambda: tiny_model, remote_url, token=TOKEN, policy="local", timeout_s=60)
    for n in (4, 8):
        dispatcher.generate("time me", max_tokens=n, ignore_eos=True, **GREEDY)
    dispatcher.configure(policy="remote")
    remote = dispatcher.generate("time me", max_tokens=8, ignore_eos=True, **GREEDY)
    local, far = dispatcher.stats()["local"]["timings"], dispatcher.stats()["remote"]["timings"]
    assert local["load"]["count"] == 1 and far["load"]["count"] == 0
    assert local["request"]["count"] == local["prefill"]["count"] == local["decode"]["count"] == 2
    assert far["request"]["count"] == far["prefill"]["count"] == far["decode"]["count"] == 1
    assert far["request"]["max_s"] == pytest.approx(remote.latency_s)
    assert far["request"]["mean_s"] > far["prefill"]["mean_s"] + far["decode"]["mean_s"] > 0  # the call's overhead
    for op in ("prefill", "decode", "request"):
        t = local[op]
        assert 0 < t["min_s"] <= t["mean_s"] <= t["max_s"] and t["min_s"] <= t["p95_s"] <= t["max_s"]
    # Each request contains one prefill and one decode, so the means add up (the maxima may come from different calls).
    assert local["request"]["mean_s"] >= local["prefill"]["mean_s"] + local["decode"]["mean_s"] - 1e-9


def test_configure_checks_together_and_keeps_stats(tiny_model):
    dispatcher = HybridDispatcher(tiny_model, policy="local")
    dispatcher.generate("keep", max_tokens=2, **GREEDY)
    with pytest.raises(HyperjaxError, match="needs a remote_url"):
        dispatcher.configure(policy="remote")
    assert dispatcher.policy == "local"
    dispatcher.configure(remote_url="http://127.0.0.1:9/mcp", policy="prefer-remote", retries=0)
    assert (dispatcher.policy, dispatcher.retries) == ("prefer-remote", 0)
    assert dispatcher.stats()["local"]["count"] == 1
    with pytest.raises(HyperjaxError, match="cannot configure"):
        dispatcher.configure(explore=1.0)

"""Hybrid execution: run a generation locally or on a remote hyperjax MCP server, with fallback and statistics.

The remote side is called with the MCP SDK's client over streamable HTTP (one session per request) under a per-call
timeout. A remote that is unreachable, refuses the token or the request, stalls past the timeout, or dies mid-call
is retried only where a retry can help (connection failures, `retries` times) and otherwise answered locally from the
start: the caller always gets a complete answer and learns which side produced it.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from hyperjax.config import POLICIES
from hyperjax.errors import HyperjaxError
from hyperjax.serve_mcp import UNAUTHORIZED_CODE

if TYPE_CHECKING:
    from hyperjax.api import Model

Policy = Literal["local", "remote", "prefer-local", "prefer-remote", "auto"]
Side = Literal["local", "remote"]
Prompt = str | Sequence[dict[str, str]]
ProgressFn = Callable[[Side, int], None]


class RemoteError(HyperjaxError):
    """The remote server failed a request: unreachable, died mid-call, or answered with an error."""

    retryable = True


class RemoteTimeoutError(RemoteError):
    """The remote server did not answer within the per-call timeout."""

    retryable = False


class RemoteRefusedError(RemoteError):
    """The remote server refused the request (token, limits, invalid options); retrying cannot help."""

    retryable = False


@dataclass(frozen=True)
class LocalLimits:
    """Requests beyond these go remote under `prefer-local` (a fallback still runs them locally)."""

    max_tokens: int = 256
    max_prompt_bytes: int = 16 * 1024


@dataclass
class HybridResult:
    text: str
    side: Side
    fell_back: bool
    latency_s: float
    tokens_per_s: float
    error: str | None = None  # why the remote was abandoned, when fell_back
    tokens: int = 0
    finish_reason: str = ""


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default method)."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Timing:
    """Durations of one operation: count, min, mean and max over all; p95 over the latest `window` samples."""

    def __init__(self, window: int = 10_000):
        self.count = 0
        self.total_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.min_s = min(self.min_s, seconds)
        self.max_s = max(self.max_s, seconds)
        self.recent.append(seconds)

    def summary(self) -> dict[str, float | int | None]:
        if not self.count:
            return {"count": 0, "min_s": None, "mean_s": None, "max_s": None, "p95_s": None}
        return {
            "count": self.count,
            "min_s": self.min_s,
            "mean_s": self.total_s / self.count,
            "max_s": self.max_s,
            "p95_s": percentile(self.recent, 95),
        }


OPERATIONS = ("load", "compile", "prefill", "decode", "request")


@dataclass
class SideStats:
    """Counters and per-operation timings of one side. `tokens_per_s` is end to end (tokens over request latency).

    Operations: load (the local model), compile, prefill and decode (per generation; the remote side's as its server
    measured them), request (one whole generation as the caller waits for it: for the remote side, the remote call).
    """

    count: int = 0
    errors: int = 0
    fallbacks: int = 0
    tokens: int = 0
    last_latency_s: float | None = None
    total_latency_s: float = 0.0
    last_tokens_per_s: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))
    timings: dict[str, Timing] = field(default_factory=lambda: {op: Timing() for op in OPERATIONS})

    def record(self, latency_s: float, tokens: int) -> None:
        self.timings["request"].add(latency_s)
        self.count += 1
        self.tokens += tokens
        self.last_latency_s = latency_s
        self.total_latency_s += latency_s
        self.last_tokens_per_s = tokens / latency_s if latency_s > 0 else 0.0
        self.recent.append(self.last_tokens_per_s)

    def record_error(self) -> None:
        self.errors += 1
        self.recent.append(0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "tokens": self.tokens,
            "last_latency_s": self.last_latency_s,
            "mean_latency_s": self.total_latency_s / self.count if self.count else None,
            "last_tokens_per_s": self.last_tokens_per_s,
            "mean_tokens_per_s": self.tokens / self.total_latency_s if self.total_latency_s > 0 else None,
            "timings": {op: timing.summary() for op, timing in self.timings.items()},
        }


def _leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _classify(exc: BaseException, timeout_s: float) -> RemoteError:
    leaf = _leaf(exc)
    if isinstance(leaf, TimeoutError):
        return RemoteTimeoutError(f"no answer within {timeout_s:g} s")
    if isinstance(leaf, MCPError) and leaf.code == UNAUTHORIZED_CODE:
        return RemoteRefusedError(str(leaf))
    return RemoteError(f"{type(leaf).__name__}: {leaf}")


class HybridDispatcher:
    """Sends each generation to the local model or a remote MCP server according to `policy`.

    `local` is a loaded model, or a function that loads one on first need (a fallback may be the first need).
    `auto` picks the side with the best recent end-to-end tokens/s and explores the other with probability `explore`.
    `generate` is synchronous (it runs its own event loop for the remote call): from async code, call it in a thread.
    """

    def __init__(
        self,
        local: Model | Callable[[], Model] | None,
        remote_url: str | None = None,
        *,
        token: str | None = None,
        policy: Policy = "prefer-local",
        timeout_s: float = 60.0,
        retries: int = 1,
        local_limits: LocalLimits = LocalLimits(),
        explore: float = 0.1,
        seed: int = 0,
    ):
        self._local = local
        self._sides: dict[Side, SideStats] = {"local": SideStats(), "remote": SideStats()}
        self._stats_lock = threading.Lock()
        self._local_lock = threading.Lock()
        self.remote_url: str | None = None
        self.token: str | None = None
        self.policy: Policy = "local"
        self.timeout_s = timeout_s
        self.retries = retries
        self.configure(remote_url=remote_url, token=token, policy=policy, timeout_s=timeout_s, retries=retries)
        self.local_limits = local_limits
        self.explore = explore
        self._rng = random.Random(seed)
        self._record_load(local)

    def configure(self, **changes: Any) -> None:
        """Change any of remote_url, token, policy, timeout_s, retries at once, checked together; statistics stay."""
        unknown = set(changes) - {"remote_url", "token", "policy", "timeout_s", "retries"}
        if unknown:
            raise HyperjaxError(f"cannot configure {', '.join(sorted(unknown))}")
        new = {k: getattr(self, k) for k in ("remote_url", "token", "policy", "timeout_s", "retries")} | changes
        if new["policy"] not in POLICIES:
            raise HyperjaxError(f"unknown policy {new['policy']!r}; choose one of {', '.join(POLICIES)}")
        if self._local is None and (new["remote_url"] is None or new["policy"] == "local"):
            raise HyperjaxError("a dispatcher needs a local model, and a remote URL for any policy but 'local'")
        if new["remote_url"] is None and new["policy"] in ("remote", "prefer-remote"):
            raise HyperjaxError(f"policy {new['policy']!r} needs a remote_url")
        if new["timeout_s"] <= 0 or new["retries"] < 0:
            raise HyperjaxError("timeout_s must be positive and retries non-negative")
        for key, value in new.items():
            setattr(self, key, value)

    def set_local(self, local: Model | Callable[[], Model]) -> None:
        """Use another local model (or loader) from now on."""
        with self._local_lock:
            self._local = local
        self._record_load(local)

    def _record_load(self, local: Model | Callable[[], Model] | None) -> None:
        seconds = getattr(local, "load_seconds", 0.0)
        if isinstance(seconds, float) and seconds > 0:
            with self._stats_lock:
                self._sides["local"].timings["load"].add(seconds)

    # ---- routing ----------------------------------------------------------------------------------------------------

    def choose(self, prompt: Prompt, max_tokens: int) -> Side:
        """The side the policy picks for a request (before any fallback)."""
        if self.remote_url is None or self.policy == "local":
            return "local"
        if self.policy in ("remote", "prefer-remote") or self._local is None:
            return "remote"
        if self.policy == "prefer-local":
            return "remote" if self._exceeds_local(prompt, max_tokens) else "local"
        with self._stats_lock:
            recent = {side: list(s.recent) for side, s in self._sides.items()}
        untried = [side for side in ("remote", "local") if not recent[side]]
        if untried:
            return untried[0]
        best: Side = max(("local", "remote"), key=lambda side: sum(recent[side]) / len(recent[side]))
        if self._rng.random() < self.explore:
            return "remote" if best == "local" else "local"
        return best

    def _exceeds_local(self, prompt: Prompt, max_tokens: int) -> bool:
        text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
        limits = self.local_limits
        return max_tokens > limits.max_tokens or len(text.encode()) > limits.max_prompt_bytes

    # ---- generation -------------------------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, *, on_progress: ProgressFn | None = None, **options: Any) -> HybridResult:
        """Generate on the chosen side; options are those of `Model.generate` (max_tokens, temperature, seed...).

        `on_progress(side, chunks)` is told of each decoded chunk; after a fallback the count restarts locally.
        """
        side = self.choose(prompt, int(options.get("max_tokens", 128)))
        if side == "local":
            return self._run_local(prompt, options, on_progress, fell_back=False, error=None)
        try:
            return self._run_remote(prompt, options, on_progress)
        except RemoteError as exc:
            if self._local is None:
                raise
            with self._stats_lock:
                self._sides["remote"].fallbacks += 1
                self._sides["local"].fallbacks += 1
            return self._run_local(prompt, options, on_progress, fell_back=True, error=f"{type(exc).__name__}: {exc}")

    def _model(self) -> Model:
        if callable(self._local) and not hasattr(self._local, "generate"):
            t0 = time.perf_counter()
            self._local = self._local()
            with self._stats_lock:
                self._sides["local"].timings["load"].add(time.perf_counter() - t0)
        assert self._local is not None
        return self._local

    def local_model(self) -> Model:
        """The local model, loading it first if a loader was given."""
        with self._local_lock:
            return self._model()

    def _run_local(
        self,
        prompt: Prompt,
        options: dict[str, Any],
        on_progress: ProgressFn | None,
        fell_back: bool,
        error: str | None,
    ) -> HybridResult:
        chunks = 0

        def on_text(_: str) -> None:
            nonlocal chunks
            chunks += 1
            if on_progress is not None:
                on_progress("local", chunks)

        with self._local_lock:
            model = self._model()
            t0 = time.perf_counter()
            try:
                result = model.generate(prompt, on_text=on_text, **options)
            except Exception:
                with self._stats_lock:
                    self._sides["local"].record_error()
                raise
            latency = time.perf_counter() - t0
        tokens = len(result.token_ids)
        phases = {
            "compile": result.timings.get("compile_seconds", 0.0),
            "prefill": result.prefill_seconds,
            "decode": result.decode_seconds,
        }
        with self._stats_lock:
            self._sides["local"].record(latency, tokens)
            self._time_phases("local", phases)
        return HybridResult(
            result.text, "local", fell_back, latency, tokens / latency, error, tokens, result.finish_reason
        )

    def _run_remote(self, prompt: Prompt, options: dict[str, Any], on_progress: ProgressFn | None) -> HybridResult:
        arguments = {"prompt": prompt} if isinstance(prompt, str) else {"messages": [dict(m) for m in prompt]}
        arguments |= {k: list(v) if k == "stop" else v for k, v in options.items()}
        attempts_left = self.retries + 1
        while True:
            t0 = time.perf_counter()
            try:
                output = anyio.run(self._call_tool, "generate", arguments, on_progress)
            except RemoteError as exc:
                error = exc
            except Exception as exc:  # any failure of the remote side is a reason to fall back
                error = _classify(exc, self.timeout_s)
            else:
                latency = time.perf_counter() - t0
                tokens = int(output["tokens"])
                phases = {phase: output.get(f"{phase}_seconds") for phase in ("prefill", "decode")}
                with self._stats_lock:
                    self._sides["remote"].record(latency, tokens)
                    self._time_phases("remote", phases)
                return HybridResult(
                    output["text"], "remote", False, latency, tokens / latency, None, tokens, output["finish_reason"]
                )
            with self._stats_lock:
                self._sides["remote"].record_error()
            attempts_left -= 1
            if not error.retryable or attempts_left == 0:
                raise error

    def _time_phases(self, side: Side, phases: dict[str, float | None]) -> None:
        for phase, seconds in phases.items():
            if seconds is not None and (seconds > 0 or phase != "compile"):
                self._sides[side].timings[phase].add(float(seconds))

    def remote_info(self) -> dict[str, Any]:
        """The remote server's `model_info` (model, limits, generation counts); RemoteError if it cannot answer."""
        if self.remote_url is None:
            raise RemoteError("no remote server is configured")
        try:
            return anyio.run(self._call_tool, "model_info", {}, None)
        except RemoteError:
            raise
        except Exception as exc:
            raise _classify(exc, self.timeout_s) from None

    async def _call_tool(self, tool: str, arguments: dict[str, Any], on_progress: ProgressFn | None) -> dict[str, Any]:
        async def progress(value: float, total: float | None, message: str | None) -> None:
            if on_progress is not None:
                on_progress("remote", int(value))

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with anyio.fail_after(self.timeout_s):
            async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(self.timeout_s)) as http:
                transport = streamable_http_client(self.remote_url, http_client=http)
                async with Client(transport, cache=None) as client:
                    result = await client.call_tool(tool, arguments, progress_callback=progress)
        if result.is_error:
            message = " ".join(getattr(c, "text", "") for c in result.content)
            raise RemoteRefusedError(f"remote tool error: {message}")
        if not isinstance(result.structured_content, dict):
            raise RemoteError("remote answered without structured content")
        return result.structured_content

    # ---- statistics -------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per side: count, errors, fallbacks, tokens, last and mean latency, last and mean tokens/s, and timings
        per operation (count, min, mean, max, p95 in seconds)."""
        with self._stats_lock:
            sides = {side: s.as_dict() for side, s in self._sides.items()}
        config = {"policy": self.policy, "remote_url": self.remote_url, "timeout_s": self.timeout_s}
        return config | {"retries": self.retries, "local_limits": asdict(self.local_limits)} | sides

    def export_stats(self, path: str | Path) -> Path:
        """Write `stats()` as JSON to `path`."""
        path = Path(path)
        path.write_text(json.dumps(self.stats(), indent=2) + "\n")
        return path

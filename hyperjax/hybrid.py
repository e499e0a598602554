"""Hybrid execution: run a generation locally or on a remote hyperjax MCP server, with fallback and statistics.

The remote side is called with the MCP SDK's client over streamable HTTP (one session per request) under a per-call
timeout. A remote that is unreachable, refuses the token or the request, stalls past the timeout, or dies mid-call
is retried only where a retry can help (connection failures, `retries` times) and otherwise answered locally from the
start: the caller always gets a complete answer and learns which side produced it.
"""

from __future__ import annotations

import json
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

from hyperjax.errors import HyperjaxError
from hyperjax.serve_mcp import UNAUTHORIZED_CODE

if TYPE_CHECKING:
    from hyperjax.api import Model

Policy = Literal["local", "remote", "prefer-local", "prefer-remote", "auto"]
Side = Literal["local", "remote"]
POLICIES: tuple[str, ...] = ("local", "remote", "prefer-local", "prefer-remote", "auto")
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


@dataclass
class SideStats:
    """Counters of one side. `tokens_per_s` is end to end (generated tokens over request latency)."""

    count: int = 0
    errors: int = 0
    fallbacks: int = 0
    tokens: int = 0
    last_latency_s: float | None = None
    total_latency_s: float = 0.0
    last_tokens_per_s: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))

    def record(self, latency_s: float, tokens: int) -> None:
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
        if policy not in POLICIES:
            raise HyperjaxError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if local is None and (remote_url is None or policy == "local"):
            raise HyperjaxError("a dispatcher needs a local model, and a remote URL for any policy but 'local'")
        if remote_url is None and policy in ("remote", "prefer-remote"):
            raise HyperjaxError(f"policy {policy!r} needs a remote_url")
        if timeout_s <= 0 or retries < 0:
            raise HyperjaxError("timeout_s must be positive and retries non-negative")
        self._local = local
        self.remote_url = remote_url
        self.token = token
        self.policy = policy
        self.timeout_s = timeout_s
        self.retries = retries
        self.local_limits = local_limits
        self.explore = explore
        self._rng = random.Random(seed)
        self._sides: dict[Side, SideStats] = {"local": SideStats(), "remote": SideStats()}
        self._stats_lock = threading.Lock()
        self._local_lock = threading.Lock()

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
            self._local = self._local()
        assert self._local is not None
        return self._local

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
        with self._stats_lock:
            self._sides["local"].record(latency, tokens)
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
                output = anyio.run(self._call_remote, arguments, on_progress)
            except RemoteError as exc:
                error = exc
            except Exception as exc:  # any failure of the remote side is a reason to fall back
                error = _classify(exc, self.timeout_s)
            else:
                latency = time.perf_counter() - t0
                tokens = int(output["tokens"])
                with self._stats_lock:
                    self._sides["remote"].record(latency, tokens)
                return HybridResult(
                    output["text"], "remote", False, latency, tokens / latency, None, tokens, output["finish_reason"]
                )
            with self._stats_lock:
                self._sides["remote"].record_error()
            attempts_left -= 1
            if not error.retryable or attempts_left == 0:
                raise error

    async def _call_remote(self, arguments: dict[str, Any], on_progress: ProgressFn | None) -> dict[str, Any]:
        async def progress(value: float, total: float | None, message: str | None) -> None:
            if on_progress is not None:
                on_progress("remote", int(value))

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with anyio.fail_after(self.timeout_s):
            async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(self.timeout_s)) as http:
                transport = streamable_http_client(self.remote_url, http_client=http)
                async with Client(transport, cache=None) as client:
                    result = await client.call_tool("generate", arguments, progress_callback=progress)
        if result.is_error:
            message = " ".join(getattr(c, "text", "") for c in result.content)
            raise RemoteRefusedError(f"remote tool error: {message}")
        if not isinstance(result.structured_content, dict):
            raise RemoteError("remote answered without structured content")
        return result.structured_content

    # ---- statistics -------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per side: count, errors, fallbacks, tokens, last and mean latency, last and mean tokens/s."""
        with self._stats_lock:
            sides = {side: s.as_dict() for side, s in self._sides.items()}
        config = {"policy": self.policy, "remote_url": self.remote_url, "timeout_s": self.timeout_s}
        return config | {"retries": self.retries, "local_limits": asdict(self.local_limits)} | sides

    def export_stats(self, path: str | Path) -> Path:
        """Write `stats()` as JSON to `path`."""
        path = Path(path)
        path.write_text(json.dumps(self.stats(), indent=2) + "\n")
        return path

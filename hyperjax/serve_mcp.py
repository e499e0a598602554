"""A Model Context Protocol server over one loaded model: tools `generate`, `tokenize` and `model_info`.

Transports: streamable HTTP (default, bound to 127.0.0.1) and stdio. Generations run one at a time on a worker thread
in arrival order, so outputs of concurrent clients never interleave; each streams progress notifications (one per
decoded text chunk, the chunk as the message) and stops when its request is cancelled. Over HTTP a bearer token is
required whenever the server binds beyond loopback.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

from hyperjax import __version__
from hyperjax.config import Config, load_config
from hyperjax.errors import HyperjaxError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from hyperjax.api import Model
    from hyperjax.generate import GenerationResult

TOKEN_ENV = "HYPERJAX_MCP_TOKEN"
UNAUTHORIZED_CODE = -32001


class ServerConfigError(HyperjaxError, ValueError):
    """The server's options are unsafe or inconsistent (e.g. binding beyond loopback without a token)."""


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits; a request beyond them gets a tool error, not a crash."""

    max_prompt_bytes: int = 64 * 1024
    max_tokens: int = 1024


class ChatMessage(BaseModel):
    role: str
    content: str


class GenerationOutput(BaseModel):
    text: str
    finish_reason: str
    tokens: int
    prompt_tokens: int
    prompt_tokens_per_second: float | None
    generation_tokens_per_second: float | None
    prefill_seconds: float
    decode_seconds: float


class TokenizeOutput(BaseModel):
    token_ids: list[int]
    count: int


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


class GenerationQueue:
    """Runs generations one at a time on a worker thread, first come first served, and counts them.

    `active` counts requests queued or running, the next three finished requests by outcome, `text_chunks` the
    decoded chunks streamed (about one per token), so a cancelled request shows how far it went.
    """

    def __init__(self, model: Model):
        self.model = model
        self.counts = {"active": 0, "completed": 0, "failed": 0, "cancelled": 0, "text_chunks": 0}
        self._limiter = anyio.CapacityLimiter(1)

    async def run(self, ctx: Context, prompt: str | list[dict[str, str]], options: dict[str, Any]) -> GenerationResult:
        """Generate in turn; stream chunks as progress; a cancelled request stops at its next token."""
        total = float(options["max_tokens"])
        chunks = 0

        def on_text(chunk: str) -> None:
            nonlocal chunks
            anyio.from_thread.check_cancelled()
            chunks += 1
            self.counts["text_chunks"] += 1
            anyio.from_thread.run(ctx.report_progress, float(chunks), total, chunk)

        def work() -> GenerationResult:
            anyio.from_thread.check_cancelled()
            return self.model.generate(prompt, on_text=on_text, **options)

        self.counts["active"] += 1
        outcome = "failed"
        try:
            result = await anyio.to_thread.run_sync(work, limiter=self._limiter)
            outcome = "completed"
            return result
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            self.counts["active"] -= 1
            self.counts[outcome] += 1


def _check_limits(limits: ServerLimits, prompt: str | None, messages: list[ChatMessage] | None, max_tokens: int):
    if (prompt is None) == (messages is None):
        raise ToolError("give exactly one of `prompt` (text) or `messages` (chat turns)")
    size = len(prompt.encode()) if prompt is not None else sum(len(m.content.encode()) for m in messages or ())
    if size > limits.max_prompt_bytes:
        raise ToolError(f"prompt is {size} bytes; this server accepts at most {limits.max_prompt_bytes}")
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ToolError(f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}")


def build_server(model: Model, limits: ServerLimits = ServerLimits()) -> MCPServer:
    """The MCP server exposing `model`; it owns one generation queue."""
    server = MCPServer(
        "hyperjax",
        version=__version__,
        instructions="Text generation with a local int4 language model. Call model_info for its details.",
        log_level="WARNING",
    )
    queue = GenerationQueue(model)

    @server.tool()
    async def generate(
        ctx: Context,
        prompt: str | None = None,
        messages: list[ChatMessage] | None = None,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        chat: bool = False,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationOutput:
        """Continue `prompt` (or answer it as a user turn with chat=true), or answer chat `messages`.

        Temperature 0 is greedy. Progress notifications carry each decoded text chunk as it is produced.
        """
        _check_limits(limits, prompt, messages, max_tokens)
        options = dict(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            chat=chat,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        source = prompt if prompt is not None else [m.model_dump() for m in messages or ()]
        try:
            result = await queue.run(ctx, source, options)
        except HyperjaxError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
        return GenerationOutput(
            text=result.text,
            finish_reason=result.finish_reason,
            tokens=len(result.token_ids),
            prompt_tokens=result.prompt_tokens,
            prompt_tokens_per_second=_finite(result.prompt_tokens_per_second),
            generation_tokens_per_second=_finite(result.generation_tokens_per_second),
            prefill_seconds=result.prefill_seconds,
            decode_seconds=result.decode_seconds,
        )

    @server.tool()
    def tokenize(text: str, add_bos: bool = False) -> TokenizeOutput:
        """Token ids of `text` under the model's tokenizer (special tokens parsed)."""
        if len(text.encode()) > limits.max_prompt_bytes:
            raise ToolError(f"text exceeds this server's limit of {limits.max_prompt_bytes} bytes")
        ids = model.tokenize(text, add_bos=add_bos)
        return TokenizeOutput(token_ids=ids, count=len(ids))

    @server.tool()
    def model_info() -> dict[str, Any]:
        """The served model (architecture, hyper-parameters, weight formats, memory), limits and generation counts."""
        info = json.loads(json.dumps(model.info(), default=str))
        limits_info = {"max_prompt_bytes": limits.max_prompt_bytes, "max_tokens": limits.max_tokens}
        return info | {"limits": limits_info, "generations": dict(queue.counts)}

    return server


class BearerAuth:
    """ASGI middleware: HTTP requests without `Authorization: Bearer <token>` get 401 and a JSON-RPC error body."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await self._refuse(send, "missing" if not given else "wrong")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send: Send, what: str) -> None:
        error = {"code": UNAUTHORIZED_CODE, "message": f"Unauthorized: {what} bearer token for this hyperjax server"}
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="hyperjax"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve HTTP beyond loopback without a bearer token."""
    if not token and not is_loopback(host):
        raise ServerConfigError(f"refusing to bind {host} without a token: pass --token or set ${TOKEN_ENV}")


def http_app(server: MCPServer, host: str, token: str | None) -> ASGIApp:
    """The streamable-HTTP ASGI app at /mcp, behind bearer auth when a token is set (required beyond loopback)."""
    check_bind(host, token)
    app = server.streamable_http_app(host=host)
    return BearerAuth(app, token) if token else app


def serve_http(server: MCPServer, host: str, port: int, token: str | None) -> None:
    import uvicorn

    app = http_app(server, host, token)
    print(f"hyperjax MCP server on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def parse_args(argv: Sequence[str] | None, config: Config | None = None) -> argparse.Namespace:
    """Options; their defaults come from `config` (the [model], [memory] and [server] sections)."""
    c = config or Config()
    p = argparse.ArgumentParser(prog="hyperjax serve", description="Serve a model over the Model Context Protocol.")
    p.add_argument("--model", default=c.model.name, help="GGUF path or registered model name (default model)")
    p.add_argument("--transport", choices=("http", "stdio"), default="http")
    p.add_argument("--host", default=c.server.host, help="HTTP bind address (beyond loopback a token is required)")
    p.add_argument("--port", type=int, default=c.server.port)
    p.add_argument("--token", default=None, help=f"bearer token HTTP clients must send (default ${TOKEN_ENV})")
    p.add_argument("--max-prompt-bytes", type=int, default=c.server.max_prompt_bytes)
    p.add_argument("--max-tokens", type=int, default=c.server.max_tokens)
    p.add_argument("--memory-budget", default=c.memory.budget, help="stream decoder blocks under a budget, e.g. 64MB")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`hyperjax serve`: load the model once, then serve it until interrupted (config file and env give defaults)."""
    try:
        config = load_config().config
    except HyperjaxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv, config)
    token = args.token or os.environ.get(TOKEN_ENV) or config.server.token
    try:
        if args.transport == "http":
            check_bind(args.host, token)
        if args.max_prompt_bytes < 1 or args.max_tokens < 1:
            raise ServerConfigError("--max-prompt-bytes and --max-tokens must be positive")
        import hyperjax

        model = hyperjax.load(args.model, memory_budget=args.memory_budget)
    except HyperjaxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = build_server(model, ServerLimits(args.max_prompt_bytes, args.max_tokens))
    if args.transport == "stdio":
        server.run("stdio")
    else:
        serve_http(server, args.host, args.port, token)
    return 0

"""The `hyperjax` command: generate, tokenize, model info, pull."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hyperjax.errors import HyperjaxError

app = typer.Typer(
    name="hyperjax",
    help="Small, fast language models in JAX: int4 GGUF inference on your CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
err = Console(stderr=True)

ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Registered model name or path to a GGUF file.")]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue (or the user's message with --chat).")],
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.8,
    top_k: Annotated[int, typer.Option(min=0)] = 40,
    top_p: Annotated[float, typer.Option()] = 0.95,
    min_p: Annotated[float, typer.Option()] = 0.05,
    repeat_penalty: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is produced.")] = True,
    stats: Annotated[bool, typer.Option("--stats", help="Also print memory by weight format.")] = False,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="Stream decoder blocks from the file to keep weights under e.g. 64MB."),
    ] = None,
) -> None:
    """Generate text from PROMPT with a quantized model, then print speed and memory."""
    from hyperjax.api import load
    from hyperjax.memory import peak_rss_bytes

    llm = load(model, progress=True, memory_budget=memory_budget)

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = llm.generate(
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        seed=seed,
        chat=chat,
        on_text=on_text if stream else None,
    )
    if not stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    compile_s = result.timings.get("compile_seconds", 0.0)
    err.print(
        f"[dim]prompt {result.prompt_tokens} tok at {result.prompt_tokens_per_second:.1f} tok/s · "
        f"generated {len(result.token_ids)} tok at {result.generation_tokens_per_second:.1f} tok/s "
        f"({result.finish_reason}) · compile {compile_s:.1f} s · load {llm.load_seconds:.1f} s · "
        f"peak RSS {_mib(peak_rss_bytes())}[/dim]",
        soft_wrap=True,
    )
    if stats:
        _print_memory(llm.info()["memory"])


def _print_memory(report: dict) -> None:
    table = Table(title="weights in memory by format")
    for column in ("format", "tensors", "parameters", "bytes", "bits/param"):
        table.add_column(column, justify="right")
    for fmt, row in sorted(report.get("weights_by_format", {}).items()):
        bits = 8 * row["bytes"] / max(row["params"], 1)
        table.add_row(fmt, str(row["tensors"]), f"{row['params']:,}", _mib(row["bytes"]), f"{bits:.2f}")
    err.print(table)
    err.print(
        f"RSS {_mib(report['rss_bytes'])} · peak RSS {_mib(report['peak_rss_bytes'])} · "
        f"JAX live buffers {_mib(report['jax_live_buffer_bytes'])}"
    )
    if "memory_budget_bytes" in report:
        err.print(
            f"memory budget {_mib(report['memory_budget_bytes'])} · weights resident at peak "
            f"{_mib(report['resident_weight_bytes_peak'])} · {report['layer_loads']} block loads from the file"
        )


@app.command()
def tokenize(
    text: Annotated[str, typer.Argument(help="Text to tokenize; special tokens like <|im_start|> are parsed.")],
    model: ModelOption = None,
) -> None:
    """Print the token ids of TEXT and the piece each id stands for."""
    from hyperjax.api import load

    llm = load(model, progress=True)
    ids = llm.tokenize(text)
    typer.echo(" ".join(str(i) for i in ids))
    for i in ids:
        err.print(f"{i:>6}  {llm.tokenizer.token_bytes(i)!r}")


@model_app.command("info")
def model_info(
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Architecture, parameter count, and bytes by tensor type, in the file and in memory."""
    from hyperjax.api import load

    info = load(model, progress=True).info()
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    file = info["file"]
    console = Console()
    console.print(f"[bold]{info['name']}[/bold]  {info['path']}")
    console.print(f"architecture {file['architecture']} · {file['parameters']:,} parameters")
    console.print(", ".join(f"{k}={v}" for k, v in info["config"].items()))
    table = Table(title="tensors in the file by type")
    for column in ("type", "tensors", "bytes"):
        table.add_column(column, justify="right")
    for ggml_type, count in sorted(file["tensors_by_type"].items()):
        table.add_row(ggml_type, str(count), _mib(file["bytes_by_type"][ggml_type]))
    console.print(table)
    _print_memory(info["memory"])


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve the model over MCP (streamable HTTP or stdio); `hyperjax serve --help` lists the options."""
    from hyperjax.serve_mcp import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Decode/prefill speed against llama.cpp, side by side; `hyperjax bench --help` lists the options."""
    from hyperjax.benchmark import main as bench_main

    bench_main(list(ctx.args))


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Registered model name.")] = "smollm2-135m") -> None:
    """Fetch a registered model into the cache and verify its checksum."""
    from hyperjax.io.registry import ensure_model

    typer.echo(str(ensure_model(name, progress=True)))


def main() -> None:
    """Console entry point: named hyperjax errors become one clear line and exit status 1."""
    try:
        app()
    except HyperjaxError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)

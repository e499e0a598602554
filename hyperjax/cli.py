"""The `hyperjax` command: generate, tokenize, model info, pull."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hyperjax.errors import HyperjaxError
from hyperjax.train.command import generate_bytes, is_byte_model, quantize_command, train_command

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
ConfigOption = Annotated[
    str | None, typer.Option("--config", help="TOML config file (default ./hyperjax.toml, else $HYPERJAX_HOME's).")
]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue (or the user's message with --chat).")],
    model: ModelOption = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", min=1, help="[default: 128]")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="[default: 0.8]")] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="[default: 40]")] = None,
    top_p: Annotated[float | None, typer.Option(help="[default: 0.95]")] = None,
    min_p: Annotated[float | None, typer.Option(help="[default: 0.05]")] = None,
    repeat_penalty: Annotated[float | None, typer.Option(help="[default: 1.0]")] = None,
    seed: Annotated[int | None, typer.Option(help="[default: 0]")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is produced.")] = True,
    stats: Annotated[bool, typer.Option("--stats", help="Also print memory by weight format.")] = False,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="Stream decoder blocks from the file to keep weights under e.g. 64MB."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Generate text from PROMPT with a quantized model, then print speed and memory.

    Unset options come from the config file and HYPERJAX_<SECTION>_<KEY> variables (flags > env > file > defaults).
    """
    from hyperjax.api import load
    from hyperjax.config import load_config
    from hyperjax.memory import peak_rss_bytes

    flags = {"model.name": model, "memory.budget": memory_budget}
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty)
    flags |= {f"sampling.{k}": v for k, v in (given | {"seed": seed, "max_tokens": max_tokens}).items()}
    cfg = load_config(config, flags=flags).config
    sampling = {k: getattr(cfg.sampling, k) for k in cfg.sampling.__dataclass_fields__}
    if is_byte_model(cfg.model.name):  # a `hyperjax train` run or a `hyperjax quantize` output
        generate_bytes(cfg.model.name, prompt, sampling, stream)
        return
    llm = load(cfg.model.name, progress=True, memory_budget=cfg.memory.budget)

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = llm.generate(prompt, **sampling, chat=chat, on_text=on_text if stream else None)
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
    console.print(f"kernels: {info.get('kernels', 'jax')}")
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
def shell(model: ModelOption = None, config: ConfigOption = None) -> None:
    """Interactive shell: generate, tokenize, model, config, mcp, hybrid, stats (`hyperjax` alone on a terminal)."""
    from hyperjax.shell import run_shell

    raise typer.Exit(run_shell(config, model))


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Registered model name.")] = "smollm2-135m") -> None:
    """Fetch a registered model into the cache and verify its checksum."""
    from hyperjax.io.registry import ensure_model

    typer.echo(str(ensure_model(name, progress=True)))


@app.command("export")
def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Registered model name, a GGUF file, or a byte model: a `hyperjax train` run or `quantize` output."
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Directory to write (created if needed).")],
    platforms: Annotated[str, typer.Option(help="Comma-separated jax platforms, e.g. cpu,cuda.")] = "cpu",
    max_context: Annotated[
        int | None, typer.Option(help="KV cache capacity, prompt plus output (default min(1024, model's)).")
    ] = None,
    target: Annotated[str, typer.Option(help="jax (jax.export) or iree (compiled .vmfb for this CPU).")] = "jax",
    max_bucket: Annotated[
        int | None,
        typer.Option(help="Largest prefill chunk, 16…256 (default 256; 32 for iree): smaller lowers peak memory."),
    ] = None,
) -> None:
    """Export MODEL for the lean runner `hyperjax-run`: functions, weights, tokenizer, manifest."""
    from hyperjax.export import export_model

    names = [p.strip() for p in platforms.split(",") if p.strip()]
    export_model(
        model, out, platforms=names, max_context=max_context, target=target, max_bucket=max_bucket, log=err.print
    )
    typer.echo(out)


@app.command()
def sparsify(
    model: Annotated[str, typer.Argument(help="Registered model name or path to a dense GGUF.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Path of the sparse GGUF to write.")],
    sparsity: Annotated[float | None, typer.Option(help="Fraction of each row's weights to prune, in [0, 1).")] = None,
    pattern: Annotated[str | None, typer.Option(help="N:M structured pruning instead, e.g. 2:4.")] = None,
    eval_tokens: Annotated[int, typer.Option(min=2, help="Held-out tokens scored for perplexity.")] = 2048,
    eval_text: Annotated[
        str | None, typer.Option(help="Text whose last 10 % is held out (default: Tiny Shakespeare).")
    ] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Compare perplexity, dense vs sparse.")] = True,
) -> None:
    """Prune the decoder's linear weights by magnitude into sparse 4-bit CSR; report sizes and perplexity."""
    from hyperjax.io.registry import ensure_model
    from hyperjax.sparsify import KEPT_DENSE, compare_perplexity, heldout_text, parse_sparsity, sparsify_file

    spec = parse_sparsity(sparsity, pattern)
    text = heldout_text(eval_text, eval_tokens) if evaluate else None
    report = sparsify_file(ensure_model(model, progress=True), output, spec)
    console = Console()
    console.print(
        f"pruned attention q/k/v/o and FFN gate/up/down ({report.pattern}): kept {report.nonzeros:,} of "
        f"{report.params:,} weights, sparsity {report.sparsity:.4f}\nkept dense: {KEPT_DENSE}"
    )
    table = Table(title=f"{report.source.name} → {report.output}")
    for column in ("bytes", "dense int4", "sparse", "sparse / dense"):
        table.add_column(column, justify="right")
    for label, dense, sparse in (
        ("pruned tensors", report.dense_bytes, report.sparse_bytes),
        ("whole file", report.source_file_bytes, report.file_bytes),
    ):
        table.add_row(label, f"{dense:,}", f"{sparse:,}", f"{sparse / dense:.3f}")
    console.print(table)
    if text is not None:
        dense_ppl, sparse_ppl = compare_perplexity(report.source, report.output, text, eval_tokens)
        console.print(
            f"perplexity on the held-out text ({sparse_ppl.tokens} tokens): dense int4 {dense_ppl.perplexity:.3f}"
            f" · sparse {sparse_ppl.perplexity:.3f}"
        )


app.command("train")(train_command)
app.command("quantize")(quantize_command)


def main() -> None:
    """Console entry point: named hyperjax errors become one clear line and exit status 1."""
    try:
        if len(sys.argv) == 1 and sys.stdin.isatty():
            from hyperjax.shell import run_shell

            sys.exit(run_shell())
        app()
    except HyperjaxError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)

"""`hyperjax train`: flags and/or a TOML config file → `hyperjax.train.loop.train` (no JAX import until it runs)."""

from __future__ import annotations

import logging
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from hyperjax.errors import TrainConfigError

Opt = typer.Option


def _model_options(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs, each VALUE read as a TOML value (a bare word is a string)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"--model-option expects KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = value
    return options


def train_command(
    config: Annotated[Path | None, Opt("--config", "-c", help="TOML file of options (flags override).")] = None,
    data: Annotated[str | None, Opt(help="Text file, or 1-D uint8 .npy array, to train on.")] = None,
    out: Annotated[str | None, Opt(help="Run directory: checkpoints/ and metrics.jsonl.")] = None,
    model: Annotated[str | None, Opt(help="hakmem | transformer | rnn")] = None,
    model_option: Annotated[
        list[str] | None, Opt("--model-option", help="Model config field, KEY=VALUE (repeatable), e.g. dim=64.")
    ] = None,
    steps: Annotated[int | None, Opt(help="Optimizer steps in all.")] = None,
    batch_size: Annotated[int | None, Opt(help="Windows per micro-batch (a multiple of the devices).")] = None,
    context: Annotated[int | None, Opt(help="Bytes the model reads per window.")] = None,
    accum: Annotated[int | None, Opt(help="Micro-batches accumulated per step.")] = None,
    optimizer: Annotated[str | None, Opt(help="adamw | sgd | q (Q-controller) | plateau")] = None,
    lr: Annotated[float | None, Opt(help="(Base) learning rate.")] = None,
    schedule: Annotated[str | None, Opt(help="constant | cosine (adamw/sgd).")] = None,
    warmup: Annotated[int | None, Opt(help="Linear warmup steps (adamw/sgd).")] = None,
    momentum: Annotated[float | None, Opt(help="(Base) momentum of sgd/q/plateau.")] = None,
    weight_decay: Annotated[float | None, Opt(help="AdamW weight decay.")] = None,
    clip: Annotated[float | None, Opt(help="Global-norm clip (0: off).")] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between validation passes.")] = None,
    eval_batches: Annotated[int | None, Opt(help="Validation batches per pass.")] = None,
    save_every: Annotated[int | None, Opt(help="Steps between checkpoints.")] = None,
    keep: Annotated[int | None, Opt(help="Newest checkpoints kept (plus the best by validation loss).")] = None,
    log_every: Annotated[int | None, Opt(help="Steps between metrics records.")] = None,
    seed: Annotated[int | None, Opt(help="Seed of initialisation and data order.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue from the newest readable checkpoint in --out.")] = False,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show a progress bar.")] = True,
    coordinator: Annotated[
        str | None, Opt(help="Multi-process run: HOST:PORT of process 0 (every process runs the same command).")
    ] = None,
    num_processes: Annotated[int, Opt(help="Multi-process run: number of processes.")] = 1,
    process_id: Annotated[int, Opt(help="Multi-process run: this process's index, 0…num-processes−1.")] = 0,
) -> None:
    """Train a byte model (HAKMEM, transformer or RNN); validation bits per byte and checkpoints as it goes."""
    flags = dict(locals())  # the training options among the arguments: all but the command's own
    for name in ("config", "model_option", "resume", "progress", "coordinator", "num_processes", "process_id"):
        del flags[name]
    from hyperjax.train.config import load_config

    if model_option:
        flags["model_options"] = _model_options(model_option)
    cfg = load_config(config, **flags)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("hyperjax.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # this handler prints it; a root handler set up by a library would print it twice

    from hyperjax.api import enable_compilation_cache
    from hyperjax.train.loop import train

    if coordinator is not None:
        from hyperjax.train.parallel import initialize

        initialize(coordinator, num_processes, process_id)
    enable_compilation_cache()
    train(cfg, resume=resume, progress=progress)


def is_byte_model(path: str | None) -> bool:
    """Whether `path` is a training run directory or a quantized byte model (rather than a GGUF file or a name)."""
    if path is None:
        return False
    p = Path(path)
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "quantized.json").is_file())


def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory of `hyperjax train` (its best checkpoint).")],
    out: Annotated[Path, Opt("--out", "-o", help="Directory to write the quantized model into.")],
    kind: Annotated[str, Opt(help="Block format: q4_0 | q4_1 (int4), q8_0.")] = "q4_0",
    group_size: Annotated[int, Opt(help="Weights per block: 32 | 64 | 128.")] = 32,
) -> None:
    """Quantize a trained byte model's weight matrices to int4 blocks; print validation bits per byte before/after."""
    from rich.console import Console

    from hyperjax.train import artifacts

    model, params, meta = artifacts.load_run(checkpoint)
    flat = artifacts.quantize_params(params, kind, group_size)
    before = artifacts.val_bits_per_byte(model, params, meta)
    after = artifacts.val_bits_per_byte(model, artifacts.dequantize_params(flat, params), meta)
    float_bytes = artifacts.float_bytes(params)
    stored = artifacts.quantized_bytes(flat)
    extra = {"source": str(checkpoint), "kind": kind, "group_size": group_size, "val_bpb_before": before}
    artifacts.save_quantized(out, flat, {**meta, **extra, "val_bpb_after": after, "weight_bytes": stored})
    Console(stderr=True).print(
        f"{model.name} step {meta['step']}: weights {float_bytes / 2**20:.2f} MiB float32 → {stored / 2**20:.2f} MiB "
        f"({kind}, group {group_size}) · validation {before:.4f} → {after:.4f} bits/byte · wrote {out}"
    )


def generate_bytes(path: str, prompt: str, sampling: dict[str, Any], stream: bool = True) -> None:
    """`hyperjax generate --model RUN_OR_QUANTIZED_DIR`: sample bytes from a trained byte model.

    `sampling`: `SamplingConfig` fields plus `seed` and `max_tokens`."""
    from rich.console import Console

    from hyperjax.generate import generate_tokens
    from hyperjax.kernels.sampling import SamplingConfig
    from hyperjax.models.byte_decoder import encode_text
    from hyperjax.train import artifacts

    model, params, meta = artifacts.load_byte_model(path)

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    options = dict(sampling)
    max_tokens, seed = options.pop("max_tokens"), options.pop("seed")
    result = generate_tokens(
        artifacts.decoder(model, params),
        encode_text(prompt),
        max_new_tokens=max_tokens,
        sampling=SamplingConfig(**options),
        seed=seed,
        on_text=on_text if stream else None,
    )
    sys.stdout.write(("" if stream else result.text) + "\n")
    Console(stderr=True).print(
        f"[dim]{model.name} step {meta['step']} · generated {len(result.token_ids)} bytes at "
        f"{result.generation_tokens_per_second:.1f} bytes/s · compile {result.timings.get('compile_seconds', 0):.1f} s"
        "[/dim]"
    )

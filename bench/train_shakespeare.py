"""Byte models on Tiny Shakespeare for the same wall-clock budget each: validation bits per byte reached.

HAKMEM is trained four ways (Q-controller SGD, constant-LR SGD with momentum, AdamW, SGD with optax's
reduce_on_plateau), then the Euclidean byte transformer and the byte GRU with AdamW. Each run compiles first
(reported apart, not counted), then takes steps of the library's jitted train step on the same (seed, step) batch
order until its budget is spent, and is scored on the same validation windows (last 10 % of the file).

    python bench/train_shakespeare.py                 # 10 minutes per run (an hour in all)
    python bench/train_shakespeare.py --minutes 1     # a quick look; label such figures with their budget

Prints a table and writes bench/results/train_shakespeare.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
HAKMEM = {"dim": 64, "global_dim": 64, "ngram_table": 1024}
RUNS = {
    "hakmem/q-controller": ("hakmem", HAKMEM, {"optimizer": "q", "lr": 0.05}),
    "hakmem/sgd-momentum": ("hakmem", HAKMEM, {"optimizer": "sgd", "lr": 0.05, "schedule": "constant"}),
    "hakmem/adamw": ("hakmem", HAKMEM, {"optimizer": "adamw", "lr": 2e-3, "schedule": "constant"}),
    "hakmem/reduce-on-plateau": ("hakmem", HAKMEM, {"optimizer": "plateau", "lr": 0.05}),
    "transformer/adamw": ("transformer", {"dim": 128, "n_layers": 2}, {"optimizer": "adamw", "lr": 2e-3}),
    "rnn/adamw": ("rnn", {"embed_dim": 64, "hidden_dim": 256}, {"optimizer": "adamw", "lr": 2e-3}),
}


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Train one entry of RUNS for args.minutes of stepping; its compile time, steps, losses and bits per byte."""
    import jax

    from hyperjax.train.config import TrainConfig
    from hyperjax.train.data import load_bytes, split, train_batch, val_batches
    from hyperjax.train.loop import programs
    from hyperjax.train.model import byte_model
    from hyperjax.train.parallel import batch_sharding, data_mesh, put_batch

    model_name, options, opt = RUNS[name]
    opt = {"schedule": "constant", **opt}
    config = TrainConfig(
        data=str(args.data), model=model_name, model_options=options, batch_size=args.batch, context=args.context,
        steps=10**6, seed=0, **opt,
    )  # fmt: skip
    model = byte_model(config.model, config.context, config.model_options)
    mesh = data_mesh()
    window = config.context + 1
    train_data, val_data = split(load_bytes(config.data), window)
    val = put_batch(val_batches(val_data, args.eval_batches, config.batch_size, window), batch_sharding(mesh))
    run = programs(model, config, mesh)

    def batch(step: int) -> jax.Array:
        return put_batch(train_batch(train_data, 0, step, 1, config.batch_size, window), batch_sharding(mesh))

    t0 = time.perf_counter()
    state = run.init(0)
    state, m = run.step(state, batch(0))
    jax.block_until_ready(m)
    float(run.evaluate(state.params, val))
    compile_s = time.perf_counter() - t0

    losses, curve, step = [float(m["loss"])], [], 1
    start = time.perf_counter()
    while time.perf_counter() - start < args.minutes * 60:
        state, m = run.step(state, batch(step))
        losses.append(float(m["loss"]))
        step += 1
        if step % args.curve_every == 0:
            point = {"step": step, "seconds": time.perf_counter() - start, "loss": losses[-1]}
            curve.append(point | {k: float(m[k]) for k in ("lr", "momentum") if k in m})
    seconds = time.perf_counter() - start
    val_bpb = float(run.evaluate(state.params, val)) / math.log(2)
    tail = losses[-min(50, len(losses)) :]
    return {
        "model": model_name,
        "optimizer": opt,
        "params": model.module.param_count(model.config),
        "compile_s": compile_s,
        "train_s": seconds,
        "steps": step,
        "bytes_per_s": (step - 1) * config.batch_size * config.context / seconds,
        "train_bpb_last50": sum(tail) / len(tail) / math.log(2),
        "val_bpb": val_bpb,
        "skipped_steps": int(m["skipped_steps"]),
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per run")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--curve-every", type=int, default=25)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_shakespeare.json")
    args = parser.parse_args()
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))  # before jax starts its pools

    load_before = os.getloadavg()[0]
    results = {}
    for name in args.runs:
        print(f"training {name} for {args.minutes:g} min …", flush=True)
        results[name] = run_one(name, args)
    print(f"\n{args.minutes:g} min per run, batch {args.batch}×{args.context} bytes, {args.threads} thread(s)")
    print(f"{'run':<26}{'params':>10}{'compile s':>11}{'steps':>8}{'bytes/s':>10}{'train bpb':>11}{'val bpb':>9}")
    for name, r in results.items():
        print(
            f"{name:<26}{r['params']:>10,}{r['compile_s']:>11.1f}{r['steps']:>8}{r['bytes_per_s']:>10,.0f}"
            f"{r['train_bpb_last50']:>11.3f}{r['val_bpb']:>9.3f}"
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "minutes_per_run": args.minutes,
        "batch": args.batch,
        "context": args.context,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

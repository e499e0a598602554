"""HAKMEM against its byte baselines: training-step throughput, and entropy-patching throughput.

In one process pinned to N cores, on the same (B, T) batches of Tiny Shakespeare (random bytes when the file is
absent): median wall time of one jitted forward+backward pass (value_and_grad of the mean next-byte loss) for the
HAKMEM hyperbolic patch model, a byte GRU and the Euclidean byte transformer, the baselines sized to the nearest
parameter count to HAKMEM's; then the patching kernels over a byte buffer: window entropy and bigram entropy
(bigram fitted on the training split), each alone and followed by `patch_boundaries`. Models and kernels take
turns in every round of repeats, so a change of machine load hits all alike.

    python bench/hakmem.py                            # B=8, T=256, dim 128, all cores
    python bench/hakmem.py --batch 4 --length 512 --threads 1

Writes bench/results/hakmem.json and prints a table; throughputs in bytes/s (training) and MB/s (patching).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def race(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds of each blocking callable, called in turn in every round (so load drifts hit all alike)."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def nearest(target: int, candidates: list) -> object:
    """The (count, config) pair whose count is nearest to target; returns the config."""
    return min(candidates, key=lambda pair: abs(pair[0] - target))[1]


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hyperjax.kernels import patching
    from hyperjax.models import byte_transformer, hakmem, rnn
    from hyperjax.models.byte_transformer import ByteTransformerConfig
    from hyperjax.models.hakmem import HakmemConfig
    from hyperjax.models.rnn import ByteRNNConfig

    raw = DATA.read_bytes() if DATA.exists() else np.random.default_rng(0).bytes(1 << 20)
    data = np.frombuffer(raw, np.uint8)
    train = data[: int(0.9 * len(data))]
    n = args.batch * (args.length + 1)
    batch = jnp.asarray(train[:n].astype(np.int32).reshape(args.batch, args.length + 1))

    context = max(args.length, 2)
    hak = HakmemConfig(dim=args.dim, global_dim=args.dim, ngram_table=args.ngram_table, context_length=context)
    target = hakmem.param_count(hak)
    tf = nearest(
        target,
        [
            (byte_transformer.param_count(c), c)
            for c in (ByteTransformerConfig(dim=args.dim, n_layers=k, context_length=context) for k in range(1, 17))
        ],
    )
    gru = nearest(
        target,
        [
            (rnn.param_count(c), c)
            for c in (ByteRNNConfig(embed_dim=64, hidden_dim=h, n_layers=2) for h in range(64, 1025, 32))
        ],
    )
    models = {"hakmem": (hakmem, hak), "byte_transformer": (byte_transformer, tf), "gru": (rnn, gru)}

    step_fns, counts, losses = {}, {}, {}
    for name, (module, config) in models.items():
        graphdef, params = module.init(config, seed=0)
        step = jax.jit(jax.value_and_grad(lambda p, b, m=module, g=graphdef: m.loss_fn(g, p, b)))
        t0 = time.perf_counter()
        losses[name] = float(jax.block_until_ready(step(params, batch))[0])
        print(f"  compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        step_fns[name] = lambda s=step, p=params: jax.block_until_ready(s(p, batch))
        counts[name] = module.param_count(config)
    train_s = race(step_fns, args.repeats)

    buf = jnp.asarray(data[: args.patch_bytes])
    bigram = patching.fit_bigram(train)
    settings = patching.DEFAULTS

    def entropy_of(source: str):
        if source == "window":
            return lambda x: patching.window_entropy(x, patching.DEFAULT_WINDOW)
        return lambda x: patching.bigram_entropy(bigram, x)

    def with_boundaries(source: str):
        entropy, s = entropy_of(source), settings[source]
        options = dict(threshold=s.threshold, mode=s.mode, min_len=s.min_len, max_len=s.max_len)
        return lambda x: patching.patch_boundaries(entropy(x), x, **options)

    patch_fns = {}
    for source in patching.SOURCES:
        for stage, make in (("entropy", entropy_of), ("entropy+boundaries", with_boundaries)):
            fn = jax.jit(make(source))
            patch_fns[f"{source}/{stage}"] = lambda f=fn: jax.block_until_ready(f(buf))
    patch_s = race(patch_fns, args.repeats)

    bytes_per_step = args.batch * args.length
    return {
        "configs": {name: repr(config) for name, (_, config) in models.items()},
        "train": {
            name: {
                "params": counts[name],
                "step_s": train_s[name],
                "bytes_per_s": bytes_per_step / train_s[name],
                "initial_loss_nats": losses[name],
                "hakmem_time_ratio": train_s["hakmem"] / train_s[name],
            }
            for name in models
        },
        "patching": {name: {"seconds": s, "mb_per_s": args.patch_bytes / s / 1e6} for name, s in patch_s.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ngram-table", type=int, default=1024)
    parser.add_argument("--patch-bytes", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hakmem.json"))
    args = parser.parse_args()
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))  # before jax starts its pools

    load_before = os.getloadavg()[0]
    results = run(args)
    shape = f"batch {args.batch}×{args.length} bytes"
    print(f"\nforward+backward, {shape}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'model':<18}{'params':>10}{'step ms':>10}{'bytes/s':>10}{'HAKMEM/this':>13}{'loss0 nats':>12}")
    for name, r in results["train"].items():
        print(
            f"{name:<18}{r['params']:>10,}{r['step_s'] * 1e3:>10.1f}{r['bytes_per_s']:>10,.0f}"
            f"{r['hakmem_time_ratio']:>12.2f}x{r['initial_loss_nats']:>12.3f}"
        )
    print(f"\npatching {args.patch_bytes:,} bytes (DEFAULTS settings)")
    print(f"{'source/stage':<30}{'ms':>10}{'MB/s':>10}")
    for name, r in results["patching"].items():
        print(f"{name:<30}{r['seconds'] * 1e3:>10.1f}{r['mb_per_s']:>10.1f}")
    print(f"1-minute load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "batch": args.batch,
        "length": args.length,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

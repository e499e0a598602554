"""The native jax.ffi int4/int8 matmul against pure JAX, on SmolLM2-135M's real weights and shapes.

For each linear role of the model (30 layers × q, k, v, o, gate, up, down in Q4_1, and the 49152 × 576 Q8_0
output head), on the same activation: time per matvec (batch 1) of the native kernel with 1 and 2 threads,
pure JAX (`hyperjax.kernels.quant.qmatmul` under jit: the project's int4 twin) and XLA's float32 dot of the
dequantized matrix. A role's call runs its matvec over all 30 layers in one jitted scan (the native kernel
indexes the stacked weights; the others take scan's slices, as a model would), after a 64 MiB cache flush,
so weights stream from memory as in decoding; the methods take turns in every round of repeats, so load
drifts hit all alike. Then one token's worth (every layer's 7 matmuls and the head in one jitted call) is
timed directly, at batch 1 and at each --batch (prefill; time per token). Medians and minimums are reported.

    python bench/native_matvec.py                        # all methods, batch 1 and 64
    python bench/native_matvec.py --repeats 50 --batch 256

Writes bench/results/native_matvec.json and prints tables; XLA's own thread pool uses every allowed core.
The llama.cpp column compares with its whole-token decode time (9.6 ms, 2 threads, GUIDE §5), which also
covers attention and norms: the ratio is an upper bound on a whole-model speed-up.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LLAMA_CPP_TOKEN_MS = 1e3 / 104  # llama.cpp's whole-token decode time, 2 threads (GUIDE §5)
_FLUSH = np.ones(64 * 2**20 // 8, np.int64)


def flush_caches() -> None:
    """Evict the weights from the caches (32 MiB L3 here) by reading a larger buffer (reading, not writing,
    so that no dirty lines are left to be written back during the timed call)."""
    _FLUSH.sum()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def race(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median and min wall seconds of each blocking call, in turn in every round, each after its untimed
    `prepare` (here: set the thread count) and a cache flush. fns: {name: (prepare, call)}."""
    for prepare, call in fns.values():
        prepare()
        call()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (prepare, call) in fns.items():
            prepare()
            flush_caches()
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median": statistics.median(ts), "min": min(ts)} for name, ts in times.items()}


def load_weights(path: Path, layers: int) -> dict:
    """{role: stacked QuantizedTensor (layers, rows, cols)} and "head": the Q8_0 token embedding."""
    import gguf
    import jax
    import jax.numpy as jnp

    from hyperjax.kernels.quant import from_gguf_blocks

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def read(name: str):
        t = tensors[name]
        rows, cols = int(t.shape[1]), int(t.shape[0])
        return from_gguf_blocks(np.asarray(t.data), t.tensor_type.name.lower(), (rows, cols))

    weights = {
        role: jax.tree.map(lambda *a: np.stack(a), *[read(f"blk.{i}.{role}.weight") for i in range(layers)])
        for role in ROLES
    }
    weights["head"] = read("token_embd.weight")
    return jax.tree.map(jnp.asarray, weights)


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from hyperjax.kernels import native
    from hyperjax.kernels.quant import dequantize, qmatmul

    if not native.available():
        sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
    weights = load_weights(args.model, args.layers)
    packed = {name: native.repack(qt) for name, qt in weights.items()}
    packed = {name: jax.tree.map(jnp.asarray, w) for name, w in packed.items()}
    floats = {name: jax.jit(dequantize)(qt) for name, qt in weights.items()}
    rng = np.random.default_rng(0)

    def activation(batch: int, cols: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((batch, cols)), jnp.float32)

    matvecs = {
        "native": native.native_qmatmul,
        "pure_jax": qmatmul,
        "xla_fp32": lambda x, w: x @ w.T,
    }
    operands = {"native": packed, "pure_jax": weights, "xla_fp32": floats}

    def over_layers(method: str, name: str):
        """jit of x, w → y for one matrix, or for every layer of a stack in a scan."""
        fn = matvecs[method]
        if name == "head":
            return jax.jit(fn)
        if method == "native":  # index the stack: XLA would copy each sliced operand of a custom call
            layers = jnp.arange(args.layers)
            return jax.jit(lambda x, w: jax.lax.scan(lambda c, i: (c, fn(x, w, i)), 0.0, layers)[1])
        return jax.jit(lambda x, w: jax.lax.scan(lambda c, wi: (c, fn(x, wi)), 0.0, w)[1])

    def methods(make):
        """{label: (prepare, blocking call)} per method, the native kernel at 1 and 2 threads."""
        fns = {}
        for method in matvecs:
            call = make(method)
            blocking = lambda call=call: jax.block_until_ready(call())  # noqa: E731
            if method == "native":
                for threads in (1, 2):
                    fns[f"native_{threads}t"] = (
                        lambda threads=threads: native.set_num_threads(threads),
                        blocking,
                    )
            else:
                fns[method] = (lambda: None, blocking)
        return fns

    per_role = []
    for name in (*ROLES, "head"):
        qt = weights[name]
        rows, cols = qt.shape
        x = activation(1, cols)
        count = 1 if name == "head" else args.layers

        def make(method, name=name, x=x):
            jitted = over_layers(method, name)
            return lambda: jitted(x, operands[method][name])

        times = race(methods(make), args.repeats)
        native_bytes = packed[name].nbytes / count
        per_role.append(
            {
                "role": name,
                "shape": [rows, cols],
                "kind": qt.kind,
                "count_per_token": count,
                "native_bytes": native_bytes,
                "matvec_s": {k: v["median"] / count for k, v in times.items()},
                "matvec_min_s": {k: v["min"] / count for k, v in times.items()},
                "native_2t_gb_per_s": native_bytes / (times["native_2t"]["median"] / count) / 1e9,
            }
        )
        print(f"  done: {name}", flush=True)

    tokens = []
    for batch in (1, *args.batch):

        def make(method, batch=batch):
            xs = {cols: activation(batch, cols) for cols in (576, 1536)}
            fn = matvecs[method]
            if method == "native":  # the stacked weight and the layer index
                layer_args = lambda w, i: (w, i)  # noqa: E731
            else:  # the layer's slice
                layer_args = lambda w, i: (jax.tree.map(lambda a: a[i], w),)  # noqa: E731

            @jax.jit
            def one_token(ws):
                def body(acc, i):
                    for role in ROLES:
                        x = xs[weights[role].shape[1]]
                        acc = acc + fn(x, *layer_args(ws[role], i)).sum()
                    return acc, None

                acc, _ = jax.lax.scan(body, 0.0, jnp.arange(args.layers))
                return acc + fn(xs[576], ws["head"]).sum()

            return lambda: one_token(operands[method])

        times = race(methods(make), max(5, args.repeats // 2))
        tokens.append(
            {
                "batch": batch,
                "token_s": {k: v["median"] / batch for k, v in times.items()},
                "token_min_s": {k: v["min"] / batch for k, v in times.items()},
            }
        )
        print(f"  done: token, batch {batch}", flush=True)
    native.set_num_threads(None)
    return {"per_role": per_role, "tokens": tokens, "isa": native.isa()}


def report(results: dict) -> None:
    methods = list(results["per_role"][0]["matvec_s"])
    print(f"\nmedian µs per matvec (batch 1), kernels: {results['isa']}")
    columns = "".join(f"{m:>12}" for m in methods)
    print(f"{'role':<12}{'shape':>12}{'kind':>6}{'KiB':>8}{columns}  GB/s 2t")
    sums = {stat: dict.fromkeys(methods, 0.0) for stat in ("matvec_s", "matvec_min_s")}
    for r in results["per_role"]:
        shape = "×".join(map(str, r["shape"]))
        cells = "".join(f"{r['matvec_s'][m] * 1e6:>12.1f}" for m in methods)
        head = f"{r['role']:<12}{shape:>12}{r['kind']:>6}{r['native_bytes'] / 1024:>8.0f}"
        print(f"{head}{cells}{r['native_2t_gb_per_s']:>9.1f}")
        for stat, total in sums.items():
            for m in methods:
                total[m] += r[stat][m] * r["count_per_token"]
    for label, stat in (("token: sum of medians", "matvec_s"), ("token: sum of minimums", "matvec_min_s")):
        print(f"{label:<38}" + "".join(f"{sums[stat][m] * 1e3:>10.2f}ms" for m in methods))
        print(f"{'  tokens/s':<38}" + "".join(f"{1 / sums[stat][m]:>12.0f}" for m in methods))
    results["token_sum_s"] = sums["matvec_s"]
    results["token_sum_min_s"] = sums["matvec_min_s"]
    print("\nmeasured: one token's linear layers in one jitted call, ms per token (batch > 1: prefill)")
    print(f"{'batch':<12}" + "".join(f"{m:>12}" for m in methods) + f"{'tok/s 2t':>10}{'llama.cpp×':>11}")
    for t in results["tokens"]:
        for label, stat in (("median", "token_s"), ("min", "token_min_s")):
            cells = "".join(f"{t[stat][m] * 1e3:>12.3f}" for m in methods)
            native_2t = t[stat]["native_2t"]
            speedup = LLAMA_CPP_TOKEN_MS / 1e3 / native_2t
            print(f"{t['batch']:<5}{label:<7}{cells}{1 / native_2t:>10.0f}{speedup:>10.2f}x")


def main() -> None:
    raw_text = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw_text)
    parser.add_argument("--model", type=Path, help="SmolLM2-135M Q4_1 GGUF (default: fetched into the cache)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, nargs="*", default=[64], help="prefill batches besides 1")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "native_matvec.json"))
    args = parser.parse_args()
    if args.model is None:
        from hyperjax.io.registry import ensure_model

        args.model = ensure_model("smollm2-135m")

    load_before = os.getloadavg()[0]
    results = run(args)
    report(results)
    print(f"1-minute load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "llama_cpp_token_ms": LLAMA_CPP_TOKEN_MS,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

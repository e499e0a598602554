"""Sparse 4-bit CSR against dense int4 and other sparse kernels: bytes and matvec time of one layer.

For a (rows × cols) Gaussian layer pruned by magnitude to each sparsity, in one process pinned to N cores, on the
same input x: bytes of hyperjax's Q4CSR versus dense float32 and dense Q4_0/Q4_1; median time of y = W @ x for
hyperjax spmv (jit), dense Q4_0 qmatmul (jit), dense float32 (jit), scipy.sparse CSR float32 and
jax.experimental.sparse BCSR float32 (jit), the sparse ones on the same dequantized nonzeros. The kernels take
turns in every round of repeats, so a change of machine load hits all of them alike.

    python bench/sparse.py                                   # 4096², 50/90/99 %, per-row and global, all cores
    python bench/sparse.py --scope global --threads 1 --repeats 50

Writes bench/results/sparse.json and prints a table; ratios are "other / hyperjax spmv" times.
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


def run(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse
    from jax.experimental import sparse as jsparse

    from hyperjax.kernels import quant, sparse

    rng = np.random.default_rng(args.seed)
    w = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    x_np = rng.standard_normal(args.cols).astype(np.float32)
    x = jnp.asarray(x_np)
    dense_fp32_bytes = w.nbytes
    q4 = {kind: quant.quantize(jnp.asarray(w), kind) for kind in ("q4_0", "q4_1")}
    dense_q4_0_err = float(np.linalg.norm(np.asarray(quant.dequantize(q4["q4_0"])) - w) / np.linalg.norm(w))

    def blocking(fn, *operands):
        jitted = jax.jit(fn)
        return lambda: jax.block_until_ready(jitted(*operands))

    dense = {
        "dense_q4_0_qmatmul": blocking(quant.qmatmul, x, q4["q4_0"]),
        "dense_fp32": blocking(lambda x, w: w @ x, x, jnp.asarray(w)),
    }
    results = []
    for scope, sparsity in ((scope, sparsity) for scope in args.scope for sparsity in args.sparsity):
        mask = sparse.magnitude_mask(w, sparsity, scope)
        t = sparse.from_dense(w, mask)
        vals = np.asarray(sparse.values(t))
        csr = scipy.sparse.csr_matrix(
            (vals, np.asarray(t.indices).astype(np.int32), np.asarray(t.row_ptr)), shape=t.shape
        )
        bcsr = jsparse.BCSR.from_scipy_sparse(csr)
        pruned = np.where(mask, w, 0.0)
        y_ref = csr @ x_np
        y = np.asarray(jax.jit(sparse.spmv)(x, t))
        fns = {
            "q4csr_spmv": blocking(sparse.spmv, x, t),
            **dense,
            "scipy_csr_fp32": lambda csr=csr: csr @ x_np,
            "jax_bcsr_fp32": blocking(lambda b, x: b @ x, bcsr, x),
        }
        results.append(
            {
                "sparsity": sparsity,
                "scope": scope,
                "nnz": t.nnz,
                "window": t.window,
                "windows": t.windows,
                "index_dtype": str(t.indices.dtype),
                "bytes": {
                    "q4csr": t.nbytes,
                    "dense_fp32": dense_fp32_bytes,
                    "dense_q4_0": q4["q4_0"].nbytes,
                    "dense_q4_1": q4["q4_1"].nbytes,
                    "scipy_csr_fp32": csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes,
                },
                "q4csr_over_fp32": t.nbytes / dense_fp32_bytes,
                "q4csr_over_q4_0": t.nbytes / q4["q4_0"].nbytes,
                "matvec_s": race(fns, args.repeats),
                "spmv_max_rel_error_vs_scipy": float(np.abs(y - y_ref).max() / np.abs(y_ref).max()),
                "quant_rel_rms_error": float(
                    np.linalg.norm(np.asarray(sparse.to_dense(t)) - pruned) / np.linalg.norm(pruned)
                ),
                "dense_q4_0_rel_rms_error": dense_q4_0_err,
            }
        )
        print(f"  done: {scope} {sparsity:.0%}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--scope", choices=("row", "global"), nargs="+", default=["row", "global"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse.json"))
    args = parser.parse_args()
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))  # before jax starts its pools

    load_before = os.getloadavg()[0]
    results = run(args)
    print(f"\n{args.rows}×{args.cols} magnitude pruning, {args.threads} thread(s), median of {args.repeats}")
    print(
        f"{'scope':<7}{'sparsity':>8}{'Q4CSR MiB':>11}{'/fp32':>8}{'/q4_0':>8}"
        f"{'spmv ms':>9}{'q4_0 ms':>9}{'fp32 ms':>9}"
        f"{'scipy ms':>10}{'BCSR ms':>9}{'q4_0/spmv':>11}{'scipy/spmv':>12}{'BCSR/spmv':>11}{'rel err':>9}"
    )
    for r in results:
        b, s = r["bytes"], {k: v * 1e3 for k, v in r["matvec_s"].items()}
        spmv = s["q4csr_spmv"]
        print(
            f"{r['scope']:<7}{r['sparsity']:>8.0%}{b['q4csr'] / 2**20:>11.2f}"
            f"{r['q4csr_over_fp32']:>8.1%}{r['q4csr_over_q4_0']:>8.1%}"
            f"{spmv:>9.3f}{s['dense_q4_0_qmatmul']:>9.3f}{s['dense_fp32']:>9.3f}{s['scipy_csr_fp32']:>10.3f}"
            f"{s['jax_bcsr_fp32']:>9.3f}{s['dense_q4_0_qmatmul'] / spmv:>10.1f}x{s['scipy_csr_fp32'] / spmv:>11.2f}x"
            f"{s['jax_bcsr_fp32'] / spmv:>10.1f}x{r['quant_rel_rms_error']:>9.4f}"
        )
    print(f"dense q4_0 relative RMS error: {results[0]['dense_q4_0_rel_rms_error']:.4f}")
    print(f"1-minute load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

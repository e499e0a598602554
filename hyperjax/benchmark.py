"""Decode and prefill speed of one GGUF model, side by side: hyperjax int4 on the native kernels (int4) and on the
pure-JAX kernels (int4-jax), hyperjax fp32 (the same model dequantized), and llama.cpp.

Every row runs in its own process pinned to N cores (`os.sched_setaffinity` before jax starts), so thread counts
are fixed and peak RSS is per row. Each row: load, cold generation (empty XLA compilation cache; time to first
token includes compilation), then a second process with the cache filled (warm time to first token), and in the
warm process the medians of repeated prefill (256-token prompt) and decode (128 new tokens, EOS ignored) runs.

    hyperjax bench                              # threads 1 and 2, all rows available (or python bench/decode.py)
    hyperjax bench --threads 2 --rows int4 llama.cpp --repeats 5

Writes bench/results/decode.json (in a checkout; else ./hyperjax-bench-decode.json) and prints a table with
hyperjax / llama.cpp ratios. The llama.cpp row needs the [bench] extra (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HYPERJAX_SHARED", ROOT.parent / "shared")) / "data" / "tinyshakespeare.txt"
IN_CHECKOUT = (ROOT / "bench").is_dir()
DEFAULT_OUT = ROOT / "bench" / "results" / "decode.json" if IN_CHECKOUT else Path("hyperjax-bench-decode.json")
ROWS = ("int4", "int4-jax", "fp32", "llama.cpp")
SHORT_PROMPT = "Once upon a time"


def long_prompt_text() -> str:
    """About 256 tokens of real text (Tiny Shakespeare's opening, or a repeated sentence without it)."""
    if DATA.exists():
        return DATA.read_text(encoding="utf-8")[:1400]
    return "The quick brown fox jumps over the lazy dog. " * 40


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s of numpy summing a large array (a lower bound on what the machine can read)."""
    import numpy as np

    a = np.ones(megabytes * 2**20 // 8, dtype=np.int64)
    a.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(times) / 1e9


def child_hyperjax(args: argparse.Namespace) -> dict:
    import hyperjax
    from hyperjax.memory import peak_rss_bytes, weight_bytes_by_format

    t0 = time.perf_counter()
    model = hyperjax.load(args.model, kernels="jax" if args.row == "int4-jax" else None)
    if args.row == "fp32":
        model = model.to_float32()
    load_s = time.perf_counter() - t0
    first = model.generate(SHORT_PROMPT, max_tokens=2, temperature=0.0, ignore_eos=True)
    out = {"load_s": load_s, "ttft_s": first.first_token_seconds + load_s, "kernels": model.info()["kernels"]}
    if args.phase == "warm":
        prompt_ids = model.tokenize(long_prompt_text())[: args.prompt_tokens]
        prefill, decode = [], []
        for _ in range(args.repeats):
            r = model.generate(SHORT_PROMPT, max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
            decode.append(r.generation_tokens_per_second)
            text = model.detokenize(prompt_ids)
            r = model.generate(text, max_tokens=1, temperature=0.0, ignore_eos=True)
            prefill.append(r.prompt_tokens_per_second)
        weights = weight_bytes_by_format(model.params)
        embed_bytes = weights_bytes_of(model.params.embed)
        per_token = sum(v["bytes"] for v in weights.values())
        if model.params.output is not None:
            per_token -= embed_bytes  # untied: the embedding table is only gathered from
        out.update(
            decode_tok_s=statistics.median(decode),
            prefill_tok_s=statistics.median(prefill),
            prefill_tokens=r.prompt_tokens,
            weight_bytes_per_token=per_token,
        )
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def weights_bytes_of(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def child_llama_cpp(args: argparse.Namespace) -> dict:
    import resource

    import numpy as np
    from llama_cpp import Llama

    from hyperjax.io.registry import ensure_model

    path = str(ensure_model(args.model))
    t0 = time.perf_counter()
    threads = args.threads[0]
    llm = Llama(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    short = llm.tokenize(SHORT_PROMPT.encode(), add_bos=False, special=True)
    vocab = llm.n_vocab()
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(short)
    out = {"load_s": load_s, "ttft_s": time.perf_counter() - t0 + load_s}
    if args.phase == "warm":
        long_ids = llm.tokenize(long_prompt_text().encode(), add_bos=False, special=True)[: args.prompt_tokens]
        prefill, decode = [], []
        for _ in range(args.repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(long_ids)
            prefill.append(len(long_ids) / (time.perf_counter() - t0))
            llm.reset()
            llm.eval(short)
            token = short[-1]
            t0 = time.perf_counter()
            for _ in range(args.new_tokens):
                llm.eval([token])
                # From the context: llama-cpp-python 0.3.x leaves Llama.scores unfilled without logits_all.
                token = int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).argmax())
            decode.append(args.new_tokens / (time.perf_counter() - t0))
        out.update(
            decode_tok_s=statistics.median(decode),
            prefill_tok_s=statistics.median(prefill),
            prefill_tokens=len(long_ids),
            weight_bytes_per_token=os.path.getsize(path),
        )
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # without jax imported
    return out


def run_child(row: str, threads: int, phase: str, cache_dir: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "hyperjax.benchmark", "--child",
        "--row", row, "--threads", str(threads), "--phase", phase,
        "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
        "--prompt-tokens", str(args.prompt_tokens),
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, HYPERJAX_XLA_CACHE=cache_dir, HYPERJAX_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{row}/{threads} threads/{phase} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hyperjax bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="registered name or GGUF path (default: SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        os.sched_setaffinity(0, set(range(args.threads[0])))
        result = child_llama_cpp(args) if args.row == "llama.cpp" else child_hyperjax(args)
        print(json.dumps(result))
        return

    rows = list(args.rows)
    if "llama.cpp" in rows and not llama_cpp_available():
        print("llama.cpp row skipped: llama-cpp-python is not installed (pip install -e '.[bench]', ~8 min build)")
        rows.remove("llama.cpp")
    results = []
    for threads in args.threads:
        for row in rows:
            with tempfile.TemporaryDirectory() as cache_dir:
                cold = run_child(row, threads, "cold", cache_dir, args)
                warm = run_child(row, threads, "warm", cache_dir, args)
            entry = {"row": row, "threads": threads, "ttft_cold_s": cold["ttft_s"], "ttft_warm_s": warm["ttft_s"]}
            entry.update({k: v for k, v in warm.items() if k != "ttft_s"})
            entry["effective_gb_s"] = entry["weight_bytes_per_token"] * entry["decode_tok_s"] / 1e9
            results.append(entry)
            print(f"  done: {row}, {threads} thread(s): {entry['decode_tok_s']:.1f} tok/s decode", flush=True)

    bandwidth = measure_bandwidth()  # after the rows: a child inherits its parent's peak RSS across exec
    print(f"\nmemory read bandwidth (numpy sum, 1 thread): {bandwidth:.1f} GB/s")
    header = (
        f"{'row':<10}{'thr':>4}{'decode tok/s':>14}{'prefill tok/s':>15}{'TTFT cold s':>13}{'TTFT warm s':>13}"
        f"{'peak RSS MiB':>14}{'eff. GB/s':>11}{'decode vs llama.cpp':>21}{'prefill vs llama.cpp':>22}"
    )
    print(header)
    for e in results:
        peer = next((p for p in results if p["row"] == "llama.cpp" and p["threads"] == e["threads"]), None)
        ratio = f"{e['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else "-"
        prefill_ratio = f"{e['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x" if peer else "-"
        print(
            f"{e['row']:<10}{e['threads']:>4}{e['decode_tok_s']:>14.1f}{e['prefill_tok_s']:>15.1f}"
            f"{e['ttft_cold_s']:>13.2f}{e['ttft_warm_s']:>13.2f}{e['peak_rss_bytes'] / 2**20:>14.0f}"
            f"{e['effective_gb_s']:>11.1f}{ratio:>21}{prefill_ratio:>22}"
        )
    for threads in args.threads:
        int4 = next((e for e in results if e["row"] == "int4" and e["threads"] == threads), None)
        fp32 = next((e for e in results if e["row"] == "fp32" and e["threads"] == threads), None)
        if int4 and fp32:
            print(f"int4 / fp32 decode, {threads} thread(s): {int4['decode_tok_s'] / fp32['decode_tok_s']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "bandwidth_gb_s": bandwidth,
        "command": " ".join(sys.argv),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

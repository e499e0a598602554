"""Sparsified SmolLM2 against its dense int4 source: bytes, held-out perplexity and generation speed.

For each pruning spec, in one process on the same text and prompt: `hyperjax.sparsify.sparsify_file` writes a sparse
GGUF; we record the bytes of the pruned tensors and of the whole file, the perplexity over the first N tokens of
Tiny Shakespeare's last 10 %, and greedy generation speed (prompt and decode tokens/s, compile excluded).

    python bench/sparsify.py                                  # 0 (re-encoding only), 0.5, 0.9 and 2:4
    python bench/sparsify.py --specs 0.5,2:4 --eval-tokens 512 --gen-tokens 32

Writes bench/results/sparsify.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the printing press begins"


def measure(model, text: str, eval_tokens: int, gen_tokens: int) -> dict:
    from hyperjax.evaluate import perplexity

    t0 = time.perf_counter()
    ppl = perplexity(model, text, max_tokens=eval_tokens)
    eval_seconds = time.perf_counter() - t0
    model.generate(PROMPT, max_tokens=2, temperature=0.0)  # compile the decode executables first
    result = model.generate(PROMPT, max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    return {
        "perplexity": ppl.perplexity,
        "eval_tokens": ppl.tokens,
        "eval_seconds": eval_seconds,
        "prompt_tokens_per_second": result.prompt_tokens_per_second,
        "generation_tokens_per_second": result.generation_tokens_per_second,
        "weight_bytes": model.info()["memory"]["weight_bytes"],
    }


def run(args: argparse.Namespace) -> dict:
    import hyperjax
    from hyperjax.io.registry import ensure_model
    from hyperjax.sparsify import heldout_text, parse_sparsity, sparsify_file

    source = ensure_model(args.model)
    text = heldout_text(args.text, args.eval_tokens)
    dense = measure(hyperjax.load(source), text, args.eval_tokens, args.gen_tokens)
    rows = {"dense int4": {"file_bytes": source.stat().st_size} | dense}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.specs.split(","):
            spec = parse_sparsity(pattern=key) if ":" in key else parse_sparsity(float(key))
            t0 = time.perf_counter()
            report = sparsify_file(source, Path(tmp) / "sparse.gguf", spec)
            entry = {
                "sparsify_seconds": time.perf_counter() - t0,
                "pattern": report.pattern,
                "sparsity": report.sparsity,
                "pruned_dense_bytes": report.dense_bytes,
                "pruned_sparse_bytes": report.sparse_bytes,
                "file_bytes": report.file_bytes,
            }
            rows[key] = entry | measure(hyperjax.load(report.output), text, args.eval_tokens, args.gen_tokens)
            print(key, json.dumps(rows[key]), flush=True)
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": str(source),
        "eval_tokens": args.eval_tokens,
        "gen_tokens": args.gen_tokens,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        "| model | pruned tensors (bytes) | file (bytes) | weights in memory | perplexity | prompt tok/s | gen tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in result["rows"].items():
        pruned = f"{row['pruned_sparse_bytes']:,}" if "pruned_sparse_bytes" in row else "—"
        lines.append(
            f"| {key} | {pruned} | {row['file_bytes']:,} | {row['weight_bytes'] / 2**20:.1f} MiB | "
            f"{row['perplexity']:.2f} | {row['prompt_tokens_per_second']:.1f} | "
            f"{row['generation_tokens_per_second']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--specs", default="0,0.5,0.9,2:4", help="comma-separated sparsities and N:M patterns")
    parser.add_argument("--text", default=None, help="held-out text file (default: Tiny Shakespeare)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()
    result = run(args)
    out = ROOT / "bench" / "results" / "sparsify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

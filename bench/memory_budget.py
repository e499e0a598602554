"""Progressive loading, side by side: the same greedy generation in memory and streamed under a memory budget.

Each row runs in its own process (peak RSS per row). The budget defaults to half the model's weight bytes.

    python bench/memory_budget.py                    # SmolLM2, 64 new tokens
    python bench/memory_budget.py --budget 64MB --new-tokens 32

Prints a table (decode tok/s, peak RSS, resident weights at peak, block loads), whether the outputs are identical,
and writes bench/results/memory_budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the printing press"


def child(args: argparse.Namespace) -> dict:
    import hyperjax
    from hyperjax.memory import peak_rss_bytes

    budget = None if args.budget == "none" else args.budget
    model = hyperjax.load(args.model, memory_budget=budget)
    model.generate(PROMPT, max_tokens=2, temperature=0.0, ignore_eos=True)
    result = model.generate(PROMPT, max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    memory = model.info()["memory"]
    return {
        "text": result.text,
        "decode_tok_s": result.generation_tokens_per_second,
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes_resident": memory.get("resident_weight_bytes_peak", memory["weight_bytes"]),
        "budget_bytes": memory.get("memory_budget_bytes"),
        "layer_loads": memory.get("layer_loads", 0),
    }


def model_weight_bytes(model: str | None) -> int:
    from hyperjax.io.gguf import read_gguf
    from hyperjax.io.registry import ensure_model

    return sum(t.nbytes for t in read_gguf(ensure_model(model)).tensors.values())


def run(row_budget: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--budget", row_budget, "--new-tokens", str(args.new_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"row with budget {row_budget} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--budget", default=None, help="e.g. 48MB (default: half the weight bytes)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_budget.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    weights = model_weight_bytes(args.model)
    budget = args.budget or str(weights // 2)
    rows = {"in memory": run("none", args), f"budget {budget}": run(budget, args)}
    base = rows["in memory"]
    print(f"model weight bytes {weights / 2**20:.1f} MiB, budget {budget} bytes")
    print(f"{'row':<22}{'decode tok/s':>14}{'peak RSS MiB':>14}{'weights resident MiB':>22}{'block loads':>13}")
    for name, r in rows.items():
        print(
            f"{name:<22}{r['decode_tok_s']:>14.1f}{r['peak_rss_bytes'] / 2**20:>14.0f}"
            f"{r['weight_bytes_resident'] / 2**20:>22.1f}{r['layer_loads']:>13}"
        )
    streamed = rows[f"budget {budget}"]
    identical = streamed["text"] == base["text"]
    print(f"identical output: {identical}; streamed / in-memory decode speed: "
          f"{streamed['decode_tok_s'] / base['decode_tok_s']:.2f}x")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "command": " ".join(sys.argv), "weight_bytes": weights, "identical_output": identical}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

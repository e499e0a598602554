"""`hyperjax-run DIR PROMPT`: generate from an exported model directory, streaming the text to stdout.

Start-up: read the manifest, verify every file's sha256, memory-map the weights, load the tokenizer and the
functions of the export's target (jax or IREE). Any failure a user can cause is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from hyperjax.runner import procmem
from hyperjax.runner.format import TARGETS, RunnerError, map_weights, read_manifest, verify_files
from hyperjax.runner.loop import Functions, RunResult, generate
from hyperjax.runner.sampling import Sampling
from hyperjax.runner.text import prompt_tokens, render_chat


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperjax-run", description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="directory written by `hyperjax export`")
    p.add_argument("prompt", help="text to continue (or the user's message with --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, help="0 is greedy (default: the export's sampling defaults)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--repeat-last-n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (needs jinja2)")
    p.add_argument("--platform", help="jax platform to run on (default: jax's default backend)")
    p.add_argument("--stats-json", action="store_true", help="print the final statistics as one JSON line")
    return p


def open_functions(directory: Path, manifest: dict[str, Any], platform: str | None) -> Functions:
    """The export's functions for its target, with the weights memory-mapped; checks the platform."""
    target = manifest.get("target")
    if target not in TARGETS:
        raise RunnerError(f"{directory}: unknown target {target!r} (this runner knows {', '.join(TARGETS)})")
    if target == "iree":
        from hyperjax.runner.iree_backend import IreeFunctions

        _check_platform(directory, manifest, platform or "cpu")
        return IreeFunctions(directory, manifest, map_weights(directory, manifest, mode="c"))
    from hyperjax.runner.jax_backend import JaxFunctions, default_platform

    platform = platform or default_platform()
    _check_platform(directory, manifest, platform)
    return JaxFunctions(directory, manifest, map_weights(directory, manifest), platform)


def _check_platform(directory: Path, manifest: dict[str, Any], platform: str) -> None:
    if platform not in manifest["platforms"]:
        raise RunnerError(
            f"{directory}: exported for {', '.join(manifest['platforms'])}, not {platform}; "
            f"export again with --platforms {platform}"
        )


def run(argv: list[str] | None = None, *, t_start: float | None = None) -> int:
    """Parse arguments, generate with streaming, print statistics to stderr; the exit status."""
    t_start = time.perf_counter() if t_start is None else t_start
    args = _parser().parse_args(argv)
    manifest = read_manifest(args.directory)
    verify_files(args.directory, manifest)
    defaults = manifest["sampling_defaults"]
    sampling = Sampling(
        temperature=defaults["temperature"] if args.temperature is None else args.temperature,
        top_k=defaults["top_k"] if args.top_k is None else args.top_k,
        top_p=defaults["top_p"] if args.top_p is None else args.top_p,
        min_p=defaults["min_p"] if args.min_p is None else args.min_p,
        repeat_penalty=defaults["repeat_penalty"] if args.repeat_penalty is None else args.repeat_penalty,
    )
    repeat_last_n = defaults["repeat_last_n"] if args.repeat_last_n is None else args.repeat_last_n
    if problem := sampling.check():
        raise RunnerError(problem)
    if args.max_tokens < 1 or repeat_last_n < 0:
        raise RunnerError("--max-tokens must be at least 1 and --repeat-last-n at least 0")
    info = manifest["tokenizer"]
    text = args.prompt
    if args.chat:
        if not info.get("chat_template"):
            raise RunnerError(f"{args.directory}: the exported model has no chat template")
        text = render_chat(info["chat_template"], text, info.get("bos_text", ""), info.get("eos_text", ""))
    prompt_ids, token_bytes = prompt_tokens(args.directory, info, text)
    functions = open_functions(args.directory, manifest, args.platform)
    baseline = procmem.status()  # the runtime loaded, the weights mapped but not yet read

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(
        functions,
        prompt_ids,
        capacity=manifest["max_context"],
        buckets=manifest["buckets"],
        stop_ids=frozenset(info["stop_ids"]),
        token_bytes=token_bytes,
        sampling=sampling,
        max_tokens=args.max_tokens,
        repeat_last_n=repeat_last_n,
        seed=args.seed,
        on_text=on_text,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(result, t_start, args.stats_json, baseline, args.directory / manifest["weights"]["file"])
    return 0


def _difference(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def _report(
    result: RunResult, t_start: float, as_json: bool, baseline: dict[str, int | None], weights_file: Path
) -> None:
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    now = procmem.status()
    stats = {
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "prompt_tokens_per_second": result.prompt_tokens / max(result.prefill_seconds, 1e-9),
        "decode_tokens_per_second": result.decode_steps / result.decode_seconds if result.decode_steps else None,
        "first_token_seconds": result.first_token_time - t_start,
        "peak_rss_bytes": peak_rss,
        # The weights held once: the file's resident mapped pages, and how little anonymous memory grew.
        "baseline_rss_bytes": baseline["rss_bytes"],
        "weights_file_bytes": weights_file.stat().st_size,
        "weights_resident_bytes": procmem.resident_bytes_of(weights_file),
        "anon_growth_bytes": _difference(now["anon_bytes"], baseline["anon_bytes"]),
        "token_ids": result.token_ids,
    }
    if as_json:
        print(json.dumps(stats), file=sys.stderr)
        return
    decode = stats["decode_tokens_per_second"]
    print(
        f"prompt {result.prompt_tokens} tok at {stats['prompt_tokens_per_second']:.1f} tok/s · generated "
        f"{len(result.token_ids)} tok at {decode or float('nan'):.1f} tok/s ({result.finish_reason}) · "
        f"first token {stats['first_token_seconds']:.2f} s · peak RSS {peak_rss / 2**20:.1f} MiB",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runner errors become one line on stderr and exit status 1."""
    t_start = time.perf_counter()
    try:
        sys.exit(run(argv, t_start=t_start))
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

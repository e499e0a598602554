"""Compile the native kernels into this package directory: `python -m hyperjax.kernels.native.build`.

One g++ (or $CXX) command builds every `*.cc` here into `_qmatmul.so`, for the baseline of the architecture:
the SIMD kernels carry their own target attributes and are chosen at run time, so the library runs on any
x86-64 CPU. Needs a C++17 compiler and the XLA FFI headers that ship with jaxlib (`jax.ffi.include_dir()`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "_qmatmul.so"
# -Wno-maybe-uninitialized: GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*, GCC bug 105593).
CXXFLAGS = (
    *("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-math-errno"),
    *("-Wall", "-Wextra", "-Wno-maybe-uninitialized"),
)


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else g++ or c++ on PATH), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def command(output: Path, cxx: str) -> list[str]:
    """The full compile-and-link command line."""
    import jax.ffi

    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.cc"))
    return [
        *shlex.split(cxx),
        *CXXFLAGS,
        f"-isystem{jax.ffi.include_dir()}",
        f"-I{SOURCE_DIR}",
        *sources,
        "-o",
        str(output),
    ]


def build(output_dir: Path | None = None, verbose: bool = False) -> Path:
    """Compile the library (atomically replacing an old one) and return its path; RuntimeError on failure."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    output = Path(output_dir or SOURCE_DIR) / LIBRARY_NAME
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    cmd = command(partial, cxx)
    if verbose:
        print(shlex.join(cmd), file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"native kernel build failed ({shlex.join(cmd)}):\n{result.stderr}")
    os.replace(partial, output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, help="where to write the library (default: this package)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the compiler command")
    args = parser.parse_args()
    print(build(args.output_dir, args.verbose))


if __name__ == "__main__":
    main()

"""The exported-model directory format: names, manifest reading and checks, the weight file's layout and map.

A directory holds `manifest.json`, `weights.bin` (every weight leaf, raw little-endian, each at a 64-byte aligned
offset so that `jax.device_put` of a memory-mapped view aliases the file's pages instead of copying), the tokenizer
(`tokenizer.json`) and one compiled or serialized file per function. `docs/design.md` lists the manifest's fields.
Imports only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hyperjax.errors import HyperjaxError

FORMAT = "hyperjax-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
TOKENIZER = "tokenizer.json"
ALIGNMENT = 64
TARGETS = ("jax", "iree")
REQUIRED = (
    "target", "platforms", "config", "max_context", "buckets", "cache", "functions", "weights", "tokenizer",
    "sampling_defaults", "files",
)  # fmt: skip


class RunnerError(HyperjaxError):
    """An exported directory cannot be run: a file is missing or altered, or it does not fit this runner or input."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (nothing mapped, so RSS does not grow with the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_layout(arrays: Sequence[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Manifest entries {name, dtype, shape, offset, nbytes} placing each array at an ALIGNMENT-byte offset."""
    entries, offset = [], 0
    for name, array in arrays:
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        entry = {"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset}
        entries.append(entry | {"nbytes": int(array.nbytes)})
        offset += array.nbytes
    return entries


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of an export directory; refuses other formats and newer format versions."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise RunnerError(f"{directory}: not an exported model ({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunnerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RunnerError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise RunnerError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise RunnerError(
            f"{path}: format version {version} is newer than this runner reads (up to {FORMAT_VERSION}); "
            "upgrade hyperjax"
        )
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise RunnerError(f"{path}: the manifest lacks {', '.join(missing)}")
    return manifest


def cache_leaves(cache: dict[str, Any]) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each array of the functions' state (a KV cache's keys and values, or an RNN's carries).

    Exports before the "leaves" field described a keys/values pair by one shape and dtype."""
    leaves = cache.get("leaves") or [{"shape": cache["shape"], "dtype": cache["dtype"]}] * 2
    return [(tuple(leaf["shape"]), leaf["dtype"]) for leaf in leaves]


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Check that every file the manifest lists exists and has its recorded sha256."""
    for name, expected in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise RunnerError(f"{directory}: file {name} is missing")
        if sha256_file(path) != expected:
            raise RunnerError(f"{path}: checksum mismatch (the file was altered or truncated); export it again")


def map_weights(directory: Path, manifest: dict[str, Any], mode: str = "r") -> list[np.ndarray]:
    """Memory-mapped views of every weight, in the functions' argument order.

    mode "r" maps read-only; "c" copy-on-write (writable views that share the file's pages until written, for
    runtimes that import only writable host buffers).
    """
    entries = manifest["weights"]["tensors"]
    mapped = np.memmap(Path(directory) / manifest["weights"]["file"], np.uint8, mode)
    views = []
    for entry in entries:
        raw = mapped[entry["offset"] : entry["offset"] + entry["nbytes"]]
        views.append(raw.view(np.dtype(entry["dtype"])).reshape(entry["shape"]))
    return views

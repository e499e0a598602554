"""This process's memory from /proc (Linux): resident set by kind, and how much of one mapped file is resident.

The runner reports these to show that the weights are held once: the weight file's mapped pages are resident, and
anonymous memory (heap, copies) grows by far less than the weights while generating. Elsewhere every figure is None.
"""

from __future__ import annotations

import os
from pathlib import Path

_STATUS_FIELDS = {"VmRSS": "rss_bytes", "RssAnon": "anon_bytes", "RssFile": "file_bytes", "VmHWM": "peak_rss_bytes"}


def status() -> dict[str, int | None]:
    """rss_bytes, anon_bytes, file_bytes (resident file-backed pages) and peak_rss_bytes of this process."""
    found: dict[str, int | None] = dict.fromkeys(_STATUS_FIELDS.values())
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            found[_STATUS_FIELDS[key]] = int(value.split()[0]) * 1024
    return found


def resident_bytes_of(path: str | os.PathLike) -> int | None:
    """Resident bytes of every mapping of `path` in this process (summed over /proc/self/smaps)."""
    target = os.path.realpath(path)
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=5)
                if len(first) >= 5 and "-" in first[0] and ":" in first[3]:  # a mapping's header line
                    inside = len(first) == 6 and first[5].strip() == target
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total

"""Train a byte model on Tiny Shakespeare: `hyperjax train` with a config from train/configs/ (HAKMEM by default).

    python train/shakespeare.py                                   # train/configs/hakmem.toml
    python train/shakespeare.py --config train/configs/rnn.toml --steps 500 --resume

Every `hyperjax train` flag works here; relative paths in the config are read from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.chdir(ROOT)
    args = sys.argv[1:]
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        args = ["--config", str(ROOT / "train" / "configs" / "hakmem.toml"), *args]
    sys.argv = ["hyperjax", "train", *args]
    from hyperjax.cli import main

    main()

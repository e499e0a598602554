"""Entry point: `python serve/run_exported.py DIR PROMPT [options]`, the lean runner (same as `hyperjax-run`)."""

from __future__ import annotations

from hyperjax.runner.cli import main

if __name__ == "__main__":
    main()

"""Entry point: `python -m serve.mcp_server --model PATH [--transport http|stdio] [--port N] [--token T]`."""

from __future__ import annotations

import sys

from hyperjax.serve_mcp import main

if __name__ == "__main__":
    sys.exit(main())

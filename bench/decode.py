"""Decode/prefill benchmark against llama.cpp: `python bench/decode.py [options]`, the same as `hyperjax bench`.

The benchmark lives in `hyperjax.benchmark` so that an installed hyperjax runs it too; see its docstring.
"""

from hyperjax.benchmark import main

if __name__ == "__main__":
    main()

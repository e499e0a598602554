"""hyperjax: small, fast language models in pure-function JAX.

>>> import hyperjax
>>> model = hyperjax.load()            # SmolLM2-135M-Instruct Q4_1, fetched on first use
>>> print(model.generate("Once upon a time", max_tokens=32).text)
"""

from hyperjax.errors import HyperjaxError

__version__ = "0.1.0"
__all__ = ["HyperjaxError", "Model", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "Model"):
        from hyperjax import api

        return getattr(api, name)
    raise AttributeError(f"module 'hyperjax' has no attribute {name!r}")

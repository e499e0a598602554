"""The lean runner of an exported model directory (`hyperjax export`): `hyperjax-run DIR PROMPT`.

Everything under this package imports only the standard library, numpy, tokenizers and, for the chosen target,
jax (`jax.export.deserialize`) or the IREE runtime — never hyperjax's model, io or api modules, flax, optax or orbax.
`tests/test_export.py` enforces the boundary.
"""

"""Trained byte models outside the loop: load a run's checkpoint, quantize its weight matrices to int4, save and load
the quantized model, score it in bits per byte, and wrap it as a `generate.Decoder`.

A quantized model is a directory: `quantized.json` (model and training configs, block format, source step, bits
per byte before and after) and `weights.npz` (per quantized matrix `NAME.packed` uint8 nibbles, `NAME.scales` fp16
and, for Q4_1, `NAME.mins`; float32 arrays as they are). Every 2-D float matrix but the embedding and position
tables is quantized, in blocks of `group_size` along its first axis (the input axis of `x @ W`), when that axis
divides into blocks; the rest stays float32. Loading dequantizes once, so the models' own forward runs unchanged:
the file and the stored weights are int4, the compute is float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyperjax.errors import CheckpointError
from hyperjax.kernels.quant import QuantizedTensor, dequantize, quantize
from hyperjax.train import checkpoint
from hyperjax.train.config import TrainConfig
from hyperjax.train.data import load_bytes, split, val_batches
from hyperjax.train.loop import FORMAT, abstract_state, programs
from hyperjax.train.model import ByteModel, byte_model
from hyperjax.train.parallel import batch_sharding, data_mesh, put_batch, replicated

QUANTIZED_FORMAT = "hyperjax-byte-int4/1"
META_FILE = "quantized.json"
WEIGHTS_FILE = "weights.npz"
FLOAT_TABLES = ("embedding", "position_table", "patch_positions")


def _model_of(meta: dict[str, Any]) -> tuple[TrainConfig, ByteModel]:
    config = TrainConfig(**meta["train_config"])
    return config, byte_model(config.model, config.context, config.model_options)


def load_run(path: str | Path) -> tuple[ByteModel, Any, dict[str, Any]]:
    """(model, float32 params, checkpoint meta) of the best readable checkpoint (by validation loss) of a run."""
    path = Path(path)
    if not (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path} holds no checkpoints/ directory (not a `hyperjax train` run)")
    manager = checkpoint.open_manager(path, read_only=True)
    found = checkpoint.restore(manager, best_first=True)
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint")
    step, _, meta = found
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hyperjax training checkpoint (format {meta.get('format')!r})")
    config, model = _model_of(meta)
    state, meta = checkpoint.restore_step(manager, step, abstract_state(model, config, replicated(data_mesh())))
    return model, state.params, meta


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantize_params(params: Any, kind: str = "q4_0", group_size: int = 32) -> dict[str, Any]:
    """Flat {name: QuantizedTensor of W.T, or float32 array} of a params pytree (see the module docstring)."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _name(path)
        if leaf.ndim == 2 and name.rsplit("/", 1)[-1] not in FLOAT_TABLES and leaf.shape[0] % group_size == 0:
            out[name] = quantize(jnp.asarray(leaf).T, kind, group_size)
        else:
            out[name] = np.asarray(leaf)
    return out


def dequantize_params(flat: dict[str, Any], like: Any) -> Any:
    """float32 params with the structure of `like` (e.g. abstract params) from `quantize_params`' output."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        value = flat[_name(path)]
        leaves.append(dequantize(value).T if isinstance(value, QuantizedTensor) else jnp.asarray(value))
    return jax.tree.unflatten(treedef, leaves)


def quantized_bytes(flat: dict[str, Any]) -> int:
    """Bytes of the weights as stored: packed quants, scales and minimums, plus float32 tensors."""
    return sum(v.nbytes if isinstance(v, QuantizedTensor) else int(np.asarray(v).nbytes) for v in flat.values())


def float_bytes(params: Any) -> int:
    """Bytes of a params pytree as it is (float32)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(params))


def save_quantized(out: str | Path, flat: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `quantized.json` and `weights.npz` into the directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, formats = {}, {}
    for name, value in flat.items():
        if isinstance(value, QuantizedTensor):
            formats[name] = [value.kind, value.group_size]
            arrays[f"{name}.packed"], arrays[f"{name}.scales"] = np.asarray(value.packed), np.asarray(value.scales)
            if value.mins is not None:
                arrays[f"{name}.mins"] = np.asarray(value.mins)
        else:
            arrays[name] = value
    np.savez(out / WEIGHTS_FILE, **arrays)
    (out / META_FILE).write_text(json.dumps({**meta, "format": QUANTIZED_FORMAT, "quantized": formats}, indent=2))
    return out


def load_quantized(path: str | Path) -> tuple[ByteModel, Any, dict[str, Any]]:
    """(model, float32 params dequantized from int4, meta) of a directory written by `save_quantized`."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        weights = np.load(path / WEIGHTS_FILE)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable quantized byte model ({exc})") from None
    if meta.get("format") != QUANTIZED_FORMAT:
        raise CheckpointError(f"{path}: unknown quantized model format {meta.get('format')!r}")
    flat: dict[str, Any] = {}
    for name in {k.split(".")[0] for k in weights.files}:
        if name in meta["quantized"]:
            kind, group = meta["quantized"][name]
            mins = weights[f"{name}.mins"] if f"{name}.mins" in weights.files else None
            flat[name] = QuantizedTensor(weights[f"{name}.packed"], weights[f"{name}.scales"], mins, kind, group)
        else:
            flat[name] = weights[name]
    _, model = _model_of(meta)
    return model, dequantize_params(flat, model.abstract_params()), meta


def load_byte_model(path: str | Path) -> tuple[ByteModel, Any, dict[str, Any]]:
    """A training run's best checkpoint, or a quantized model directory."""
    return load_quantized(path) if (Path(path) / META_FILE).exists() else load_run(path)


def val_bits_per_byte(model: ByteModel, params: Any, meta: dict[str, Any]) -> float:
    """Validation bits per byte of `params` on the run's own validation split and batches."""
    config, _ = _model_of(meta)
    mesh = data_mesh()
    window = config.context + 1
    _, val = split(load_bytes(config.data), window, config.val_fraction)
    batches = put_batch(val_batches(val, config.eval_batches, config.batch_size, window), batch_sharding(mesh))
    params = jax.device_put(params, replicated(mesh))
    return float(programs(model, config, mesh).evaluate(params, batches)) / math.log(2)


def decoder(model: ByteModel, params: Any) -> Any:
    """The `generate.Decoder` of a byte model (`HakmemDecoder` or `ByteDecoder`)."""
    if model.name == "hakmem":
        from hyperjax.models.hakmem import HakmemDecoder

        return HakmemDecoder(model.graphdef, params)
    from hyperjax.models.byte_decoder import ByteDecoder

    return ByteDecoder(model.graphdef, params)

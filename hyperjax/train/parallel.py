"""Data parallelism: batches sharded over a one-axis `jax.sharding.Mesh` ("data"), everything else replicated.

The same code runs on one device, on several local ones and on several processes (after
`jax.distributed.initialize`): every process computes the same global batch from (seed, step) on its host and
hands each of its devices the rows that device owns.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hyperjax.errors import TrainConfigError

AXIS = "data"


def data_mesh() -> Mesh:
    """A mesh of every device (of every process) along the "data" axis."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batches (k, B, W): the batch axis B split over the devices."""
    return NamedSharding(mesh, PartitionSpec(None, AXIS, None))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raise TrainConfigError unless the batch splits evenly over the mesh's devices."""
    if batch_size % mesh.size:
        raise TrainConfigError(f"batch_size {batch_size} must be a multiple of the {mesh.size} devices")


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array of `batch` (the same on every process), each device receiving only its own rows."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def to_host(tree: Any) -> Any:
    """NumPy copies of a pytree of fully replicated arrays (works when other processes hold devices too)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run (call before anything touches a device): every process runs the same command with
    its own `process_id`; process 0 serves `coordinator` (host:port). On CPU, collectives go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)

"""Device mesh helpers: a 1-D data-parallel mesh over the local devices.

Parameters are replicated on every device and batches are split along their first (batch)
axis over the ``data`` mesh axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (axis,))


def batch_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
    """Splits the leading (batch) axis of an array over the mesh axis ``axis``."""
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def num_devices(mesh: Mesh) -> int:
    """Number of devices in the mesh (the batch axis must be a multiple of it)."""
    return int(mesh.devices.size)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Puts host arrays [B, ...] on the mesh, split along B (B divisible by the mesh size)."""
    sharding = batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a pytree (e.g. model parameters) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))

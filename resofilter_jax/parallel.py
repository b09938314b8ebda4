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


# --- Training: a 2-D (data, fsdp) mesh and regex partition rules over HF parameter names. ---

FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a training batch splits over every device of the mesh

# The one partition-rules table: first matching regex (over HF parameter names) wins. Weights
# keep the HF layouts: `nn.Linear` [out, in], GPT-2 `Conv1D` [in, out], embeddings [rows, dim].
# Every matrix is split along one axis over `fsdp` (the larger one where it is known to be the
# larger one); vectors (norms, biases) are replicated. With fsdp = 1 everything is replicated.
PARTITION_RULES: tuple[tuple[str, PartitionSpec], ...] = (
    (r"(embed_tokens|wte|wpe|lm_head)\.weight$", PartitionSpec(FSDP_AXIS, None)),  # [vocab, d]
    (r"(q|k|v|gate|up)_proj\.weight$", PartitionSpec(FSDP_AXIS, None)),  # [out, in]
    (r"(o|down)_proj\.weight$", PartitionSpec(None, FSDP_AXIS)),  # [hidden, in]
    (r"(c_attn|c_fc)\.weight$", PartitionSpec(None, FSDP_AXIS)),  # Conv1D [hidden, out]
    (r"c_proj\.weight$", PartitionSpec(FSDP_AXIS, None)),  # Conv1D [in, hidden]
    (r".*", PartitionSpec()),  # norms and biases
)


def make_train_mesh(
    data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A 2-D ``(data, fsdp)`` mesh; ``data=-1`` takes all remaining devices.

    Raises:
        ValueError: If the axis sizes do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if data < 1 or data * fsdp > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs more than {len(devices)} devices")
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def partition_spec(
    name: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, PartitionSpec]] = PARTITION_RULES,
) -> PartitionSpec:
    """The spec of the first rule matching ``name``; axes that do not divide a dim are dropped.

    Raises:
        ValueError: If no rule matches (end the table with a ``.*`` rule).
    """
    import re

    spec = next((spec for pattern, spec in rules if re.search(pattern, name)), None)
    if spec is None:
        raise ValueError(f"no partition rule matches parameter {name!r}")
    parts = list(spec)[: len(shape)]
    for i, axis in enumerate(parts):
        if axis is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
        if shape[i] % size:
            parts[i] = None  # e.g. a vocabulary not divisible by the fsdp size: keep it whole
    return PartitionSpec(*parts)


def param_shardings(
    shapes: dict[str, Sequence[int]],
    mesh: Mesh,
    rules: Sequence[tuple[str, PartitionSpec]] = PARTITION_RULES,
) -> dict[str, NamedSharding]:
    """{HF name: NamedSharding} for parameters of the given shapes, from ``rules``."""
    return {n: NamedSharding(mesh, partition_spec(n, s, mesh, rules)) for n, s in shapes.items()}


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[accum, rows, ...] training batches: rows split over every device of the mesh."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(None, axes))

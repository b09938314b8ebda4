"""Device mesh helpers: a 1-D data-parallel mesh over the local devices.

Parameters are replicated on every device and batches are split along their first (batch)
axis over the ``data`` mesh axis.
"""

from __future__ import annotations

import contextlib
import os
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


def traced_on(mesh: Mesh) -> contextlib.AbstractContextManager:
    """Context for calling (and so tracing) a jitted step that runs on ``mesh``.

    Kernels that XLA cannot partition (splash attention's Mosaic kernel) read the mesh from
    this context and run per device under ``shard_map`` (``models/attention.py``); without
    it, a splash run on several TPU devices is refused. Nothing else changes: enter it
    around every call of a step (it costs a context switch, and no extra compile).
    """
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


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
# Stacked layer parameters (`model.layers.*.x` [L, ...], `scan_layers`) take the rule of their
# per-layer name and shape behind a leading None: the layer axis is never sharded.
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

    A stacked name (``...layers.*...``, shape [L, ...]) gets the spec of one layer's
    parameter with a leading None (the layer axis is replicated).

    Raises:
        ValueError: If no rule matches (end the table with a ``.*`` rule).
    """
    import re

    from resofilter_jax.models.stacking import is_stacked_name, layer_name

    if is_stacked_name(name):
        return PartitionSpec(None, *partition_spec(layer_name(name, 0), shape[1:], mesh, rules))

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


# --- Multi-process (multi-controller) jobs: jax.distributed initialisation and a global mesh. ---


def distributed_config() -> Any:
    """The ``config.distributed`` section shared by every scoring config (all optional).

    Leave the defaults for a single process, for SLURM (``srun``) and for TPU pod slices:
    those are detected from the environment. Set all three of ``coordinator_address``,
    ``num_processes`` and ``process_id`` to join a job by hand (e.g.
    ``launch/local_multiprocess.sh``). Not part of the run fingerprint: a job may resume with
    another process count.
    """
    import ml_collections

    d = ml_collections.ConfigDict()
    d.coordinator_address = ml_collections.FieldReference(None, field_type=str)  # host:port
    d.num_processes = 1  # processes in the job (explicit mode)
    d.process_id = 0  # this process (explicit mode)
    d.initialization_timeout_s = 300  # how long to wait for all processes to join
    d.heartbeat_timeout_s = 100  # a process silent this long fails the whole job
    return d


def _slurm_multi_task() -> bool:
    """Inside a SLURM step with more than one task (jax's SLURM detector reads the rest)."""
    env = os.environ
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))  # srun sets the first
    return all(k in env for k in needed) and int(tasks) > 1


def _on_tpu_vm() -> bool:
    """TPU chips are attached to this host (found from /sys, without touching a backend)."""
    if os.environ.get("JAX_PLATFORMS", "") not in ("", "tpu"):
        return False
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a private API; no TPU if it is unavailable
        return False


def distributed_mode(config: Any = None) -> str:
    """How this process joins a job: ``explicit``, ``slurm``, ``tpu`` or ``single``."""
    d = config.get("distributed") if config is not None else None
    if d is not None and int(d.get("num_processes", 1) or 1) > 1:
        return "explicit"
    if _slurm_multi_task():
        return "slurm"
    if _on_tpu_vm():
        return "tpu"
    return "single"


def initialize_distributed(config: Any = None) -> dict[str, Any]:
    """Joins the multi-process job this process is part of; does nothing on a single process.

    Modes (first that applies): explicit ``config.distributed`` with ``num_processes > 1``;
    SLURM with ``SLURM_NTASKS > 1`` (coordinator, count and id from jax's SLURM detector);
    a Cloud TPU VM (jax's TPU pod detection, which also handles single-host slices). On CPU
    the cross-process collectives are gloo. Call it before any other JAX use (it is a no-op
    when jax.distributed is already initialised). Logs the process index and count and the
    local and global devices.

    Returns:
        ``{"mode", "process_index", "process_count", "local_devices", "global_devices"}``.

    Raises:
        ValueError: If explicit mode lacks a coordinator address.
    """
    from absl import logging

    mode = distributed_mode(config)
    d = config.get("distributed") if config is not None else None
    timeouts: dict[str, int] = {}
    if d is not None:
        timeouts = {
            "initialization_timeout": int(d.get("initialization_timeout_s", 300)),
            "heartbeat_timeout_seconds": int(d.get("heartbeat_timeout_s", 100)),
        }
    if mode != "single" and not jax.distributed.is_initialized():
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if mode == "explicit":
            if not d.coordinator_address:
                raise ValueError(
                    "config.distributed.num_processes > 1 needs "
                    "config.distributed.coordinator_address=host:port"
                )
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address,
                num_processes=int(d.num_processes),
                process_id=int(d.process_id),
                **timeouts,
            )
        else:  # slurm / tpu: jax detects coordinator, process count and id
            jax.distributed.initialize(**timeouts)
    info = {
        "mode": mode,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": [str(x) for x in jax.local_devices()],
        "global_devices": len(jax.devices()),
    }
    if info["process_count"] > 1:
        logging.info(
            "process %d of %d (%s): %d local devices %s, %d global devices",
            info["process_index"],
            info["process_count"],
            mode,
            len(info["local_devices"]),
            info["local_devices"],
            info["global_devices"],
        )
    return info


def global_devices(num_local: int = 0) -> list[jax.Device]:
    """The devices of every process, process by process (the first ``num_local`` of each).

    Ordered by (process index, device id), so process p's devices hold a contiguous block
    of a batch split over a 1-D mesh of them.
    """
    devices = sorted(jax.devices(), key=lambda x: (x.process_index, x.id))
    if num_local:
        by_proc: dict[int, list[jax.Device]] = {}
        for x in devices:
            by_proc.setdefault(x.process_index, []).append(x)
        devices = [x for p in sorted(by_proc) for x in by_proc[p][:num_local]]
    return devices

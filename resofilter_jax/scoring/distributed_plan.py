"""Multi-process scoring: each process's rows of a shard, one global batch plan, global arrays.

In a multi-controller job every process runs the same program over a mesh of all devices of
all processes, so every process must dispatch the SAME sequence of jitted steps with the
SAME shapes. Within a shard, process p encodes only its contiguous sub-slice of the rows
(:func:`resofilter_jax.data.batching.host_slice`); the sequence lengths of all processes are
all-gathered (one fixed-shape int array per shard) and every process computes the same
:func:`plan_global_batches`: each global batch has ``rows_per_process`` rows of every
process (its own sequences, in length order, padded with masked dummy rows where it has
fewer), so process p's rows land on its own devices and nothing is dropped or duplicated.
Global arrays are formed with ``jax.make_array_from_process_local_data`` and only the
addressable rows of a result are read back.

With one process :class:`Hosts` falls back to the single-process calls (``device_put`` and
``np.asarray``) and the runners keep using ``plan_batches`` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from resofilter_jax.data import host_slice
from resofilter_jax.parallel import batch_sharding, num_devices, shard_batch


@dataclasses.dataclass(frozen=True)
class GlobalPlan:
    """One global batch: sequence length and, per process, its local item indices.

    Attributes:
        length: Padded sequence length L (a bucket).
        rows: [P, R] int64 item indices local to each process (-1: dummy row); the global
            batch is the processes' rows stacked in process order, [P * R] rows.
    """

    length: int
    rows: np.ndarray


def plan_global_batches(
    lengths: Sequence[np.ndarray],
    *,
    buckets: Sequence[int],
    token_budget: int,
    devices_per_process: int,
    pow2_tail: bool = True,
) -> list[GlobalPlan]:
    """The batch plan every process computes from all processes' sequence lengths.

    Global batches are sized as ``plan_batches`` sizes them for ``P * devices_per_process``
    devices (``token_budget`` is per global batch); each process contributes an equal share
    R = rows / P. Per bucket, each process's items (sorted by length, ties by index) are cut
    into consecutive runs of R; the bucket has as many batches as its fullest process needs.
    With ``pow2_tail`` the bucket's last batch shrinks to ``devices_per_process`` times a
    power of two rows per process (enough for the fullest process), so few shapes compile.

    Args:
        lengths: Per process, [n_p] sequence lengths of its items.
        buckets: Bucket lengths (every length must fit the largest).
        token_budget: Padded tokens per global batch.
        devices_per_process: Local devices of every process (the same on all).
        pow2_tail: Shrink each bucket's last batch to a power-of-two multiple.

    Returns:
        The plans, ordered by bucket (identical on every process for identical inputs).

    Raises:
        ValueError: If an item is longer than the largest bucket.
    """
    n_proc, per_dev = len(lengths), devices_per_process
    edges = np.asarray(sorted(set(buckets)), np.int64)  # [n_buckets]
    sorted_items = []  # per process: (bucket id per item, items sorted by bucket/length/index)
    for lens in lengths:
        lens = np.asarray(lens, np.int64).reshape(-1)  # [n_p]
        if lens.size and lens.max() > edges[-1]:
            raise ValueError(f"an item of {int(lens.max())} tokens exceeds bucket {edges[-1]}")
        which = np.searchsorted(edges, lens, side="left")  # [n_p]
        order = np.lexsort((np.arange(lens.size), lens, which))
        sorted_items.append((which, order))
    plans = []
    for b, length in enumerate(edges.tolist()):
        members = [order[which[order] == b] for which, order in sorted_items]  # per process
        most = max(m.size for m in members)
        if most == 0:
            continue
        n_dev = n_proc * per_dev
        rows = max(n_dev, token_budget // length // n_dev * n_dev)  # as plan_batches sizes it
        per = rows // n_proc  # rows of each process in a full batch (a multiple of per_dev)
        for s in range(0, most, per):
            take = per
            if pow2_tail and most - s < per:
                units = -(-(most - s) // per_dev)  # ceil
                take = min(per, per_dev * (1 << (units - 1).bit_length()))
            block = np.full((n_proc, take), -1, np.int64)  # [P, R]
            for p, m in enumerate(members):
                got = m[s : s + take]
                block[p, : got.size] = got
            plans.append(GlobalPlan(int(length), block))
    return plans


class Hosts:
    """This process's place in the job and the cross-process steps the runners need.

    Attributes:
        index, count: ``jax.process_index()`` / ``jax.process_count()``.
        mesh: The 1-D data mesh (devices ordered by process).
        local: Devices of the mesh on this process.
    """

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.index, self.count = jax.process_index(), jax.process_count()
        devices = list(mesh.devices.flat)
        self.local = sum(1 for x in devices if x.process_index == self.index)
        if self.count > 1 and self.local * self.count != len(devices):
            raise ValueError("every process must hold the same number of mesh devices")

    @property
    def multi(self) -> bool:
        """More than one process."""
        return self.count > 1

    @property
    def devices(self) -> int:
        """Devices of the whole mesh."""
        return num_devices(self.mesh)

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        """This process's contiguous sub-range of rows ``[lo, hi)``."""
        r = host_slice(range(lo, hi), self.index, self.count)
        return r.start, r.stop

    def allgather_lengths(self, lengths: Sequence[int], cap: int) -> list[np.ndarray]:
        """Every process's lengths (each at most ``cap`` of them), in process order."""
        if not self.multi:
            return [np.asarray(lengths, np.int64)]
        from jax.experimental import multihost_utils

        if len(lengths) > cap:
            raise ValueError(f"{len(lengths)} sequences exceed the per-process cap {cap}")
        buf = np.full((cap,), -1, np.int32)  # fixed shape: one compiled gather for all shards
        buf[: len(lengths)] = lengths
        got = np.asarray(multihost_utils.process_allgather(buf))  # [P, cap]
        return [row[row >= 0].astype(np.int64) for row in got]

    def agree_todo(self, todo: Sequence[int], n_shards: int) -> list[int]:
        """The union of every process's shards to compute (all then run the same shards)."""
        if not self.multi:
            return sorted(todo)
        from jax.experimental import multihost_utils

        mask = np.zeros((max(n_shards, 1),), np.int32)
        mask[list(todo)] = 1
        got = np.asarray(multihost_utils.process_allgather(mask))  # [P, n_shards]
        return [int(k) for k in np.nonzero(got.max(axis=0)[:n_shards])[0]]

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (a collective: every process must call)."""
        if not self.multi:
            return flag
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))  # [P, 1]
        return bool(np.asarray(got).max())

    def barrier(self, name: str) -> None:
        """Waits for every process (no-op on one)."""
        if self.multi:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows [R, ...] -> global arrays [P * R, ...] split over the mesh."""
        if not self.multi:
            return shard_batch(batch, self.mesh)
        sharding = batch_sharding(self.mesh)
        return {
            k: jax.make_array_from_process_local_data(
                sharding, v, (v.shape[0] * self.count, *v.shape[1:])
            )
            for k, v in batch.items()
        }

    def to_local(self, x: Any) -> np.ndarray:
        """This process's rows of a result split over the batch axis (blocks until ready)."""
        if not self.multi:
            return np.asarray(x)
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        parts, seen = [], set()
        for s in shards:  # replicated results: one copy per row block
            start = s.index[0].start or 0
            if start not in seen:
                seen.add(start)
                parts.append(np.asarray(s.data))
        return np.concatenate(parts, axis=0)

    def local_tree(self, tree: Any) -> Any:
        """:meth:`to_local` over a pytree of results."""
        return jax.tree.map(self.to_local, tree)

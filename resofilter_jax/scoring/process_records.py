"""This process's records of a multi-process IFD job, read in one streaming pass.

In a multi-process job process p scores a contiguous part of every shard
(:meth:`resofilter_jax.scoring.distributed_plan.Hosts.rows`). Reading the input as a stream
and keeping only those rows means no process holds the whole dataset in memory: at most its
own rows plus one shard of ``shard_size`` records being read. The last shard is split by its
real size, so this holds the exact rows ``Hosts.rows`` asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from resofilter_jax.data import Record, host_slice


class ProcessRecords:
    """The number of records of the whole input, but only this process's records.

    Indexing and slicing take global record positions and work inside this process's rows
    (``records[lo:hi]`` for ``lo, hi = hosts.rows(...)``); touching another process's rows is
    an IndexError.

    Attributes:
        total: Records in the whole input.
        has_id: Whether any record (of any process) has an ``id``.
    """

    def __init__(self, total: int, own: dict[int, Record], has_id: bool):
        self.total, self._own, self.has_id = total, own, has_id

    def __len__(self) -> int:
        return self.total

    def _get(self, i: int) -> Record:
        try:
            return self._own[i]
        except KeyError:
            raise IndexError(f"record {i} belongs to another process") from None

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.total)
            return [self._get(i) for i in range(lo, hi, step)]
        return self._get(key if key >= 0 else key + self.total)

    def __iter__(self) -> Iterator[Record]:
        raise TypeError("ProcessRecords holds one process's rows; iterate own_records()")

    def own_records(self) -> list[Record]:
        """This process's records, in input order."""
        return [self._own[i] for i in sorted(self._own)]


def stream_process_records(
    records: Iterable[Record], *, shard_size: int, process_index: int, process_count: int
) -> ProcessRecords:
    """Consumes ``records`` once, keeping process ``process_index``'s part of every shard."""
    own: dict[int, Record] = {}
    shard: list[Record] = []
    total, has_id = 0, False

    def keep(first: int) -> None:
        part = host_slice(range(first, first + len(shard)), process_index, process_count)
        for i in part:
            own[i] = shard[i - first]

    for record in records:
        has_id = has_id or record.id is not None
        shard.append(record)
        total += 1
        if len(shard) == shard_size:
            keep(total - len(shard))
            shard = []
    if shard:
        keep(total - len(shard))
    return ProcessRecords(total, own, has_id)

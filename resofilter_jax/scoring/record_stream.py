"""The scorer's input as a stream: one scan pass, then shards read on demand.

A selection pool can hold millions of rows, so the scorer never holds the whole input. A
first pass (:func:`scan_records`) reads every record once and keeps only what the run needs
about all of them: the count, whether any row has an ``id`` and, for resonance, the first
occurrence of every query (:class:`DuplicateFinder`: a 128-bit hash per record, not the
text). The scoring loop then reads its rows shard by shard from a second pass
(:class:`StreamedRecords`); memory holds the shards in flight, not the input.

Every process of a multi-process job scans the whole input, so each finds the same
duplicates (the hashes of every query, computed in input order), and then reads only its own
part of every shard; nothing has to be exchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from resofilter_jax.data import Record
from resofilter_jax.data.templates import user_query

HASH_BYTES = 16  # 128 bits: a false match among 10^8 queries has probability ~1e-23


def query_hash(record: Record) -> bytes:
    """The 128-bit BLAKE2b digest of the record's user query (instruction [+ input])."""
    text = user_query(record).encode("utf-8", "surrogatepass")  # lone surrogates survive JSON
    return hashlib.blake2b(text, digest_size=HASH_BYTES).digest()


class DuplicateFinder:
    """Finds, for every record added, the first earlier record with the same user query.

    Memory: 16 bytes of hash + 8 bytes of row index per record (no text is kept).
    """

    def __init__(self) -> None:
        self._hashes = bytearray()  # [n_ok * 16]: digests of the ok records
        self._positions = array("q")  # [n_ok]: their positions among all records added
        self._indices = array("q")  # [n]: Record.index of every record added

    def add(self, record: Record) -> None:
        """Adds the next record (error records never match anything)."""
        if record.ok:
            self._hashes += query_hash(record)
            self._positions.append(len(self._indices))
        self._indices.append(record.index)

    def first_positions(self) -> np.ndarray:
        """[n] int64: the position of the first record with the same query; -1 for first
        occurrences and error records."""
        n = len(self._indices)
        out = np.full(n, -1, np.int64)
        pos = np.frombuffer(self._positions, np.int64) if self._positions else np.zeros(0, np.int64)
        if pos.size < 2:
            return out
        words = np.frombuffer(bytes(self._hashes), "<u8").reshape(-1, 2)  # [n_ok, 2]
        order = np.lexsort((pos, words[:, 1], words[:, 0]))  # by hash, then position
        sorted_words = words[order]
        starts = np.ones(order.size, bool)  # [n_ok]: first of its hash group (in sort order)
        starts[1:] = np.any(sorted_words[1:] != sorted_words[:-1], axis=1)
        group = np.cumsum(starts) - 1  # [n_ok] group id in sort order
        first = pos[order[starts]][group]  # [n_ok] first position of each row's group
        mine = pos[order]
        later = first != mine
        out[mine[later]] = first[later]
        return out

    def duplicate_of(self) -> np.ndarray:
        """[n] int64: the ``Record.index`` of the first record with the same query; -1 for
        first occurrences and error records."""
        first = self.first_positions()
        indices = np.frombuffer(self._indices, np.int64) if self._indices else first
        return np.where(first >= 0, indices[np.maximum(first, 0)], -1)


def duplicate_of(records: Iterable[Record]) -> np.ndarray:
    """[n] int64 of :meth:`DuplicateFinder.duplicate_of` over ``records``."""
    finder = DuplicateFinder()
    for r in records:
        finder.add(r)
    return finder.duplicate_of()


class ScanResult:
    """What the scan pass learned about the whole input.

    Attributes:
        total: Records in the input.
        has_id: Whether any record has an ``id``.
        duplicate_of: [total] int64 (when asked for): the ``Record.index`` of the first
            record with the same query, -1 for first occurrences and error records.
    """

    def __init__(self, total: int, has_id: bool, duplicate_of: np.ndarray | None) -> None:
        self.total, self.has_id, self.duplicate_of = total, has_id, duplicate_of


def scan_records(records: Iterable[Record], *, find_duplicates: bool) -> ScanResult:
    """Consumes ``records`` once: count, ids and (optionally) duplicate queries."""
    finder = DuplicateFinder() if find_duplicates else None
    total, has_id = 0, False
    for r in records:
        total += 1
        has_id = has_id or r.id is not None
        if finder is not None:
            finder.add(r)
    return ScanResult(total, has_id, finder.duplicate_of() if finder is not None else None)


class StreamedRecords:
    """The ``total`` records of a re-readable input, served a slice at a time.

    ``records[lo:hi]`` reads forward from the last position (rows before ``lo`` are read and
    dropped); a slice behind the current position re-opens the input. The scoring loop asks
    for its shards in input order, so a run reads the input once. Safe to use from the
    loop's prefetch thread.
    """

    def __init__(self, open_records: Callable[[], Iterator[Record]], total: int) -> None:
        self._open, self.total = open_records, total
        self._it: Iterator[Record] | None = None
        self._pos = 0  # position of the next record self._it yields
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.total)
            if step != 1:
                raise ValueError("StreamedRecords serves contiguous slices only")
            return self._read(lo, hi)
        i = key if key >= 0 else key + self.total
        if not 0 <= i < self.total:
            raise IndexError(f"record {key} out of range for {self.total} records")
        return self._read(i, i + 1)[0]

    def __iter__(self) -> Iterator[Record]:
        return iter(self._open())

    def _read(self, lo: int, hi: int) -> list[Record]:
        if hi <= lo:
            return []
        with self._lock:
            if self._it is None or lo < self._pos:
                self._it, self._pos = iter(self._open()), 0
            out = list(itertools.islice(self._it, lo - self._pos, hi - self._pos))
            self._pos = hi
            if len(out) != hi - lo:  # the file is shorter than when it was scanned
                raise RuntimeError(
                    f"the input ended at record {lo + len(out)} but held {self.total} when it "
                    "was scanned: it changed during the run"
                )
            return out


__all__ = [
    "DuplicateFinder",
    "ScanResult",
    "StreamedRecords",
    "duplicate_of",
    "query_hash",
    "scan_records",
]

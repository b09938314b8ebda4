"""Score files read column by column: only the columns a command needs, never a row at a time.

A ``scores.parquet`` is read with pyarrow (one column at a time, ``status`` dictionary-encoded);
a ``scores.jsonl`` is parsed line by line into object columns (it has no column layout to skip).
:meth:`ScoreFile.iter_values` streams the values of chosen rows in a given order, so attaching
score columns to millions of output rows never holds them all.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resofilter_jax.data import DUPLICATE, status_counts

__all__ = [
    "BLOCK",
    "PARQUET_READ",
    "ScoreFile",
    "Statuses",
    "as_float",
    "is_sorted",
    "json_values",
    "jsonable",
    "read_scores",
    "release_memory",
]

BLOCK = 1 << 16  # rows per block of streamed values
# pyarrow's default pre_buffer=True keeps every column chunk read for the reader's lifetime
# (a column read twice its size, a streamed pass the whole file); read through a buffer instead.
PARQUET_READ = {"pre_buffer": False, "buffer_size": 1 << 20}
_GROUP = DUPLICATE[:-1]  # every duplicate_of:<i> status counts as "duplicate_of"


def release_memory() -> None:
    """Returns the memory pyarrow's allocator keeps after large frees to the system."""
    pa.default_memory_pool().release_unused()


def as_float(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """[n] float64 with None -> NaN (numeric numpy arrays are converted without a Python loop)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        return values.astype(np.float64, copy=False)
    return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)


def jsonable(value: Any) -> Any:
    """A numpy scalar as a Python value; NaN / inf as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_values(column: np.ndarray) -> list[Any]:
    """``[jsonable(v) for v in column]``, through one ``tolist`` instead of per-item numpy."""
    values = column.tolist()
    if column.dtype.kind == "f":
        for j in np.flatnonzero(~np.isfinite(column)).tolist():
            values[j] = None
    elif column.dtype == object:
        return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
    return values


def is_sorted(index: np.ndarray, turn: np.ndarray | None = None) -> bool:
    """Whether the (index, turn) keys are in non-decreasing lexicographic order."""
    if len(index) < 2:
        return True
    di = np.diff(index)  # [n - 1]
    if turn is None:
        return bool(np.all(di >= 0))
    return bool(np.all((di > 0) | ((di == 0) & (np.diff(turn) >= 0))))


def _grouped_counts(values: Sequence[Any], counts: Sequence[int]) -> dict[str, int]:
    """``data.status_counts`` of ``values[i]`` repeated ``counts[i]`` times."""
    out: collections.Counter[str] = collections.Counter()
    for v, c in zip(values, counts, strict=True):
        if c:
            s = str(v)
            out[_GROUP if s.startswith(DUPLICATE) else s] += int(c)
    return dict(sorted(out.items()))


class Statuses(NamedTuple):
    """The status column summarised: ``ok`` [n] bool and the rows per status (``status_counts``)."""

    ok: np.ndarray
    counts: dict[str, int]


def status_summary(status: np.ndarray | None, n: int) -> Statuses:
    """:class:`Statuses` of an in-memory status column (None: every row ``ok``)."""
    if status is None:
        return Statuses(np.ones(n, bool), {"ok": n} if n else {})
    ok = np.fromiter((s == "ok" for s in status), bool, len(status))
    return Statuses(ok, status_counts(status))


def read_scores(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every column of a ``scores.parquet`` or ``scores.jsonl`` file as numpy arrays."""
    sf = ScoreFile(path)
    return {c: sf.column(c) for c in sf.names}


class ScoreFile:
    """A score file opened for column reads.

    Attributes:
        path: The file.
        names: Its column names (JSONL: the keys of its first row).
        num_rows: Its row count.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._cols: dict[str, np.ndarray] | None = None
        self._pf: pq.ParquetFile | None = None
        if self.path.suffix == ".parquet":
            self._pf = pq.ParquetFile(self.path, **PARQUET_READ)
            self.names: list[str] = list(self._pf.schema_arrow.names)
            self.num_rows: int = self._pf.metadata.num_rows
        else:
            self._cols = _read_jsonl(self.path)
            self.names = list(self._cols)
            self.num_rows = len(next(iter(self._cols.values()))) if self._cols else 0

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _arrow(self, name: str) -> pa.ChunkedArray:
        assert self._pf is not None
        return self._pf.read(columns=[name]).column(0)

    def column(self, name: str) -> np.ndarray:
        """One column as numpy (parquet nulls: NaN in numbers, None in objects)."""
        if self._cols is not None:
            return self._cols[name]
        return self._arrow(name).to_numpy(zero_copy_only=False)

    def floats(self, name: str) -> np.ndarray:
        """[n] float64 of a numeric column (None -> NaN)."""
        return as_float(self.column(name))

    def is_numeric(self, name: str) -> bool:
        """Whether column ``name`` holds numbers (ints, floats, nulls; not bools or lists)."""
        if self._pf is not None:
            t = self._pf.schema_arrow.field(name).type
            return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)
        assert self._cols is not None
        return all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in self._cols[name]
        )

    def numeric_column(self, name: str) -> np.ndarray:
        """[n] float64 of the numeric column ``name`` (None -> NaN).

        Raises:
            ValueError: If the file has no such column or it is not numeric.
        """
        if name not in self:
            raise ValueError(f"{self.path} has no `{name}` column")
        if not self.is_numeric(name):
            numeric = [c for c in self.names if self.is_numeric(c)]
            raise ValueError(
                f"column `{name}` of {self.path} is not numeric; numeric columns: {numeric[:20]}"
            )
        return self.floats(name)

    def keys(self) -> tuple[np.ndarray, np.ndarray | None]:
        """[n] ``index`` and [n] ``turn`` (None when the file has no ``turn``), as read."""
        turn = self.column("turn") if "turn" in self else None
        return self.column("index"), turn

    def statuses(self) -> Statuses:
        """The ``status`` column as an ok mask and counts, via its dictionary (parquet)."""
        if "status" not in self:
            return status_summary(None, self.num_rows)
        if self._cols is not None:
            return status_summary(self._cols["status"], self.num_rows)
        pf = pq.ParquetFile(self.path, read_dictionary=["status"], **PARQUET_READ)
        ok, values, counts = [], [], []
        for chunk in pf.read(columns=["status"]).column(0).chunks:  # dictionary<string>
            if not pa.types.is_dictionary(chunk.type) or chunk.null_count:
                chunk = pc.fill_null(chunk.cast(pa.string()), "None").dictionary_encode()
            codes = chunk.indices.to_numpy()  # [rows of the chunk]
            words = chunk.dictionary
            ok.append(pc.equal(words, "ok").to_numpy(zero_copy_only=False)[codes])
            values += words.to_pylist()
            counts.append(np.bincount(codes, minlength=len(words)))
        flat = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        mask = np.concatenate(ok) if ok else np.zeros(0, bool)
        return Statuses(mask, _grouped_counts(values, flat))

    def _nullable_ints(self, names: Sequence[str]) -> set[str]:
        """Integer columns with a null somewhere (numpy turns those into float64)."""
        assert self._pf is not None
        out = set()
        schema = self._pf.schema_arrow
        for name in names:
            if not pa.types.is_integer(schema.field(name).type):
                continue
            j = self._pf.schema_arrow.get_field_index(name)
            md = self._pf.metadata
            stats = [md.row_group(g).column(j).statistics for g in range(md.num_row_groups)]
            if all(s is not None and s.has_null_count for s in stats):
                nulls = sum(s.null_count for s in stats)
            else:
                nulls = self._arrow(name).null_count
            if nulls:
                out.add(name)
        return out

    def iter_values(
        self, names: Sequence[str], order: np.ndarray
    ) -> Iterator[tuple[np.ndarray, dict[str, list[Any]]]]:
        """JSON values of the ``names`` columns at the rows ``order``, in blocks of that order.

        Yields ``(positions, {name: [value per position]})``, the values as :func:`jsonable`
        makes them from :meth:`column`; absent names are left out. An ascending ``order``
        streams the file once; any other order first gathers its rows (memory: one numpy
        value per row and name).
        """
        order = np.asarray(order, np.int64)
        names = [n for n in names if n in self]
        for pos, vals in self._blocks(names, order):
            yield pos, {n: json_values(v) for n, v in vals.items()}

    def _blocks(
        self, names: list[str], order: np.ndarray
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """:meth:`iter_values` with the values as numpy arrays."""
        if self._cols is not None or not names:
            cols = self._cols or {}
            for s in range(0, len(order), BLOCK):
                pos = order[s : s + BLOCK]
                yield pos, {n: cols[n][pos] for n in names}
            return
        if len(order) > 1 and np.any(np.diff(order) < 0):
            uniq, back = np.unique(order, return_inverse=True)  # order == uniq[back]
            parts = [vals for _, vals in self._stream(names, uniq)]
            cols = {n: np.concatenate([p[n] for p in parts]) for n in names}
            for s in range(0, len(order), BLOCK):
                sel = back[s : s + BLOCK]
                yield order[s : s + BLOCK], {n: cols[n][sel] for n in names}
            return
        yield from self._stream(names, order)

    def _stream(
        self, names: list[str], order: np.ndarray
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The ``names`` columns at ascending rows ``order``: one pass over the file's batches."""
        assert self._pf is not None
        floats = self._nullable_ints(names)
        start, done = 0, 0
        for batch in self._pf.iter_batches(batch_size=BLOCK, columns=names):
            if done == len(order):
                break
            end = start + batch.num_rows
            stop = done + int(np.searchsorted(order[done:], end, side="left"))
            if stop > done:
                local = pa.array(order[done:stop] - start)
                vals = {}
                for n in names:
                    arr = batch.column(n).take(local).to_numpy(zero_copy_only=False)
                    vals[n] = arr.astype(np.float64) if n in floats else arr
                yield order[done:stop], vals
                done = stop
            start = end


def _read_jsonl(path: Path) -> dict[str, np.ndarray]:
    """The columns of a ``scores.jsonl`` (keys of its first row; missing keys -> None)."""
    keys: list[str] | None = None
    cols: dict[str, list[Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row: Mapping[str, Any] = json.loads(line)
            if keys is None:
                keys = list(row)
                cols = {k: [] for k in keys}
            for k in keys:
                cols[k].append(row.get(k))
    return {k: _object_array(v) for k, v in cols.items()}


def _object_array(values: list[Any]) -> np.ndarray:
    """``np.asarray(values, dtype=object)`` as a flat [n] array (values may be lists)."""
    out = np.empty(len(values), object)
    out[:] = values
    return out

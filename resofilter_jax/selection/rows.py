"""Scored rows: the scored data read back in one pass, and the output rows built from it.

The data file is read once, in input order, and only the selected rows are parsed (JSONL,
Parquet) or kept (other readers). Score files are read by
:mod:`resofilter_jax.selection.score_file`, output files written by
:mod:`resofilter_jax.selection.output`, names and the scorer's settings come from
:mod:`resofilter_jax.selection.settings` (re-exported here); the policies live in
:mod:`resofilter_jax.selection.policies`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.data import (
    READERS,
    DataError,
    Record,
    RowError,
    detect_reader,
    iter_raw_rows,
    to_records,
)
from resofilter_jax.data.readers import parquet_row  # the reader's own row conversion
from resofilter_jax.data.sources import naming_the_file
from resofilter_jax.data.templates import user_query
from resofilter_jax.selection.output import write_rows
from resofilter_jax.selection.score_file import (
    BLOCK,
    PARQUET_READ,
    ScoreFile,
    as_float,
    jsonable,
    read_scores,
)
from resofilter_jax.selection.settings import (
    RUN_CONFIG,
    embedding_model,
    kept_label,
    rate_output_path,
    scored_data_settings,
    scored_model_settings,
)

# (index, turn): a score row's key; `turn` is 0 outside ShareGPT "all" mode.
RowKey = tuple[int, int]
RawRow = tuple[int, Any]  # (row number, dict | RowError), as data.iter_raw_rows yields
_BOM = b"\xef\xbb\xbf"


def row_keys(cols: Mapping[str, np.ndarray]) -> list[RowKey]:
    """The (index, turn) of every score row (small files; the pipelines use arrays)."""
    turns = cols["turn"] if "turn" in cols else np.zeros(len(cols["index"]), np.int64)
    return [(int(i), int(t)) for i, t in zip(cols["index"], turns, strict=True)]


def _not_found(lost: set[Any], data: str) -> ValueError:
    return ValueError(
        f"{len(lost)} selected rows (e.g. index {min(lost)}) are not in {data}: "
        "is it the file that was scored?"
    )


# --- the data file, one pass ---------------------------------------------------------------


def _parse_line(raw: bytes, lineno: int) -> dict[str, Any] | RowError:
    """One JSONL line as ``data.iter_raw_rows`` reads it (same row errors and messages;
    ``tests/test_select_large.py`` holds the two readers to the same rows)."""
    where = f"line {lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start} of line")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RowError("bad_json", f"{where}: {e.msg} at column {e.colno}")
    except RecursionError:
        return RowError("bad_json", f"{where}: nested too deeply for the JSON decoder")
    except ValueError as e:  # e.g. an integer longer than int_max_str_digits
        return RowError("bad_json", f"{where}: {e}")
    if isinstance(value, dict):
        return value
    return RowError("not_an_object", f"{where}: expected a JSON object, got {type(value).__name__}")


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted unique int64 values (no sort when ``a`` already ascends strictly)."""
    a = np.asarray(a, np.int64)
    return a if len(a) < 2 or bool(np.all(a[1:] > a[:-1])) else np.unique(a)


def _ints(a: np.ndarray) -> Iterator[int]:
    """The values of an int array as Python ints, converted a block at a time."""
    for s in range(0, len(a), BLOCK):
        yield from a[s : s + BLOCK].tolist()


def _jsonl_rows_at(path: str, wanted: np.ndarray, first_good: bool) -> Iterator[RawRow]:
    """The wanted rows of a JSONL file; other lines are only counted, never parsed."""
    targets = _ints(wanted)
    target, number = next(targets, None), 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if target is None and not first_good:
                return
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            if not raw.strip():
                continue  # blank lines are not rows
            hit = target == number
            if hit or first_good:
                row = _parse_line(raw, lineno)
                if hit or isinstance(row, dict):
                    yield number, row
                first_good = first_good and not isinstance(row, dict)
                if hit:
                    target = next(targets, None)
            number += 1


def _batch_rows(batch: Any, first: int) -> list[dict[str, Any] | RowError]:
    """The rows of a record batch as ``data.iter_raw_rows`` converts them (``first``: the row
    number of its first row): a batch that does not convert as a whole goes row by row."""
    try:
        return batch.to_pylist()
    except (ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
        return [parquet_row(batch, i, f"row {first + i}") for i in range(batch.num_rows)]


def _parquet_rows_at(path: str, wanted: np.ndarray, first_good: bool) -> Iterator[RawRow]:
    """The wanted rows of a Parquet data file, taken batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, **PARQUET_READ)
        start, k = 0, 0
        for batch in pf.iter_batches(batch_size=4096):
            if k == len(wanted) and not first_good:
                return
            end = start + batch.num_rows
            stop = int(np.searchsorted(wanted, end))
            local = (wanted[k:stop] - start).tolist()
            k = stop
            if first_good:  # convert the whole batch until a readable row turns up
                rows = _batch_rows(batch, start)
                good = next((j for j, r in enumerate(rows) if isinstance(r, dict)), None)
                first_good = good is None
                for j in sorted({*local, *([] if good is None else [good])}):
                    yield start + j, rows[j]
            elif local:
                taken = batch.take(pa.array(local, pa.int64()))
                try:
                    rows = taken.to_pylist()
                except (ValueError, OverflowError):
                    rows = [parquet_row(taken, i, f"row {start + j}") for i, j in enumerate(local)]
                yield from zip((start + j for j in local), rows, strict=True)
            start = end
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e


def iter_rows_at(
    data: str,
    numbers: np.ndarray,
    *,
    reader: str = "auto",
    allow_truncated: bool = True,
    first_good: bool = False,
) -> Iterator[RawRow]:
    """``(row number, dict | RowError)`` of the rows ``numbers`` (ascending) of ``data``.

    One pass in input order, the rows as ``data.iter_raw_rows(on_error="status")`` gives them.
    JSONL and Parquet parse only the wanted rows and stop after the last; other readers read
    everything and keep the wanted rows. ``first_good``: also yield the first row that is a
    dict (what format detection looks at), wanted or not.
    """
    wanted = _unique(numbers)
    kind = detect_reader(data) if reader == "auto" else reader
    if reader in ("auto", "jsonl", "parquet") and kind in ("jsonl", "parquet"):
        if not Path(data).is_file():
            raise DataError(f"{data}: no such file")
        if kind == "jsonl":
            return _jsonl_rows_at(data, wanted, first_good)
        return _parquet_rows_at(data, wanted, first_good)
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    rows = iter_raw_rows(data, reader=reader, on_error="status", allow_truncated=allow_truncated)
    return _keep(rows, wanted, first_good)


def _keep(rows: Iterable[RawRow], wanted: np.ndarray, first_good: bool) -> Iterator[RawRow]:
    """The rows of ``wanted`` (ascending) and, with ``first_good``, the first dict row."""
    targets = _ints(wanted)
    target = next(targets, None)
    for number, row in rows:  # every row is read: the reader's own checks run to the end
        while target is not None and target < number:
            target = next(targets, None)
        if number == target or (first_good and isinstance(row, dict)):
            first_good = first_good and not isinstance(row, dict)
            yield number, row


def iter_raw_for(
    data: str, index: np.ndarray, *, reader: str = "auto", allow_truncated: bool = True
) -> Iterator[Any]:
    """The raw row (dict or ``RowError``) of each entry of the non-decreasing ``index``.

    Raises:
        ValueError: After the pass, if an index is not a row of ``data``.
    """
    index = np.asarray(index, np.int64)
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]]) if len(index) else index
    uniq, counts = index[starts], np.diff(np.r_[starts, len(index)])  # runs of equal entries
    rows = iter_rows_at(data, uniq, reader=reader, allow_truncated=allow_truncated)
    for u, c in zip(_ints(uniq), _ints(counts), strict=True):
        number, row = next(rows, (None, None))
        if number != u:
            seen = {number} | {n for n, _ in rows}
            raise _not_found(set(uniq.tolist()) - seen - set(uniq[uniq < u].tolist()), data)
        for _ in range(c):
            yield row


def iter_records_for(
    data: str,
    index: np.ndarray,
    turn: np.ndarray,
    *,
    fmt: str = "auto",
    fields: Mapping[str, str] | None = None,
    sharegpt_turns: str = "first",
    reader: str = "auto",
    allow_truncated: bool = True,
) -> Iterator[Record]:
    """The record of each (index, turn) key, keys in non-decreasing order, converted as the
    scorer converted them (``data.to_records`` with ``on_error="status"``).

    Raises:
        ValueError: After the pass, if a key has no ok record in ``data`` (wrong file or format).
    """
    index, turn = np.asarray(index, np.int64), np.asarray(turn, np.int64)
    rows = iter_rows_at(
        data, index, reader=reader, allow_truncated=allow_truncated, first_good=fmt == "auto"
    )
    records = naming_the_file(
        to_records(
            rows,
            fmt,
            fields=dict(fields) if fields else None,
            sharegpt_turns=sharegpt_turns,  # type: ignore[arg-type]
            on_error="status",
        ),
        data,
    )
    rec: Record | None = next(records, None)
    for i, t in zip(_ints(index), _ints(turn), strict=True):
        while rec is not None and (rec.index, rec.turn) < (i, t):
            rec = next(records, None)
        if rec is None or (rec.index, rec.turn) != (i, t) or not rec.ok:
            wanted = set(zip(index.tolist(), turn.tolist(), strict=True))
            rest = [rec] if rec is not None else []
            found = {(r.index, r.turn) for r in [*rest, *records] if r.ok}
            raise _not_found({k for k in wanted if k >= (i, t)} - found, data)
        yield rec


def _sorted_keys(wanted: Iterable[RowKey]) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(set(wanted))
    return np.asarray([k[0] for k in keys], np.int64), np.asarray([k[1] for k in keys], np.int64)


def read_raw_rows(
    data: str, wanted: Iterable[int], *, reader: str = "auto", allow_truncated: bool = True
) -> dict[int, Any]:
    """The input's own rows (``dict``, or a ``RowError`` for unreadable ones) by row number.

    Raises:
        ValueError: If a wanted row number is not in ``data``.
    """
    numbers = np.unique(np.fromiter(wanted, np.int64))
    rows = iter_raw_for(data, numbers, reader=reader, allow_truncated=allow_truncated)
    return dict(zip(numbers.tolist(), rows, strict=True))


def read_records(
    data: str,
    wanted: Iterable[RowKey],
    *,
    fmt: str = "auto",
    fields: Mapping[str, str] | None = None,
    sharegpt_turns: str = "first",
    reader: str = "auto",
    allow_truncated: bool = True,
) -> dict[RowKey, Record]:
    """The records of the wanted (index, turn) keys, converted as the scorer converted them.

    Raises:
        ValueError: If a wanted key has no usable record in ``data`` (wrong file or format).
    """
    index, turn = _sorted_keys(wanted)
    recs = iter_records_for(
        data,
        index,
        turn,
        fmt=fmt,
        fields=fields,
        sharegpt_turns=sharegpt_turns,
        reader=reader,
        allow_truncated=allow_truncated,
    )
    return {(r.index, r.turn): r for r in recs}


def reference_row(record: Record) -> dict[str, Any]:
    """ResoFilter's training row ``{"instruction": "", "input", "output", "idx"}`` of a record.

    The query is the user text the scorer templated (instruction, plus ``"\\n" + input`` when
    there is one); ``idx`` is the input row number. A ShareGPT system prompt has no place here.
    """
    return {
        "instruction": "",
        "input": user_query(record),
        "output": record.output,
        "idx": record.index,
    }


@dataclasses.dataclass(frozen=True)
class ScoredData:
    """The scored input file, read as the scorer read it.

    Attributes:
        scores: The score file (its ``run_config.json`` holds the scorer's data settings).
        data: The scored input file ("" = none: rows are the score columns alone).
        data_format, sharegpt_turns: Overrides of the scorer's settings ("" = the scorer's).
        reader, allow_truncated: How to read ``data``.
    """

    scores: str
    data: str
    data_format: str = ""
    sharegpt_turns: str = ""
    reader: str = "auto"
    allow_truncated: bool = True

    def record_options(self) -> dict[str, Any]:
        """How the records are read: format, fields, ShareGPT mode (the scorer's unless
        overridden), reader, allow_truncated."""
        scored = scored_data_settings(self.scores)
        return {
            "fmt": self.data_format or scored.get("format", "auto"),
            "fields": scored.get("fields"),
            "sharegpt_turns": self.sharegpt_turns or scored.get("sharegpt_turns", "first"),
            "reader": self.reader,
            "allow_truncated": self.allow_truncated,
        }

    def records(self, wanted: Iterable[RowKey]) -> dict[RowKey, Record]:
        """The records of the ``wanted`` keys (see :func:`read_records`)."""
        return read_records(self.data, wanted, **self.record_options())

    def iter_records(self, index: np.ndarray, turn: np.ndarray) -> Iterator[Record]:
        """The record of each sorted (index, turn) key, in one pass (:func:`iter_records_for`)."""
        return iter_records_for(self.data, index, turn, **self.record_options())

    def raw_rows(self, wanted: Iterable[int]) -> dict[int, Any]:
        """The input's own rows by row number (see :func:`read_raw_rows`); {} without data."""
        if not self.data:
            return {}
        return read_raw_rows(
            self.data, wanted, reader=self.reader, allow_truncated=self.allow_truncated
        )

    def iter_raw(self, index: np.ndarray) -> Iterator[Any]:
        """The raw row of each entry of the sorted ``index``, in one pass (:func:`iter_raw_for`)."""
        return iter_raw_for(
            self.data, index, reader=self.reader, allow_truncated=self.allow_truncated
        )


__all__ = [
    "RUN_CONFIG",
    "RowKey",
    "ScoreFile",
    "ScoredData",
    "as_float",
    "embedding_model",
    "iter_raw_for",
    "iter_records_for",
    "iter_rows_at",
    "jsonable",
    "kept_label",
    "rate_output_path",
    "read_raw_rows",
    "read_records",
    "read_scores",
    "reference_row",
    "row_keys",
    "scored_data_settings",
    "scored_model_settings",
    "write_rows",
]

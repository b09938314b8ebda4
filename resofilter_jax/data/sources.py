"""The records of a run: a config's ``data`` section read into :class:`Record` rows.

Every command reads its input the same way: the reader picked by ``data.reader`` (or by the
path), the rows converted with ``data.format`` / ``data.fields`` / ``data.sharegpt_turns``,
bad rows kept as ``error:<reason>`` records (``data.on_error="status"``) or raised, and only
the first ``data.limit`` input rows read (0 = all).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

from resofilter_jax.data.formats import to_records
from resofilter_jax.data.readers import iter_raw_rows
from resofilter_jax.data.records import LOGGER_NAME, DataError, ReadReport, Record

log = logging.getLogger(LOGGER_NAME)


def _reader_options(data: Any) -> dict[str, Any]:
    """The optional reader settings of a ``data`` section (absent ones keep their defaults)."""
    out: dict[str, Any] = {}
    if data.get("reader", "auto") != "auto":
        out["reader"] = data.reader
    if data.get("split", ""):
        out["split"] = data.split
    return out


def iter_records(
    config: Any, data_path: str, limit: int | None = None
) -> tuple[Iterator[Record], ReadReport]:
    """Streams the records of the first ``limit`` input rows (default ``config.data.limit``;
    0 = all). The report is filled as the records are consumed."""
    d = config.data
    report = ReadReport()
    rows = iter_raw_rows(
        data_path,
        on_error=d.on_error,
        allow_truncated=d.allow_truncated,
        report=report,
        **_reader_options(d),
    )
    limit = d.get("limit", 0) if limit is None else limit
    if limit:
        rows = itertools.islice(rows, limit)
    records = to_records(
        rows,
        d.format,
        fields=dict(d.fields) or None,
        sharegpt_turns=d.sharegpt_turns,
        on_error=d.on_error,
    )
    return naming_the_file(records, data_path), report


def naming_the_file(records: Iterator[Record], path: str) -> Iterator[Record]:
    """``records``, with the path put in front of a DataError that does not name it."""
    try:
        yield from records
    except DataError as e:
        if str(e).startswith(str(path)):
            raise
        raise DataError(f"{path}: {e}") from e


def read_records(
    config: Any, data_path: str, limit: int | None = None
) -> tuple[list[Record], ReadReport]:
    """Reads the records of the first ``limit`` input rows (default ``config.data.limit``)."""
    stream, report = iter_records(config, data_path, limit)
    records = list(stream)
    if report.truncated:
        log.warning("%s", report.message)
    return records, report


def read_report_json(report: ReadReport, limit: int) -> dict[str, Any]:
    """The ``read_report`` entry of run.json."""
    return {
        "path": report.path,
        "rows_read": report.rows_read,
        "errors": report.errors,
        "truncated": report.truncated,
        "bytes_total": report.bytes_total,
        "bytes_unparsed": report.bytes_unparsed,
        "message": report.message,
        "limit": limit,
    }

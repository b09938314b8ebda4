"""Plain data types shared by the data pipeline: records, read reports and errors."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OK",
    "DataError",
    "ReadReport",
    "Record",
    "RowError",
    "TruncatedInputError",
    "DUPLICATE",
    "error_status",
    "status_counts",
]

OK = "ok"
DUPLICATE = "duplicate_of:"  # status prefix of a row scored as a copy: "duplicate_of:<index>"
LOGGER_NAME = "resofilter_jax.data"


class DataError(ValueError):
    """Raised for input data that cannot be read or does not match the expected format."""


class TruncatedInputError(DataError):
    """Raised when a JSON array file ends before its closing bracket.

    Attributes:
        path: The file that was read.
        records: How many complete records were read before the break.
        offset: Byte offset just after the last complete record.
        bytes_total: Size of the file in bytes.
    """

    def __init__(self, message: str, *, path: str, records: int, offset: int, bytes_total: int):
        super().__init__(message)
        self.path = path
        self.records = records
        self.offset = offset
        self.bytes_total = bytes_total


@dataclass(frozen=True)
class RowError:
    """A row that could not be parsed; flows through the pipeline as an error record.

    Attributes:
        reason: Short snake_case reason, e.g. ``bad_json`` or ``missing_field:output``.
        detail: Human-readable detail (line number, parser message, ...).
    """

    reason: str
    detail: str = ""

    @property
    def status(self) -> str:
        """The record status string for this error, ``"error:<reason>"``."""
        return error_status(self.reason)


@dataclass(frozen=True)
class Record:
    """One instruction/response pair, or an error placeholder for an unusable input row.

    Attributes:
        index: 0-based position of the source row in the input. In ShareGPT "all" turn
            mode every pair of a conversation carries the conversation's index.
        instruction: The instruction (user turn) text.
        input: Optional extra input text ("" if none).
        output: The response text ("" is allowed here; scorers report it).
        id: The data's own id field, if present.
        turn: 0 for single-pair formats; k for the k-th human->gpt pair in ShareGPT "all" mode.
        system: System prompt, "" if none.
        status: ``"ok"`` or ``"error:<reason>"``.
    """

    index: int
    instruction: str
    input: str = ""
    output: str = ""
    id: str | None = None
    turn: int = 0
    system: str = ""
    status: str = OK

    @property
    def ok(self) -> bool:
        """Whether this record holds usable data."""
        return self.status == OK


@dataclass
class ReadReport:
    """Summary of one read of an input file (filled in as the rows are consumed).

    Attributes:
        path: The path or dataset name that was read.
        rows_read: Rows yielded (good rows and error rows, after shard filtering).
        errors: How many of those rows were reader errors (bad JSON, invalid UTF-8, not an
            object, a Parquet value with no Python form); field errors found later by the
            format conversion are not counted.
        truncated: Whether the input ended in the middle of a JSON array.
        bytes_total: Size of the input file in bytes (0 for hub/TFDS datasets).
        bytes_unparsed: Bytes after the last complete record when truncated, else 0.
        message: Human-readable note about the read ("" if nothing to report).
    """

    path: str = ""
    rows_read: int = 0
    errors: int = 0
    truncated: bool = False
    bytes_total: int = 0
    bytes_unparsed: int = 0
    message: str = ""


def error_status(reason: str) -> str:
    """Builds a record status from an error reason (``"bad_json"`` -> ``"error:bad_json"``)."""
    return f"error:{reason}"


def status_counts(statuses: Iterable[Any]) -> dict[str, int]:
    """Rows per status, sorted by status; every ``duplicate_of:<i>`` counts as ``duplicate_of``."""
    counts = collections.Counter(
        DUPLICATE[:-1] if str(s).startswith(DUPLICATE) else str(s) for s in statuses
    )
    return dict(sorted(counts.items()))

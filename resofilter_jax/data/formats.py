"""Turns raw rows into :class:`Record` objects for the supported data formats."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from resofilter_jax.data.readers import RawRow, iter_raw_rows
from resofilter_jax.data.records import DataError, ReadReport, Record, RowError, error_status

__all__ = [
    "FORMATS",
    "GPT_ROLES",
    "HUMAN_ROLES",
    "SYSTEM_ROLES",
    "detect_format",
    "load_records",
    "to_records",
]

FORMATS = ("auto", "alpaca", "query_response", "gsm8k", "sharegpt")
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bard", "bing", "model"})
SYSTEM_ROLES = frozenset({"system"})

# Canonical field -> default source key; a leading "?" marks an optional field.
_SCHEMAS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "?input": "input", "output": "output", "?id": "id"},
    "query_response": {"instruction": "query", "output": "response", "?id": "id"},
    "gsm8k": {"instruction": "question", "output": "answer", "?id": "id"},
    "sharegpt": {"conversations": "conversations", "?id": "id"},
}
# Detection order for fmt="auto": the first schema whose required keys are all present wins.
_DETECT_ORDER = ("sharegpt", "alpaca", "query_response", "gsm8k")


class _BadRow(Exception):
    """Internal: a row failed validation with ``reason`` (e.g. ``missing_field:output``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _source_keys(fmt: str, fields: Mapping[str, str] | None) -> dict[str, tuple[str, bool]]:
    """Maps canonical field -> (source key, required) for ``fmt`` after ``fields`` renames."""
    fields = dict(fields or {})
    out = {}
    for name, default in _SCHEMAS[fmt].items():
        required = not name.startswith("?")
        canonical = name.lstrip("?")
        out[canonical] = (fields.pop(canonical, default), required)
    if fields:
        raise ValueError(f"fields {sorted(fields)} are not fields of format {fmt!r}")
    return out


def detect_format(row: Mapping[str, Any], fields: Mapping[str, str] | None = None) -> str:
    """Detects the format of a row from its keys (after the ``fields`` renames).

    Raises:
        DataError: If no format's required keys are all present.
    """
    for fmt in _DETECT_ORDER:
        try:
            keys = _source_keys(fmt, fields)
        except ValueError:
            continue
        if all(src in row for src, required in keys.values() if required):
            return fmt
    raise DataError(
        f"cannot detect the data format from keys {sorted(row)}; pass fmt= one of "
        f"{FORMATS[1:]} (and fields= to rename keys)"
    )


def _get_str(row: Mapping[str, Any], src: str, name: str, required: bool) -> str:
    """Reads a string field; optional fields default to "" when absent or null."""
    if src not in row:
        if required:
            raise _BadRow(f"missing_field:{name}", f"missing field {src!r}")
        return ""
    value = row[src]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _BadRow(
            f"wrong_type:{name}", f"field {src!r} must be a string, got {type(value).__name__}"
        )
    return value


def _get_id(row: Mapping[str, Any], src: str) -> str | None:
    """Reads the optional id (strings kept, ints converted, anything else ignored)."""
    value = row.get(src)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _role(value: str) -> str:
    """Normalises a ShareGPT speaker to ``human``, ``gpt``, ``system`` or ``other``."""
    v = value.strip().lower()
    if v in HUMAN_ROLES:
        return "human"
    if v in GPT_ROLES:
        return "gpt"
    if v in SYSTEM_ROLES:
        return "system"
    return "other"


def _sharegpt_turns(conv: Any, src: str) -> list[tuple[str, str]]:
    """Validates a ShareGPT conversation; returns (role, text) per turn."""
    if not isinstance(conv, list):
        raise _BadRow(
            "wrong_type:conversations", f"field {src!r} must be a list, got {type(conv).__name__}"
        )
    turns = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise _BadRow(
                "wrong_type:conversations",
                f"turn {k} of {src!r} must be an object, got {type(turn).__name__}",
            )
        for key in ("from", "value"):
            if key not in turn:
                raise _BadRow(f"missing_field:{key}", f"turn {k} has no {key!r}")
            if not isinstance(turn[key], str):
                raise _BadRow(
                    f"wrong_type:{key}",
                    f"turn {k} field {key!r} must be a string, got {type(turn[key]).__name__}",
                )
        turns.append((_role(turn["from"]), turn["value"]))
    return turns


def _sharegpt_records(
    index: int, row: Mapping[str, Any], keys: dict[str, tuple[str, bool]], mode: str
) -> list[Record]:
    """Builds the records of one ShareGPT conversation (see :func:`to_records`)."""
    src = keys["conversations"][0]
    if src not in row:
        raise _BadRow("missing_field:conversations", f"missing field {src!r}")
    turns = _sharegpt_turns(row[src], src)
    rid = _get_id(row, keys["id"][0])
    start = 0
    while start < len(turns) and turns[start][0] == "system":
        start += 1
    system = "\n".join(text for _, text in turns[:start])
    pairs: list[tuple[str, str]] = []
    i = start
    while i + 1 < len(turns):
        if turns[i][0] == "human" and turns[i + 1][0] == "gpt":
            pairs.append((turns[i][1], turns[i + 1][1]))
            i += 2
            if mode == "first":
                break
        elif mode == "first":
            break
        else:
            i += 1
    if not pairs:
        return [Record(index, "", id=rid, system=system, status=error_status("no_human_gpt_pair"))]
    return [
        Record(index, human, output=gpt, id=rid, turn=k, system=system)
        for k, (human, gpt) in enumerate(pairs)
    ]


def _row_records(
    index: int, row: Mapping[str, Any], fmt: str, keys: dict[str, tuple[str, bool]], mode: str
) -> list[Record]:
    """Converts one good raw row; raises ``_BadRow`` for field errors."""
    if fmt == "sharegpt":
        return _sharegpt_records(index, row, keys, mode)
    values = {
        name: _get_str(row, src, name, required)
        for name, (src, required) in keys.items()
        if name != "id"
    }
    return [Record(index, id=_get_id(row, keys["id"][0]), **values)]


def to_records(
    rows: Iterable[RawRow],
    fmt: str = "auto",
    *,
    fields: Mapping[str, str] | None = None,
    sharegpt_turns: Literal["first", "all"] = "first",
    on_error: Literal["raise", "status"] = "raise",
) -> Iterator[Record]:
    """Converts ``(row_number, dict | RowError)`` rows into :class:`Record` objects.

    Formats (``fields`` renames source keys, e.g. ``{"instruction": "prompt"}``):

    * ``alpaca``: ``instruction``, ``input`` (optional, absent/null -> ""), ``output``.
    * ``query_response`` (MetaMathQA): ``query`` -> instruction, ``response`` -> output.
    * ``gsm8k``: ``question`` -> instruction, ``answer`` -> output.
    * ``sharegpt``: ``{"id", "conversations": [{"from", "value"}, ...]}``. Speakers
      human/user are *human*; gpt/chatgpt/assistant/bard/bing/model are *gpt*; system is
      *system* (case-insensitive); any other speaker is kept as a turn that never pairs.
      Consecutive system turns at the start become ``Record.system`` (joined with "\\n").
      ``sharegpt_turns="first"``: one record from the first non-system turn if it is
      human and immediately followed by gpt. ``sharegpt_turns="all"``: one record per
      adjacent human->gpt pair (scanning left to right, pairs do not overlap), with
      ``turn`` = 0, 1, ... and the conversation's index. A conversation with no such pair
      (e.g. one that starts with gpt) gives one record with status
      ``error:no_human_gpt_pair`` in both modes; it is a data property, not a read error,
      so it never raises.
    * ``auto``: detected from the keys of the first good row.

    The optional ``id`` is kept when it is a string (an int is converted to str).
    An empty output is not an error here.

    Args:
        rows: Rows from :func:`iter_raw_rows`.
        fmt: One of ``FORMATS``.
        fields: Canonical field name -> source key renames.
        sharegpt_turns: ``"first"`` or ``"all"`` (ShareGPT only).
        on_error: ``"raise"``: a missing field (``error:missing_field:<name>``), a wrong
            type (not a string; for conversations not a list of objects:
            ``error:wrong_type:<name>``) or a reader error raises :class:`DataError` naming
            the row; ``"status"``: such rows become records with that error status.

    Returns:
        An iterator of records in input order; every input row gives at least one record.
        Options are checked when this is called.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if sharegpt_turns not in ("first", "all"):
        raise ValueError(f"sharegpt_turns must be 'first' or 'all', got {sharegpt_turns!r}")
    if on_error not in ("raise", "status"):
        raise ValueError(f"on_error must be 'raise' or 'status', got {on_error!r}")
    keys = _source_keys(fmt, fields) if fmt != "auto" else None
    return _convert(rows, fmt, keys, fields, sharegpt_turns, on_error)


def _convert(
    rows: Iterable[RawRow],
    fmt: str,
    keys: dict[str, tuple[str, bool]] | None,
    fields: Mapping[str, str] | None,
    sharegpt_turns: str,
    on_error: str,
) -> Iterator[Record]:
    """The generator behind :func:`to_records`."""
    for index, row in rows:
        if isinstance(row, RowError):
            if on_error == "raise":
                raise DataError(f"row {index}: {row.detail} [{row.reason}]")
            yield Record(index, "", status=row.status)
            continue
        if keys is None:
            fmt = detect_format(row, fields)
            keys = _source_keys(fmt, fields)
        try:
            yield from _row_records(index, row, fmt, keys, sharegpt_turns)
        except _BadRow as e:
            if on_error == "raise":
                raise DataError(
                    f"row {index}: {e.detail} [{e.reason}] (pass on_error='status' to keep bad "
                    "rows as error records)"
                ) from None
            yield Record(index, "", id=_get_id(row, keys["id"][0]), status=error_status(e.reason))


def load_records(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    fields: Mapping[str, str] | None = None,
    sharegpt_turns: Literal["first", "all"] = "first",
    on_error: Literal["raise", "status"] = "raise",
    **read_kw: Any,
) -> tuple[list[Record], ReadReport]:
    """Reads a file or dataset into records.

    Args:
        path: Passed to :func:`iter_raw_rows`.
        fmt: Data format (see :func:`to_records`).
        fields: Source key renames.
        sharegpt_turns: ShareGPT mode.
        on_error: Used by both the reader and the format conversion.
        **read_kw: Other :func:`iter_raw_rows` options (reader, allow_truncated, split,
            shard, ...).

    Returns:
        The records and the filled-in read report.
    """
    report = ReadReport()
    rows = iter_raw_rows(path, on_error=on_error, report=report, **read_kw)
    try:
        records = list(
            to_records(rows, fmt, fields=fields, sharegpt_turns=sharegpt_turns, on_error=on_error)
        )
    except DataError as e:
        if str(e).startswith(str(path)):
            raise
        raise DataError(f"{path}: {e}") from e
    return records, report

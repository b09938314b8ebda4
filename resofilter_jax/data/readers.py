"""Raw row readers: JSON arrays (streamed), JSON Lines, Parquet, HF datasets and TFDS.

Every reader yields ``(row_number, row)`` pairs where ``row_number`` is the 0-based position
of the row in the input and ``row`` is either the row's ``dict`` or a :class:`RowError`
(only with ``on_error="status"``), so every input row comes out exactly once and in order.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from resofilter_jax.data._json_stream import iter_json_array
from resofilter_jax.data.records import (
    LOGGER_NAME,
    DataError,
    ReadReport,
    RowError,
    TruncatedInputError,
)

__all__ = ["READERS", "detect_reader", "iter_raw_rows", "parquet_row"]

logger = logging.getLogger(LOGGER_NAME)

READERS = ("auto", "json", "jsonl", "parquet", "hf", "tfds")
ReaderName = Literal["auto", "json", "jsonl", "parquet", "hf", "tfds"]
OnError = Literal["raise", "status"]
RawRow = tuple[int, dict[str, Any] | RowError]

_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def detect_reader(path: str | os.PathLike[str]) -> str:
    """Picks a reader from the path: by suffix, ``tfds`` for a prepared TFDS dataset directory
    (``dataset_info.json`` + ``features.json``), ``hf`` for a ``save_to_disk`` directory.

    Raises:
        DataError: If the path does not exist or its kind cannot be told from its name.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "features.json").is_file() and (p / "dataset_info.json").is_file():
            return "tfds"  # a prepared TFDS dataset version directory (DATA_DIR/NAME/VERSION)
        if any((p / marker).exists() for marker in _HF_MARKERS):
            return "hf"
        raise DataError(
            f"{p}: a directory without {' / '.join(_HF_MARKERS)} is not a saved HF dataset; "
            "pass reader= explicitly"
        )
    if not p.exists():
        raise DataError(
            f"{p}: no such file (for a hub dataset name pass reader='hf' or reader='tfds')"
        )
    kind = _SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"{p}: cannot tell the format from suffix {p.suffix!r}; "
            "pass reader='json', 'jsonl' or 'parquet'"
        )
    return kind


def iter_raw_rows(
    path: str | os.PathLike[str],
    *,
    reader: ReaderName | str = "auto",
    on_error: OnError | str = "raise",
    allow_truncated: bool = False,
    report: ReadReport | None = None,
    split: str | None = None,
    shard: tuple[int, int] | None = None,
    chunk_size: int = 4 << 20,
    **kw: Any,
) -> Iterator[RawRow]:
    """Yields the rows of a data file or dataset as ``(row_number, dict | RowError)``.

    Readers (``reader="auto"`` picks by suffix: ``.json``, ``.jsonl``/``.ndjson``,
    ``.parquet``, or a directory holding ``dataset_info.json``/``state.json`` -> ``hf``):

    * ``json``: a top-level JSON array, streamed in ``chunk_size`` byte chunks and decoded
      one element at a time (memory is bounded by the largest element). A file cut off
      before its closing ``]`` raises :class:`TruncatedInputError` unless
      ``allow_truncated=True``, in which case the complete records are yielded, ``report``
      is marked truncated and a warning is logged. Syntax errors and invalid UTF-8 are
      fatal :class:`DataError` (an array cannot be resynchronised); an element that is not
      an object is a ``not_an_object`` row error.
    * ``jsonl``: one JSON object per non-blank line. Blank (whitespace-only) lines are
      skipped and are not rows. Per-line errors: ``invalid_utf8``, ``bad_json`` (also a
      line nested too deeply for the decoder or with an over-long integer),
      ``not_an_object``; messages use the 1-based physical line number.
    * ``parquet``: rows of the file's record batches (pyarrow). Per-row errors:
      ``invalid_utf8`` (a string column holding invalid UTF-8) and ``bad_value`` (a value
      with no Python form, e.g. a timestamp beyond year 9999); a file pyarrow cannot read
      is a fatal :class:`DataError`.
    * ``hf``: a ``save_to_disk`` directory (``load_from_disk``) or a dataset name
      (``load_dataset(name, split=split)``); needs ``pip install resofilter_jax[hf]``.
    * ``tfds``: a prepared TFDS dataset directory or a registered name, in stored order,
      bytes decoded to ``str`` (see :func:`_iter_tfds`); needs
      ``pip install resofilter_jax[tfds]``.

    Args:
        path: File, directory or dataset name.
        reader: One of ``READERS``.
        on_error: ``"raise"`` raises :class:`DataError` at the first bad row; ``"status"``
            yields a :class:`RowError` in its place.
        allow_truncated: Accept a cut-off JSON array (see above).
        report: Filled in while the rows are consumed (complete once exhausted).
        split: Split name for ``hf``/``tfds`` (default ``"train"``).
        shard: ``(process_index, process_count)``: yield only rows with
            ``row_number % process_count == process_index``.
        chunk_size: Read size in bytes for the JSON array reader.
        **kw: Passed to ``datasets.load_dataset`` / the TFDS call (e.g. ``data_dir=``).

    Returns:
        An iterator of ``(row_number, row)`` with ``row_number`` the 0-based row position
        in the input. Options and the path are checked when this is called; file contents
        are read while iterating.
    """
    if on_error not in ("raise", "status"):
        raise ValueError(f"on_error must be 'raise' or 'status', got {on_error!r}")
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if shard is not None:
        index, count = shard
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    kind = detect_reader(path) if reader == "auto" else reader
    if kw and kind not in ("hf", "tfds"):
        raise TypeError(f"unexpected options {sorted(kw)} for reader {kind!r}")
    report = report if report is not None else ReadReport()
    report.path = str(path)
    if kind in ("json", "jsonl", "parquet"):
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        report.bytes_total = os.path.getsize(path)

    if kind == "json":
        source: Iterator[RawRow] = _iter_json(path, allow_truncated, report, chunk_size)
    elif kind == "jsonl":
        source = _iter_jsonl(path)
    elif kind == "parquet":
        source = _iter_parquet(path)
    elif kind == "hf":
        source = _iter_hf(path, split, kw)
    else:
        source = _iter_tfds(str(path), split, kw)

    return _filter_rows(source, path, on_error, report, shard)


def _filter_rows(
    source: Iterator[RawRow],
    path: str | os.PathLike[str],
    on_error: str,
    report: ReadReport,
    shard: tuple[int, int] | None,
) -> Iterator[RawRow]:
    """Applies the shard filter and the error policy; counts rows into ``report``."""
    for row_number, row in source:
        if shard is not None and row_number % shard[1] != shard[0]:
            continue
        if isinstance(row, RowError):
            if on_error == "raise":
                raise DataError(
                    f"{path}: {row.detail} [{row.reason}] (pass on_error='status' to keep "
                    "bad rows as error records)"
                )
            report.errors += 1
        report.rows_read += 1
        yield row_number, row


def _check_object(value: Any, where: str) -> dict[str, Any] | RowError:
    """Returns ``value`` if it is a JSON object, else a ``not_an_object`` row error."""
    if isinstance(value, dict):
        return value
    return RowError("not_an_object", f"{where}: expected a JSON object, got {type(value).__name__}")


def _iter_json(
    path: str | os.PathLike[str], allow_truncated: bool, report: ReadReport, chunk_size: int
) -> Iterator[RawRow]:
    """Streams a JSON array file; handles the truncated-file policy."""
    try:
        for row_number, value in iter_json_array(path, chunk_size=chunk_size):
            yield row_number, _check_object(value, f"record {row_number}")
    except TruncatedInputError as e:
        if not allow_truncated:
            raise
        report.truncated = True
        report.bytes_unparsed = e.bytes_total - e.offset
        report.message = (
            f"{path}: JSON array is cut off after {e.records} complete records at byte "
            f"{e.offset} of {e.bytes_total}; ignored the last {report.bytes_unparsed} bytes"
        )
        logger.warning(report.message)


def _iter_jsonl(path: str | os.PathLike[str]) -> Iterator[RawRow]:
    """Reads a JSON Lines file; blank lines are skipped and are not rows."""
    row_number = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"line {lineno}"
            row: dict[str, Any] | RowError
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                row = RowError("invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start} of line")
            else:
                try:
                    row = _check_object(json.loads(text), where)
                except json.JSONDecodeError as e:
                    row = RowError("bad_json", f"{where}: {e.msg} at column {e.colno}")
                except RecursionError:
                    row = RowError("bad_json", f"{where}: nested too deeply for the JSON decoder")
                except ValueError as e:  # e.g. an integer longer than int_max_str_digits
                    row = RowError("bad_json", f"{where}: {e}")
            yield row_number, row
            row_number += 1


def parquet_row(batch: Any, i: int, where: str) -> dict[str, Any] | RowError:
    """Row ``i`` of a record batch, or a row error naming the first column whose value
    has no Python form (invalid UTF-8 in a string, a date out of Python's range)."""
    row = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            row[name] = column[i].as_py()
        except UnicodeDecodeError as e:
            return RowError("invalid_utf8", f"{where}: column {name!r}: invalid UTF-8 ({e.reason})")
        except (ValueError, OverflowError) as e:
            return RowError("bad_value", f"{where}: column {name!r}: {e}")
    return row


def _iter_parquet(path: str | os.PathLike[str]) -> Iterator[RawRow]:
    """Reads a Parquet file batch by batch; a batch that does not convert to Python as a
    whole is converted row by row, the failing rows becoming row errors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        row_number = 0
        for batch in pf.iter_batches(batch_size=4096):
            try:
                rows: list[dict[str, Any] | RowError] = batch.to_pylist()
            except (ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
                rows = [
                    parquet_row(batch, i, f"row {row_number + i}") for i in range(batch.num_rows)
                ]
            for row in rows:
                yield row_number, row
                row_number += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e


def _import_optional(module: str, extra: str, reader: str) -> Any:
    """Imports an optional dependency or raises an ImportError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"reader={reader!r} needs the optional package {module!r}; install it with: "
            f"pip install resofilter_jax[{extra}]"
        ) from e


def _iter_hf(
    path: str | os.PathLike[str], split: str | None, kw: dict[str, Any]
) -> Iterator[RawRow]:
    """Reads a HF ``save_to_disk`` directory or a named dataset."""
    datasets = _import_optional("datasets", "hf", "hf")
    p = Path(path)
    if p.is_dir() and any((p / m).exists() for m in _HF_MARKERS):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise DataError(f"{p}: holds splits {sorted(ds)}; pass split=")
                split = next(iter(ds))
            if split not in ds:
                raise DataError(f"{p}: no split {split!r}; has {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(path), split=split or "train", **kw)
    for row_number, row in enumerate(ds):
        yield (
            row_number,
            _check_object(dict(row) if hasattr(row, "keys") else row, f"row {row_number}"),
        )


def _to_python(value: Any) -> Any:
    """Converts TFDS numpy values to Python: bytes -> str (UTF-8), arrays -> lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _to_python(value.tolist())
    if isinstance(value, list | tuple):
        return [_to_python(v) for v in value]
    return value


def _iter_tfds(name: str, split: str | None, kw: dict[str, Any]) -> Iterator[RawRow]:
    """Reads a TFDS dataset in its stored order (no file shuffling), decoding bytes to str.

    ``name`` is either

    * a prepared dataset directory: the one holding ``dataset_info.json``, ``features.json``
      and the shard files (``DATA_DIR/NAME/VERSION``), opened with
      ``tfds.builder_from_directory`` (no builder code needed). ``array_record`` and
      ``parquet`` datasets are read with ``as_data_source`` (no TensorFlow needed);
      ``tfrecord`` ones with ``as_dataset`` (needs ``tensorflow``). ``kw`` go to that call.
    * a registered dataset name: ``tfds.load`` when ``tensorflow`` is installed, else
      ``tfds.data_source`` (``array_record``/``parquet`` only); ``kw`` go to that call
      (e.g. ``data_dir=``).

    Nothing is downloaded or prepared: ``download`` defaults to False. A ``Sequence`` of a
    features dict (e.g. ShareGPT ``conversations: Sequence({"from": Text, "value": Text})``),
    which TFDS returns as a dict of lists, is turned back into a list of dicts.
    """
    import importlib.util

    tfds = _import_optional("tensorflow_datasets", "tfds", "tfds")
    split = split or "train"
    path = Path(name)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file():
            raise DataError(
                f"{path}: not a prepared TFDS dataset directory (no dataset_info.json); pass "
                "the DATA_DIR/NAME/VERSION directory or a registered name with data_dir="
            )
        builder = tfds.builder_from_directory(str(path))
        features = builder.info.features
        if builder.info.file_format in tfds.core.FileFormat.with_random_access():
            examples = iter(builder.as_data_source(split=split, **kw))
        else:
            kw = {"shuffle_files": False, **kw}
            examples = tfds.as_numpy(builder.as_dataset(split=split, **kw))
    elif importlib.util.find_spec("tensorflow") is not None:
        kw = {"download": False, **kw, "with_info": True}
        ds, info = tfds.load(name, split=split, **kw)
        features, examples = info.features, tfds.as_numpy(ds)
    else:
        source = tfds.data_source(name, split=split, **{"download": False, **kw})
        features, examples = source.dataset_info.features, iter(source)

    def lists_of_dicts(value: Any, feature: Any) -> Any:
        if isinstance(feature, tfds.features.FeaturesDict) and isinstance(value, dict):
            return {
                k: lists_of_dicts(v, feature[k]) if k in feature else v for k, v in value.items()
            }
        inner = getattr(feature, "feature", None)
        if (
            isinstance(feature, tfds.features.Sequence)
            and isinstance(inner, tfds.features.FeaturesDict)
            and isinstance(value, dict)
        ):
            n = len(next(iter(value.values()), ()))
            return [lists_of_dicts({k: v[i] for k, v in value.items()}, inner) for i in range(n)]
        return value

    for row_number, example in enumerate(examples):
        try:
            row = _check_object(_to_python(lists_of_dicts(example, features)), f"row {row_number}")
        except UnicodeDecodeError as e:
            row = RowError("invalid_utf8", f"row {row_number}: invalid UTF-8 ({e.reason})")
        yield row_number, row

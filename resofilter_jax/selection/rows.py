"""Scored rows: score files, the scored data as the scorer read it, output rows and names.

The selection policies live in :mod:`resofilter_jax.selection.policies`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from resofilter_jax.data import Record, iter_raw_rows, load_records
from resofilter_jax.data.templates import user_query

RUN_CONFIG = "run_config.json"  # the scorer's fingerprint, next to scores.parquet

# (index, turn): a score row's key; `turn` is 0 outside ShareGPT "all" mode.
RowKey = tuple[int, int]


def read_scores(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Columns of a ``scores.parquet`` or ``scores.jsonl`` file as numpy arrays."""
    p = Path(path)
    if p.suffix == ".parquet":
        table = pq.read_table(p)
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    keys = list(rows[0]) if rows else []
    return {k: np.asarray([r.get(k) for r in rows], dtype=object) for k in keys}


def as_float(values: Sequence[Any]) -> np.ndarray:
    """[n] float64 with None -> NaN."""
    return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)


def jsonable(value: Any) -> Any:
    """A numpy scalar as a Python value; NaN / inf as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def row_keys(cols: Mapping[str, np.ndarray]) -> list[RowKey]:
    """The (index, turn) of every score row."""
    turns = cols["turn"] if "turn" in cols else np.zeros(len(cols["index"]), np.int64)
    return [(int(i), int(t)) for i, t in zip(cols["index"], turns, strict=True)]


def write_rows(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Writes ``rows`` atomically: ``.json`` -> one JSON array, anything else -> JSONL."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if out.suffix == ".json":
            json.dump(list(rows), f, ensure_ascii=False, indent=1)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, out)
    return out


def kept_label(drop_rate: float) -> str:
    """``p<percent kept>`` as the paper names its subsets: 0.25 -> ``p75``, 0.125 -> ``p87_5``."""
    kept = round((1.0 - drop_rate) * 100, 6)
    return "p" + f"{kept:g}".replace(".", "_")


def rate_output_path(output: str | os.PathLike[str], drop_rate: float) -> Path:
    """The file of one drop rate: ``sel.jsonl`` -> ``sel.p75.jsonl`` for 0.25."""
    out = Path(output)
    return out.with_name(f"{out.stem}.{kept_label(drop_rate)}{out.suffix}")


def scored_data_settings(scores: str | os.PathLike[str]) -> dict[str, Any]:
    """The scorer's data settings (format, fields, sharegpt_turns) from its ``run_config.json``.

    Empty when the score file has no ``run_config.json`` next to it.
    """
    path = Path(scores).parent / RUN_CONFIG
    if not path.is_file():
        return {}
    data = json.loads(path.read_text()).get("data", {})
    return {k: data[k] for k in ("format", "fields", "sharegpt_turns") if k in data}


def scored_model_settings(scores: str | os.PathLike[str]) -> dict[str, Any]:
    """The scorer's model path, dtype, param_dtype and max_length from its ``run_config.json``.

    Only the keys the file has (none without the file).
    """
    path = Path(scores).parent / RUN_CONFIG
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    model = cfg.get("model", {})
    out = {k: model[k] for k in ("path", "dtype", "param_dtype", "matmul_precision") if k in model}
    if "max_length" in cfg:
        out["max_length"] = int(cfg["max_length"])
    return out


def embedding_model(
    scores: str | os.PathLike[str], model: str = "", dtype: str = "", max_length: int = 0
) -> dict[str, Any]:
    """``model_path``, ``dtype``, ``param_dtype``, ``matmul_precision``, ``max_length`` of the
    model that embeds texts.

    ``model`` if given, else the scorer's model as recorded next to ``scores`` (a local path
    or a hub id), else the embedded SmolLM2 GGUF. ``dtype`` (compute and storage) and
    ``max_length`` if given, else the scorer's, else float32 and 1024; the scorer's matmul
    precision (else ``highest`` for fp32 compute, ``default`` otherwise).

    Raises:
        ValueError: If the recorded model is a local path that no longer exists.
    """
    scorer = scored_model_settings(scores)
    path = model or scorer.get("path", "")
    if not path:
        from resofilter_jax import assets

        path = str(assets.smollm2_gguf())
    elif not model and Path(path).is_absolute() and not Path(path).exists():
        raise ValueError(f"the scorer's model {path} does not exist any more: pass --model")
    compute = dtype or scorer.get("dtype", "float32")
    return {
        "model_path": path,
        "dtype": compute,
        "param_dtype": dtype or scorer.get("param_dtype", compute),
        "matmul_precision": scorer.get(
            "matmul_precision", "highest" if compute == "float32" else "default"
        ),
        "max_length": max_length or scorer.get("max_length", 1024),
    }


def _check_found(lost: set[Any], data: str) -> None:
    if lost:
        raise ValueError(
            f"{len(lost)} selected rows (e.g. index {min(lost)}) are not in {data}: "
            "is it the file that was scored?"
        )


def read_raw_rows(
    data: str, wanted: Iterable[int], *, reader: str = "auto", allow_truncated: bool = True
) -> dict[int, Any]:
    """The input's own rows (``dict``, or a ``RowError`` for unreadable ones) by row number.

    Raises:
        ValueError: If a wanted row number is not in ``data``.
    """
    wanted = set(wanted)
    raw: dict[int, Any] = {}
    for number, row in iter_raw_rows(
        data, reader=reader, on_error="status", allow_truncated=allow_truncated
    ):
        if number in wanted:
            raw[number] = row
    _check_found(wanted - set(raw), data)
    return raw


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
    wanted = set(wanted)
    records, _ = load_records(
        data,
        fmt,
        fields=dict(fields) if fields else None,
        sharegpt_turns=sharegpt_turns,  # type: ignore[arg-type]
        on_error="status",
        reader=reader,
        allow_truncated=allow_truncated,
    )
    found = {(r.index, r.turn): r for r in records if r.ok and (r.index, r.turn) in wanted}
    _check_found(wanted - set(found), data)
    return found


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

    def records(self, wanted: Iterable[RowKey]) -> dict[RowKey, Record]:
        """The records of the ``wanted`` keys (see :func:`read_records`)."""
        scored = scored_data_settings(self.scores)
        return read_records(
            self.data,
            wanted,
            fmt=self.data_format or scored.get("format", "auto"),
            fields=scored.get("fields"),
            sharegpt_turns=self.sharegpt_turns or scored.get("sharegpt_turns", "first"),
            reader=self.reader,
            allow_truncated=self.allow_truncated,
        )

    def raw_rows(self, wanted: Iterable[int]) -> dict[int, Any]:
        """The input's own rows by row number (see :func:`read_raw_rows`); {} without data."""
        if not self.data:
            return {}
        return read_raw_rows(
            self.data, wanted, reader=self.reader, allow_truncated=self.allow_truncated
        )


def row_maker(
    source: ScoredData,
    fmt: str,
    cols: Mapping[str, np.ndarray],
    union: np.ndarray,
    keys: Sequence[str],
    records: Mapping[RowKey, Record] | None = None,
) -> Callable[[int], dict[str, Any]]:
    """``make(position) -> output row``, with the data of the ``union`` positions read once.

    Args:
        source: Where the input rows come from.
        fmt: ``rows`` (the input row, or just its index, with the ``keys`` columns attached;
            ``turn`` too when the score file has it) or ``reference`` (:func:`reference_row`).
        cols: The score file's columns.
        union: Every position that will be made.
        keys: Score columns to attach (rows format).
        records: Records already read (reference format), reused when they cover ``union``.
    """
    key = row_keys(cols)
    if fmt == "reference":
        if not source.data:
            raise ValueError("--format reference needs --data (the file that was scored)")
        wanted = {key[i] for i in union}
        if records is None or not wanted <= set(records):
            records = source.records(wanted)
        return lambda i: reference_row(records[key[i]])
    raw = source.raw_rows({key[i][0] for i in union})

    def make(i: int) -> dict[str, Any]:
        base = raw.get(key[i][0])
        row = dict(base) if isinstance(base, dict) else {"index": key[i][0]}
        if "turn" in cols:
            row["turn"] = key[i][1]
        row.update({k: jsonable(cols[k][i]) for k in keys if k in cols})
        return row

    return make


__all__ = [
    "RUN_CONFIG",
    "RowKey",
    "ScoredData",
    "as_float",
    "jsonable",
    "kept_label",
    "embedding_model",
    "rate_output_path",
    "read_raw_rows",
    "read_records",
    "read_scores",
    "reference_row",
    "row_keys",
    "row_maker",
    "scored_data_settings",
    "scored_model_settings",
    "write_rows",
]

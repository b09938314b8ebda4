"""Scoring outputs: a run fingerprint, atomic per-shard Parquet files, resume and merge.

Layout of an output directory::

    run_config.json          fingerprint of everything that affects the scores
    shards/shard-00000.parquet ...   one file per ``shard_size`` rows, written atomically
    shards/shard-00000.p0of2.parquet ... or, from a job of N processes, one part per process
    scores.parquet scores.jsonl      the merged result, one row per row, in input order
    run.json                 resolved config, versions, devices, timings, read report
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resofilter_jax.data.atomic import atomic_path, atomic_write_bytes, atomic_write_table
from resofilter_jax.data.records import status_counts

RUN_CONFIG = "run_config.json"
SHARD_DIR = "shards"

# Columns of every shard file (the merge may drop ``id`` / ``turn``).
SHARD_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("turn", pa.int64()),
        ("status", pa.string()),
        ("loss_direct", pa.float64()),
        ("loss_condition", pa.float64()),
        ("ppl_direct", pa.float64()),
        ("ppl_condition", pa.float64()),
        ("ifd", pa.float64()),
        ("n_tokens_direct", pa.int64()),
        ("n_tokens_condition", pa.int64()),
    ]
)


_PART = re.compile(r"^shard-(\d{5,})\.p(\d+)of(\d+)\.parquet$")


class FingerprintMismatchError(RuntimeError):
    """The output directory holds shards of a run with a different configuration."""


def path_stamp(path: str | os.PathLike[str], *, mtime: bool = True) -> dict[str, Any]:
    """Identity of a file or directory for the fingerprint: resolved path, size(s), mtime.

    For a directory, the total size and latest mtime of its top-level files are used.
    """
    p = Path(path).expanduser()
    if not p.exists():
        return {"path": str(path)}
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    stamp: dict[str, Any] = {"path": str(p.resolve()), "size": sum(f.stat().st_size for f in files)}
    if mtime:
        stamp["mtime_ns"] = max((f.stat().st_mtime_ns for f in files), default=0)
    return stamp


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "<root>"] if a != b else []
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in a or k not in b:
            out.append(key)
        else:
            out += _diff_keys(a[k], b[k], key)
    return out


def check_output_dir(
    out_dir: str | os.PathLike[str], fingerprint: Mapping[str, Any], *, overwrite: bool = False
) -> bool:
    """Read-only check of ``out_dir`` against ``fingerprint``; True when it can be reused as is.

    Raises:
        FingerprintMismatchError: If the directory belongs to a run with a different
            fingerprint and ``overwrite`` is False (the message names the differing keys).
    """
    out = Path(out_dir)
    cfg = out / RUN_CONFIG
    if not cfg.exists():
        return False
    diff = _diff_keys(json.loads(cfg.read_text()), json.loads(json.dumps(fingerprint)))
    if diff and not overwrite:
        raise FingerprintMismatchError(
            f"{out} holds results of a different run (differing keys: {', '.join(diff)}); "
            "use another output_dir or pass overwrite=True to discard them"
        )
    return not diff and not overwrite


def prepare_output_dir(
    out_dir: str | os.PathLike[str], fingerprint: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Creates ``out_dir`` and records the fingerprint, or checks it against an older run.

    In a multi-process job only process 0 calls this (the others :func:`check_output_dir`).

    Raises:
        FingerprintMismatchError: If the directory belongs to a run with a different
            fingerprint and ``overwrite`` is False (the message names the differing keys).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists, ...)
    cfg = out / RUN_CONFIG
    if check_output_dir(out, fp, overwrite=overwrite):
        return out
    if overwrite or not cfg.exists():
        shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
        for name in ("scores.parquet", "scores.jsonl", "run.json"):
            (out / name).unlink(missing_ok=True)
    atomic_write_bytes(cfg, json.dumps(fp, indent=2, sort_keys=True).encode())
    return out


def shard_path(out_dir: str | os.PathLike[str], k: int, part: tuple[int, int] = (0, 1)) -> Path:
    """``OUT/shards/shard-{k:05d}.parquet``; part ``(p, n)`` with n > 1: ``...p{p}of{n}``."""
    p, n = part
    name = f"shard-{k:05d}.parquet" if n == 1 else f"shard-{k:05d}.p{p}of{n}.parquet"
    return Path(out_dir) / SHARD_DIR / name


def shard_files(out_dir: str | os.PathLike[str], n_shards: int) -> dict[int, list[Path]]:
    """The files that make up each finished shard (in row order).

    A shard is finished when its single file exists (a one-process run) or all n parts of
    some n-process run exist; the single file wins, then the smallest complete n. Resume
    therefore works whatever the process count of the earlier or the later run.
    """
    d = Path(out_dir) / SHARD_DIR
    parts: dict[int, dict[int, set[int]]] = {}
    names = os.listdir(d) if d.is_dir() else []
    for name in names:
        m = _PART.match(name)
        if m:
            k, p, n = (int(g) for g in m.groups())
            parts.setdefault(k, {}).setdefault(n, set()).add(p)
    done: dict[int, list[Path]] = {}
    for k in range(n_shards):
        if f"shard-{k:05d}.parquet" in names:
            done[k] = [shard_path(out_dir, k)]
            continue
        complete = [n for n, ps in parts.get(k, {}).items() if ps == set(range(n))]
        if complete:
            n = min(complete)
            done[k] = [shard_path(out_dir, k, (p, n)) for p in range(n)]
    return done


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of consecutive shards covering ``n_rows`` rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def missing_shards(out_dir: str | os.PathLike[str], n_shards: int) -> list[int]:
    """Shard numbers that are not finished (see :func:`shard_files`)."""
    done = shard_files(out_dir, n_shards)
    return [k for k in range(n_shards) if k not in done]


def write_shard(
    out_dir: str | os.PathLike[str],
    k: int,
    columns: Mapping[str, Any],
    schema: pa.Schema = SHARD_SCHEMA,
    part: tuple[int, int] = (0, 1),
) -> Path:
    """Writes shard ``k`` (columns of ``schema``, default IFD's) atomically; returns its path.

    ``part=(p, n)``: process p of an n-process job writes its rows of the shard.
    """
    arrays = [pa.array(list(columns[f.name]), type=f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    path = shard_path(out_dir, k, part)
    atomic_write_table(path, table)
    return path


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def merge_shards(
    out_dir: str | os.PathLike[str],
    n_shards: int,
    *,
    with_id: bool,
    with_turn: bool,
    expected_rows: int | None = None,
    schema: pa.Schema = SHARD_SCHEMA,
) -> MergedScores:
    """Concatenates all shards into ``scores.parquet`` and ``scores.jsonl`` (NaN -> null).

    One shard file at a time (memory: one shard, whatever the number of rows); both files
    appear atomically once complete. ``schema`` is the shard files' schema (default: IFD's
    :data:`SHARD_SCHEMA`).

    Raises:
        FileNotFoundError: If a shard is missing.
        ValueError: If the row count differs from ``expected_rows``.
    """
    out = Path(out_dir)
    done = shard_files(out, n_shards)
    missing = [k for k in range(n_shards) if k not in done]
    if missing:
        raise FileNotFoundError(f"cannot merge: shards {missing[:8]} of {n_shards} are missing")
    drop = [c for c, keep in (("id", with_id), ("turn", with_turn)) if not keep]
    out_schema = schema
    for c in drop:
        out_schema = out_schema.remove(out_schema.get_field_index(c))
    merged = MergedScores(0, collections.Counter())
    with atomic_path(out / "scores.parquet") as pq_tmp, atomic_path(out / "scores.jsonl") as js_tmp:
        with pq.ParquetWriter(pq_tmp, out_schema) as writer, open(js_tmp, "wb") as lines:
            for f in (f for k in range(n_shards) for f in done[k]):
                table = pq.read_table(f, schema=schema).drop_columns(drop)
                writer.write_table(table)
                rows = table.to_pylist()
                lines.write(
                    "".join(
                        json.dumps({k: _json_value(v) for k, v in r.items()}, ensure_ascii=False)
                        + "\n"
                        for r in rows
                    ).encode()
                )
                merged.rows += table.num_rows
                merged.statuses.update(status_counts(r["status"] for r in rows))
        if expected_rows is not None and merged.rows != expected_rows:
            raise ValueError(f"merged {merged.rows} rows but the input has {expected_rows}")
    return merged


@dataclasses.dataclass
class MergedScores:
    """What :func:`merge_shards` wrote: rows, and rows per status (as ``status_counts``)."""

    rows: int
    statuses: collections.Counter


def file_status_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """``status_counts`` of a score file's ``status`` column, read a batch at a time."""
    counts: collections.Counter = collections.Counter()
    for batch in pq.ParquetFile(path).iter_batches(columns=["status"], batch_size=1 << 16):
        counts.update(status_counts(batch.column(0).to_pylist()))
    return dict(sorted(counts.items()))


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Writes ``value`` as indented JSON atomically (NaN -> null, unknown types -> str)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, float | np.floating):
            return None if math.isnan(float(v)) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        if v is None or isinstance(v, str | int | bool):
            return v
        return str(v)

    atomic_write_bytes(Path(path), json.dumps(clean(value), indent=2).encode())

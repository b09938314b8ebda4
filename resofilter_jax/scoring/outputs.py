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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resofilter_jax.data.atomic import atomic_path, atomic_write_bytes, table_bytes
from resofilter_jax.data.batching import host_slice
from resofilter_jax.data.records import status_counts
from resofilter_jax.data.sealed import (
    check_sealed,
    fingerprint_hash,
    read_sealed,
    remove_sealed,
    write_sealed,
)

RUN_CONFIG = "run_config.json"
SHARD_DIR = "shards"

# The IFD columns of score files before the IFD family was added (``ifd_loss_ratio`` and the
# token-level columns); tests and benchmarks build IFD-like files from it. The scorer writes
# :data:`IFD_SCHEMA` / :func:`score_schema` (the merge may drop ``id`` / ``turn``).
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


TOKEN_LIST = pa.list_(pa.float32())  # per-token losses of one sequence
_KEYS = ("index", "id", "turn", "status")


def score_schema(columns: Sequence[str]) -> pa.Schema:
    """Shard schema of a pair score (``ifd``, ``rifd``): index, id, turn, status + ``columns``
    (``PairMethod.columns``): token counts int64, ``token_losses_*`` lists of float32, the
    rest float64."""

    def kind(name: str) -> pa.DataType:
        if name.startswith("n_tokens_"):
            return pa.int64()
        return TOKEN_LIST if name.startswith("token_losses_") else pa.float64()

    return pa.schema([SHARD_SCHEMA.field(k) for k in _KEYS] + [(c, kind(c)) for c in columns])


# IFD's shard columns with default settings: SHARD_SCHEMA + ``ifd_loss_ratio`` after ``ifd``.
IFD_SCHEMA = SHARD_SCHEMA.insert(
    SHARD_SCHEMA.get_field_index("ifd") + 1, pa.field("ifd_loss_ratio", pa.float64())
)
# Columns a shard written before they existed can still give exactly: ratio of two columns.
DERIVED = {
    "ifd_loss_ratio": ("loss_condition", "loss_direct"),
    "rifd_loss_ratio": ("loss_condition", "loss_direct"),
}

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

    A directory with a fingerprint but no results (no shard, no merged file: e.g. a run that
    stopped at a bad model or setting) holds nothing to lose; it counts as new.

    Raises:
        FingerprintMismatchError: If the directory holds results of a run with a different
            fingerprint and ``overwrite`` is False (the message names the differing keys).
    """
    out = Path(out_dir)
    cfg = out / RUN_CONFIG
    if not cfg.exists():
        return False
    diff = _diff_keys(json.loads(cfg.read_text()), json.loads(json.dumps(fingerprint)))
    shards = out / SHARD_DIR
    results = (shards.is_dir() and any(shards.iterdir())) or (out / "scores.parquet").exists()
    if diff and not results:
        return False
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
    # A new run, overwrite=True, or an old fingerprint without results: start clean.
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
    """Shard numbers that have no complete set of files (names only; see
    :func:`verify_shards` for the check of their contents)."""
    done = shard_files(out_dir, n_shards)
    return [k for k in range(n_shards) if k not in done]


def run_hash(out_dir: str | os.PathLike[str]) -> str:
    """The hash of the run's fingerprint (``run_config.json``) that seals its files."""
    return fingerprint_hash(json.loads((Path(out_dir) / RUN_CONFIG).read_text()))


def shard_meta(run: str, k: int, lo: int, hi: int, part: tuple[int, int] = (0, 1)) -> dict:
    """The seal metadata of part ``part`` of shard ``k`` (global rows ``[lo, hi)``)."""
    rows = host_slice(range(lo, hi), *part)
    return {"fingerprint": run, "shard": k, "rows": [rows.start, rows.stop], "part": list(part)}


def verify_shards(
    out_dir: str | os.PathLike[str],
    ranges: Sequence[tuple[int, int]],
    run: str,
    *,
    remove: bool,
) -> tuple[list[int], list[str]]:
    """(shards to compute, problems) of a resumed run.

    A shard is done when its single file, or every part of one earlier N-process run, is
    complete, intact and sealed by this run for its row range (:mod:`resofilter_jax.data.sealed`).
    Files that exist but fail that check (truncated, corrupted, foreign, never sealed) are
    listed as problems and, with ``remove``, deleted so that no merge can pick them up,
    together with the temporary files of writers that were killed (``.*.tmp``; only call
    it with ``remove`` while holding the run lock, when no writer is alive).
    """
    out = Path(out_dir)
    if remove:
        for tmp in out.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    d = out / SHARD_DIR
    names = set(os.listdir(d)) if d.is_dir() else set()
    sets: dict[int, dict[int, set[int]]] = {}
    for name in names:
        if m := _PART.match(name):
            k, p, n = (int(g) for g in m.groups())
            sets.setdefault(k, {}).setdefault(n, set()).add(p)
    todo, problems = [], []
    for k, (lo, hi) in enumerate(ranges):
        candidates = [(1, [0])] if f"shard-{k:05d}.parquet" in names else []
        candidates += sorted((n, sorted(ps)) for n, ps in sets.get(k, {}).items())
        done = False
        for n, ps in candidates:
            bad = []
            for p in ps:
                path = shard_path(out, k, (p, n))
                why = check_sealed(path, shard_meta(run, k, lo, hi, (p, n)))
                if why:
                    bad.append(path)
                    problems.append(f"{path.name}: {why}")
            if remove:
                for path in bad:
                    remove_sealed(path)
            if not bad and ps == list(range(n)) and not done:
                done = True
        if not done:
            todo.append(k)
    return todo, problems


def write_shard(
    out_dir: str | os.PathLike[str],
    k: int,
    columns: Mapping[str, Any],
    schema: pa.Schema = IFD_SCHEMA,
    part: tuple[int, int] = (0, 1),
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Writes shard ``k`` (columns of ``schema``, default :data:`IFD_SCHEMA`) atomically and
    seals it with ``meta`` (:func:`shard_meta`); returns its path.

    ``part=(p, n)``: process p of an n-process job writes its rows of the shard.
    """
    arrays = [pa.array(list(columns[f.name]), type=f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    path = shard_path(out_dir, k, part)
    write_sealed(path, table_bytes(table), meta or {})
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
    schema: pa.Schema = IFD_SCHEMA,
    sealed_by: tuple[str, Sequence[tuple[int, int]]] | None = None,
) -> MergedScores:
    """Concatenates all shards into ``scores.parquet`` and ``scores.jsonl`` (NaN -> null).

    One shard file at a time (memory: one shard, whatever the number of rows); both files
    appear atomically once complete. ``schema`` is the shard files' schema (default: IFD's
    :data:`IFD_SCHEMA`); a column of it that a shard written by an earlier version lacks is
    filled in when :data:`DERIVED` gives it exactly (:func:`read_shard_table`). Every file
    is checked against its seal first: with ``sealed_by=(run_hash, ranges)`` also that this
    run sealed it for its rows (:func:`shard_meta`), else size and checksum only; a bad one
    is removed and the merge fails.

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
            for k, f in ((i, f) for i in range(n_shards) for f in done[i]):
                data, why = read_sealed(f, _expected_seal(sealed_by, k, f))
                if data is None:
                    remove_sealed(f)  # the next run recomputes it
                    raise RuntimeError(
                        f"cannot merge: {f} is {why}; it was removed, run the same command "
                        "again to recompute it"
                    )
                table = read_shard_table(data, schema, f).drop_columns(drop)
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


def read_shard_table(data: bytes, schema: pa.Schema, path: Path | str = "") -> pa.Table:
    """A shard file's bytes as a table of ``schema``.

    A column the file lacks (it was written before the column existed, e.g. IFD's
    ``ifd_loss_ratio``) is computed from the file's own columns where :data:`DERIVED` says
    how, with the same float64 division as the scorer, so a resumed run merges exactly what
    a fresh one writes.

    Raises:
        ValueError: If a column is missing that cannot be derived.
    """
    names = set(pq.ParquetFile(pa.BufferReader(data)).schema_arrow.names)
    missing = [f.name for f in schema if f.name not in names]
    if not missing:
        return pq.read_table(pa.BufferReader(data), schema=schema)
    table = pq.read_table(pa.BufferReader(data))
    if any(m not in DERIVED or not set(DERIVED[m]) <= names for m in missing):
        raise ValueError(
            f"{path}: shard file lacks columns {missing} that cannot be derived; it was written "
            "with other settings: use another output_dir or overwrite=True"
        )
    arrays = []
    for f in schema:
        if f.name in missing:
            num, den = (table.column(c).to_numpy() for c in DERIVED[f.name])
            with np.errstate(divide="ignore", invalid="ignore"):
                arrays.append(pa.array(num / den, f.type))  # [n] float64
        else:
            arrays.append(table.column(f.name).cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _expected_seal(
    sealed_by: tuple[str, Sequence[tuple[int, int]]] | None, k: int, path: Path
) -> dict[str, Any]:
    """The seal metadata :func:`merge_shards` requires of shard ``k``'s file ``path``."""
    if sealed_by is None:
        return {}
    run, ranges = sealed_by
    m = _PART.match(path.name)
    part = (int(m[2]), int(m[3])) if m else (0, 1)
    return shard_meta(run, k, *ranges[k], part)


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

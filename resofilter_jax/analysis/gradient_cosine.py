"""Cosine of projected gradients with a target set's mean direction (LESS-style analysis).

Reads the projections a resonance run writes (:mod:`resofilter_jax.scoring.projection`, with
``--config.features.projection_dim=K``) and the run's score shards for the row keys; the
``gradient_cosine`` mode of ``python -m resofilter_jax.analyze`` reports on the result.
Imports jax (through the projection module).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resofilter_jax.data.atomic import atomic_write_table
from resofilter_jax.scoring.outputs import shard_path
from resofilter_jax.scoring.projection import check_compatible, iter_shards, read_index

__all__ = [
    "cosine_to",
    "gradient_cosine",
    "mean_direction",
    "parse_rows",
    "row_keys",
    "write_cosine",
]


def parse_rows(text: str) -> np.ndarray:
    """``"0:100,205,300:310"`` (half-open ranges and single numbers) -> sorted unique [m] int64.

    Raises:
        ValueError: On an empty or malformed list.
    """
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if ":" in part:
                lo, hi = (int(x) for x in part.split(":"))
                if hi <= lo or lo < 0:
                    raise ValueError
                out.extend(range(lo, hi))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(
                f"bad row spec {text!r}: use comma-separated indices and half-open ranges a:b, "
                "e.g. rows:0:100,205"
            ) from None
    if not out or min(out) < 0:
        raise ValueError(f"bad row spec {text!r}: no rows, or a negative index")
    return np.unique(np.asarray(out, np.int64))


def row_keys(index: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``index``, ``turn``, ``status`` of every projection row, from the run's score shards.

    Falls back to row numbers (turn 0, status ok) when the score shards are not next to the
    projections.
    """
    run_dir = Path(index["dir"]).parent
    cols: dict[str, list[Any]] = {"index": [], "turn": [], "status": []}
    for k, s in enumerate(index["shards"]):
        path = shard_path(run_dir, k)
        n = s["stop"] - s["start"]
        if not path.is_file():
            cols["index"] += list(range(s["start"], s["stop"]))
            cols["turn"] += [0] * n
            cols["status"] += ["ok"] * n
            continue
        t = pq.read_table(path, columns=["index", "turn", "status"])
        if t.num_rows != n:
            raise ValueError(f"{path} has {t.num_rows} rows, projection shard {k} has {n}")
        for c in cols:
            cols[c] += t.column(c).to_pylist()
    return {
        "index": np.asarray(cols["index"], np.int64),
        "turn": np.asarray([0 if t is None else t for t in cols["turn"]], np.int64),
        "status": np.asarray(cols["status"], dtype=object),
    }


def _usable(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 rows and [m] bool: finite with a non-zero norm."""
    x = np.asarray(x, np.float64)  # [m, K]
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))  # [m] (NaN for NaN rows)
    return x, np.isfinite(norm) & (norm > 0)


def mean_direction(chunks: Iterator[np.ndarray]) -> tuple[np.ndarray, int, int]:
    """LESS's target gradient: the mean of the normalised rows.

    Returns:
        ``(mean [K] float64, rows used, rows skipped (NaN / zero))``.
    """
    total, used, skipped = None, 0, 0
    for chunk in chunks:
        x, ok = _usable(chunk)
        unit = x[ok] / np.linalg.norm(x[ok], axis=1, keepdims=True)  # [m_ok, K]
        part = unit.sum(axis=0)
        total = part if total is None else total + part
        used, skipped = used + int(ok.sum()), skipped + int((~ok).sum())
    if not used or total is None:
        raise ValueError("the target set has no row with a finite, non-zero projected gradient")
    return total / used, used, skipped


def cosine_to(x: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """[m] float64 cosine of each row with ``direction``; NaN for unusable rows."""
    x, ok = _usable(x)
    out = np.full(len(x), np.nan)
    den = np.linalg.norm(x[ok], axis=1) * np.linalg.norm(direction)
    out[ok] = (x[ok] @ direction) / den
    return np.clip(out, -1.0, 1.0)


def gradient_cosine(a: str | os.PathLike[str], target: str) -> dict[str, Any]:
    """Per-row cosine of run ``a``'s projected gradients with a target set's mean direction.

    Args:
        a: A run's output dir (or its projections dir).
        target: Another run's output / projections dir (checked with
            :func:`~resofilter_jax.scoring.projection.check_compatible`), or ``rows:SPEC``
            (see :func:`parse_rows`): the rows of ``a`` whose ``index`` is listed.

    Returns:
        ``columns`` (``index``, ``turn``, ``status``, ``cosine`` [n]) and ``info`` (counts,
        settings, paths).

    Raises:
        ValueError: On incompatible projections, a bad or empty target.
    """
    ia = read_index(a)
    keys = row_keys(ia)
    if target.startswith("rows:"):
        want = parse_rows(target[len("rows:") :])
        missing = np.setdiff1d(want, keys["index"])
        if len(missing):
            raise ValueError(f"target rows {missing[:8].tolist()} are not in {ia['dir']}")
        sel = np.isin(keys["index"], want)
        chunks = (x[sel[lo:hi]] for lo, hi, x in iter_shards(ia["dir"]))
        target_info: dict[str, Any] = {"rows_of_a": target, "indices": len(want)}
    else:
        it = read_index(target)
        check_compatible(ia, it)
        chunks = (x for _, _, x in iter_shards(it["dir"]))
        target_info = {"dir": it["dir"], "rows": it["rows"]}
    direction, used, skipped = mean_direction(chunks)
    cos = np.concatenate(
        [cosine_to(x, direction) for _, _, x in iter_shards(ia["dir"])] or [np.zeros(0)]
    )
    status = np.where(np.isfinite(cos), "ok", keys["status"]).astype(object)
    status[(status == "ok") & ~np.isfinite(cos)] = "no_gradient"
    target_info.update(used=used, skipped=skipped, mean_norm=float(np.linalg.norm(direction)))
    info = {
        "a": ia["dir"],
        "target": target_info,
        "projection": {k: ia[k] for k in ("dim", "seed", "kind", "grad_dim")},
        "params": [p["name"] for p in ia["params"]],
        "rows": len(cos),
        "rows_with_cosine": int(np.isfinite(cos).sum()),
    }
    columns = {"index": keys["index"], "turn": keys["turn"], "status": status, "cosine": cos}
    return {"columns": columns, "info": info}


def write_cosine(path: str | os.PathLike[str], columns: Mapping[str, np.ndarray]) -> Path:
    """Writes ``index, [turn], status, cosine`` as Parquet, atomically (``turn`` if used)."""
    fields = [("index", pa.int64()), ("turn", pa.int64()), ("status", pa.string())]
    fields.append(("cosine", pa.float64()))
    if not np.any(columns["turn"]):
        fields = [f for f in fields if f[0] != "turn"]
    schema = pa.schema(fields)
    arrays = [pa.array(list(columns[name]), type=t) for name, t in fields]
    p = Path(path)
    atomic_write_table(p, pa.Table.from_arrays(arrays, schema=schema))
    return p

"""The ``gradient`` policy: LESS-style selection by projected gradients (Xia et al. 2024).

Reads the projections a resonance run writes next to its score file
(``--config.features.projection_dim=K``: ``<scores dir>/projections``); the target set is
rows of the same run (``--target_rows``, the ``rows:`` syntax of
:func:`resofilter_jax.analysis.gradient_cosine.parse_rows`: the rows whose ``index`` is
listed, every turn of them).

* Default: each row's cosine with the target set's mean direction (the mean of the targets'
  normalised projections), exactly what ``analyze --mode gradient_cosine --target rows:SPEC``
  computes (:func:`~resofilter_jax.analysis.gradient_cosine.gradient_cosine` is called);
  the top k by it, ties by the earlier row; column ``grad_cosine``.
* ``round_robin``: each row's cosine with every usable target row; the target rows take
  turns as in RDS+ (:func:`~resofilter_jax.selection.target.round_robin`); columns
  ``grad_max_cosine`` (max over the target rows) and ``grad_target`` (the ``index`` of the
  target row whose turn picked it).

Candidates: the score file's ``ok`` rows with a usable (finite, non-zero) projection; the
target rows are candidates too. Imports jax (through the projection module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resofilter_jax.analysis.gradient_cosine import gradient_cosine, parse_rows, row_keys
from resofilter_jax.scoring.projection import iter_shards, read_index
from resofilter_jax.selection.assemble import ScoreKeys
from resofilter_jax.selection.target import Picks, max_cosine, round_robin, top_k, unit_rows

if TYPE_CHECKING:
    from resofilter_jax.selection.pipeline import SelectConfig

__all__ = ["BLOCK", "align_keys", "select_gradient"]

BLOCK = 1 << 14  # projection rows per similarity block


def align_keys(
    index: np.ndarray, turn: np.ndarray, ref_index: np.ndarray, ref_turn: np.ndarray
) -> np.ndarray:
    """[n] position of each (index, turn) key among the reference keys (-1: absent)."""
    index, turn = np.asarray(index, np.int64), np.asarray(turn, np.int64)
    ref_index, ref_turn = np.asarray(ref_index, np.int64), np.asarray(ref_turn, np.int64)
    if np.array_equal(index, ref_index) and np.array_equal(turn, ref_turn):
        return np.arange(len(index), dtype=np.int64)
    width = int(max(turn.max(initial=0), ref_turn.max(initial=0))) + 1
    key, ref = index * width + turn, ref_index * width + ref_turn  # [n], [m]
    if not len(ref):
        return np.full(len(key), -1, np.int64)
    order = np.argsort(ref, kind="stable")
    slot = np.minimum(np.searchsorted(ref, key, sorter=order), len(ref) - 1)
    found = order[slot]  # [n] the first reference row with a key >= the row's
    return np.where(ref[found] == key, found, -1)


def _target_vectors(pdir: str, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(usable target projections [T, K] float64, their projection rows [T], skipped)``."""
    parts, rows = [], []
    for lo, hi, x in iter_shards(pdir):
        sel = np.nonzero(mask[lo:hi])[0]
        parts.append(np.asarray(x[sel], np.float64))
        rows.append(lo + sel)
    x = np.concatenate(parts) if parts else np.zeros((0, 0))
    at = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    _, ok = unit_rows(x)
    return x[ok], at[ok], int((~ok).sum())


def select_gradient(
    config: SelectConfig, keys: ScoreKeys, ok: np.ndarray, k_of: Callable[[int], int]
) -> Picks:
    """LESS-style selection over the ok rows (``ok`` [n]) of the score file (module doc).

    Raises:
        ValueError: Without ``--target_rows``, with rows missing from the run, a score file
            whose rows are not the projection run's, or no usable target row.
    """
    if not config.target_rows:
        raise ValueError("--policy gradient needs --target_rows (rows of the run, e.g. 0:100,205)")
    run_dir = Path(config.scores).parent
    index = read_index(run_dir)
    proj = row_keys(index)  # the projection rows' keys
    turns = keys.turns(np.arange(len(keys.index)))
    where = align_keys(keys.index, turns, proj["index"], proj["turn"])  # [n] projection rows
    if np.any(where < 0):
        raise ValueError(
            f"{int(np.sum(where < 0))} rows of {config.scores} (e.g. index "
            f"{int(keys.index[np.argmax(where < 0)])}) are not rows of the projections in "
            f"{index['dir']}: is it the run's score file?"
        )
    spec = config.target_rows.removeprefix("rows:")
    info: dict[str, Any] = {
        "projection": {k: index[k] for k in ("dim", "seed", "kind", "grad_dim")},
        "round_robin": bool(config.round_robin),
    }
    if not config.round_robin:  # the analysis' cosine with the target mean direction
        res = gradient_cosine(run_dir, f"rows:{spec}")
        cos = np.where(ok, res["columns"]["cosine"][where], np.nan)  # [n] score-file order
        usable = int(np.isfinite(cos).sum())
        picked = top_k(cos, k_of(usable))
        extra = {"grad_cosine": dict(zip(picked.tolist(), cos[picked].tolist(), strict=True))}
        info.update(candidates=usable, target=res["info"]["target"], score="grad_cosine")
        return Picks(picked, extra, info, {"grad_cosine": cos})
    want = parse_rows(spec)
    missing = np.setdiff1d(want, proj["index"])
    if len(missing):
        raise ValueError(f"target rows {missing[:8].tolist()} are not in {index['dir']}")
    targets, target_rows, skipped = _target_vectors(index["dir"], np.isin(proj["index"], want))
    if not len(targets):
        raise ValueError("the target rows have no finite, non-zero projected gradient")
    candidate = np.zeros(len(proj["index"]), bool)  # [rows of the projections]
    candidate[where[ok]] = True
    back = np.full(len(candidate), -1, np.int64)
    back[where] = np.arange(len(where))  # projection row -> score-file row

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for lo, hi, x in iter_shards(index["dir"]):
            for s in range(lo, hi, BLOCK):
                e = min(hi, s + BLOCK)
                block = np.asarray(x[s - lo : e - lo], np.float64)  # [b, K]
                block[~candidate[s:e]] = np.nan
                yield s, block

    scores = max_cosine(blocks, targets, len(candidate))
    usable = int(np.isfinite(scores.score).sum())
    rows, picker = round_robin(blocks, targets, usable, k_of(usable))
    picked = back[rows]
    extra = {
        "grad_max_cosine": dict(zip(picked.tolist(), scores.score[rows].tolist(), strict=True)),
        "grad_target": dict(
            zip(picked.tolist(), proj["index"][target_rows[picker]].tolist(), strict=True)
        ),
    }
    info.update(
        candidates=usable,
        target={"rows_of_a": f"rows:{spec}", "used": len(targets), "skipped": skipped},
        score="grad_max_cosine",
    )
    return Picks(picked, extra, info, {"grad_max_cosine": scores.score[where]})

"""Target-aware selection: candidates ranked by their cosine to a set of target vectors.

Pure numpy over blocks of candidate vectors (embeddings or projected gradients), so a pool
never has to be in memory as a whole and no [candidates x targets] matrix is ever held:

* :func:`max_cosine`: per candidate, the largest cosine over the target vectors (RDS+'s
  score) and the target that gives it.
* :func:`round_robin`: the selection RDS+ makes over several targets. Targets take turns in
  their order (target 0, 1, ..., T-1, then 0 again); at its turn a target takes the
  candidate most similar to it (highest cosine, ties: the earlier candidate) that is not
  taken yet; this stops when ``k`` candidates are taken. Each target ranks every
  candidate, so a turn is never lost. (The released RDS+ code round-robins over tasks, each
  ranked by its max-over-examples score, and a task whose next candidate was already taken
  by another one loses that turn; here every turn takes a new candidate, and a "task" is
  one target vector.)
* :func:`top_k`: plain top-k of a score, ties by the earlier candidate.

Candidates are the rows of the blocks in order (row ``r`` = the ``r``-th candidate); a row
that is not finite or has zero norm is no candidate (NaN score, never picked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from resofilter_jax.selection.policies import first_k

__all__ = [
    "Blocks",
    "Picks",
    "TargetScores",
    "max_cosine",
    "round_robin",
    "top_k",
    "top_per_target",
    "unit_rows",
]

# A function that yields ``(first row, [rows, D] vectors)`` over all candidates, in row order,
# each time it is called (the candidates may be read more than once).
Blocks = Callable[[], Iterator[tuple[int, np.ndarray]]]


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as float64 unit rows and [m] bool usable (finite, non-zero norm); others are 0."""
    x = np.asarray(x, np.float64)  # [m, D]
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.sqrt(np.einsum("ij,ij->i", x, x))  # [m] NaN / inf for bad rows
    ok = np.isfinite(norm) & (norm > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = x / norm[:, None]  # [m, D]
    if not ok.all():
        out[~ok] = 0.0
    return out, ok


class Picks(NamedTuple):
    """A target-aware selection: ``positions`` [k] (score-file rows, in selection order),
    ``extra`` (output column -> {position: value}), ``info`` (summary entries) and
    ``scores`` (score column -> [n] value of EVERY score-file row, NaN where not a
    candidate: what ``--scores_out`` writes)."""

    positions: np.ndarray
    extra: dict[str, dict[int, Any]]
    info: dict[str, Any]
    scores: dict[str, np.ndarray]


class TargetScores(NamedTuple):
    """Per candidate: ``score`` [n] max cosine over the targets (NaN: no candidate) and
    ``nearest`` [n] the target giving it (lowest target on ties; -1: no candidate)."""

    score: np.ndarray
    nearest: np.ndarray


def _similarities(blocks: Blocks, targets: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, sim [rows, T])`` per block: cosines with the unit ``targets`` [T, D];
    NaN rows for non-candidates."""
    for start, x in blocks():
        unit, ok = unit_rows(x)  # [b, D], [b]
        sim = unit @ targets.T  # [b, T] float64
        np.clip(sim, -1.0, 1.0, out=sim)
        sim[~ok] = np.nan
        yield start, sim


def _check_targets(targets: np.ndarray) -> np.ndarray:
    """Unit float64 targets [T, D]; raises if one is not usable."""
    unit, ok = unit_rows(np.atleast_2d(targets))
    if not len(unit):
        raise ValueError("no target vectors")
    if not ok.all():
        raise ValueError(f"target vectors {np.nonzero(~ok)[0][:8].tolist()} are NaN or zero")
    return unit


def max_cosine(blocks: Blocks, targets: np.ndarray, n: int) -> TargetScores:
    """Max cosine of each of the ``n`` candidates over ``targets`` [T, D] (one pass)."""
    unit = _check_targets(targets)
    score = np.full(n, np.nan)  # [n]
    nearest = np.full(n, -1, np.int64)  # [n]
    for start, sim in _similarities(blocks, unit):
        rows = slice(start, start + len(sim))
        ok = ~np.isnan(sim[:, 0])  # [b]
        best = np.argmax(np.where(ok[:, None], sim, -np.inf), axis=1)  # [b] first max
        score[rows] = np.where(ok, sim[np.arange(len(sim)), best], np.nan)
        nearest[rows] = np.where(ok, best, -1)
    return TargetScores(score, nearest)


def top_per_target(blocks: Blocks, targets: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` candidates most similar to each target, by cosine descending, ties: the
    earlier candidate first (one pass, memory O(T x (m + block))).

    Returns:
        ``(rows [T, m'] int64, cosines [T, m'] float64)``, m' = min(m, candidates seen);
        non-candidates are never listed while there are enough candidates.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    unit = _check_targets(targets)
    t = len(unit)
    rows = np.zeros((t, 0), np.int64)  # per target: its best so far, in row order
    vals = np.zeros((t, 0))
    for start, sim in _similarities(blocks, unit):
        sim = np.where(np.isnan(sim), -np.inf, sim).T  # [T, b]
        cols = np.arange(sim.shape[1])
        if rows.shape[1] + len(cols) > m:  # only cosines >= the m-th largest can enter
            both = np.concatenate([vals, sim], axis=1)  # [T, m' + b]
            mth = -np.partition(-both, m - 1, axis=1)[:, m - 1 : m]  # [T, 1]
            cols = np.nonzero((sim >= mth).any(axis=0))[0]  # [c] block rows that may enter
            sim = np.where(sim[:, cols] >= mth, sim[:, cols], -np.inf)  # [T, c]
        both_rows = np.concatenate([rows, np.broadcast_to(start + cols, (t, len(cols)))], 1)
        both_vals = np.concatenate([vals, sim], axis=1)  # [T, m + c], rows ascending
        keep = np.argsort(-both_vals, axis=1, kind="stable")[:, :m]  # cosine desc, row asc
        keep.sort(axis=1)  # back to row order for the next merge
        rows = np.take_along_axis(both_rows, keep, axis=1)
        vals = np.take_along_axis(both_vals, keep, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # [T, m'] rows are ascending: ties ok
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(vals, order, axis=1)


def round_robin(
    blocks: Blocks, targets: np.ndarray, candidates: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """RDS+'s round-robin selection of ``k`` candidates over ``targets`` [T, D] (module doc).

    Args:
        blocks: The candidate vectors.
        targets: [T, D] target vectors (any norm; cosines are used).
        candidates: How many rows of ``blocks`` are candidates (finite, non-zero).
        k: Rows to take (at most ``candidates``).

    Returns:
        ``(rows [k] int64 in pick order, picker [k] int64 the target whose turn took it)``.
        Each target's ranking is read ``m`` rows deep (``ceil(k / T)`` + 16, doubled and
        re-read when a target has taken or seen taken all of them), so ``blocks`` is read
        about log2 of the overlap between the targets' favourites times.
    """
    if k > candidates:
        raise ValueError(f"cannot take {k} of {candidates} candidates")
    n_targets = len(np.atleast_2d(targets))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = min(candidates, math.ceil(k / n_targets) + 16)
    lists = _rankings(blocks, targets, m)
    taken: set[int] = set()
    cursor = [0] * n_targets  # per target: its first list entry not known to be taken
    picks: list[int] = []
    picker: list[int] = []
    while len(picks) < k:
        for t in range(n_targets):
            if len(picks) == k:
                break
            while True:
                row = lists[t]
                while cursor[t] < len(row) and row[cursor[t]] in taken:
                    cursor[t] += 1
                if cursor[t] < len(row):
                    break
                if m >= candidates:
                    raise ValueError(f"fewer than the {candidates} candidates said")
                m = min(candidates, 2 * m)  # read deeper: the new lists extend the old ones
                lists = _rankings(blocks, targets, m)
            taken.add(row[cursor[t]])
            picks.append(row[cursor[t]])
            picker.append(t)
    return np.asarray(picks, np.int64), np.asarray(picker, np.int64)


def _rankings(blocks: Blocks, targets: np.ndarray, m: int) -> list[list[int]]:
    """Per target, its first ``m`` candidates (:func:`top_per_target`) as Python ints."""
    rows, vals = top_per_target(blocks, targets, m)
    return [r[np.isfinite(v)].tolist() for r, v in zip(rows, vals, strict=True)]


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` highest finite ``score`` values, highest first, ties: earlier row."""
    values = np.asarray(score, np.float64)
    usable = np.nonzero(np.isfinite(values))[0]  # [m] ascending
    return first_k(-values[usable], usable, k)

"""The selection policies: which rows of a score file Superfiltering and ResoFilter keep.

Pure functions of the score columns (no files, no jax); :mod:`resofilter_jax.selection.pipeline`
applies them to a score file and writes the rows. The target-aware policies
(``representation``, ``gradient``) live in :mod:`resofilter_jax.selection.target` and the
modules it names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from resofilter_jax.selection.score_file import as_float

POLICIES = ("superfiltering", "resofilter", "representation", "gradient")
TARGET_POLICIES = ("representation", "gradient")
# The column each policy selects on by default: the first of these the score file has.
DEFAULT_COLUMNS = {"superfiltering": ("ifd", "rifd"), "resofilter": ("score",)}
FORMATS = ("rows", "reference")
ORDERS = ("auto", "score", "original")
KEEPS = ("low", "high")
SCORE_KEYS = (
    "loss_direct",
    "loss_condition",
    "ppl_direct",
    "ppl_condition",
    "ifd",
    "n_tokens_direct",
    "n_tokens_condition",
)
RESO_KEYS = ("score", "loss", "ppl", "n_tokens")
FEATURE_PREFIX = "reso/"
# Copies of the choices of the jax modules (selection.facility_location.METRICS / TIES,
# selection.embeddings.EMB_TYPES), so that validating options imports no jax.
FLA_METRICS = ("euclidean", "cosine")
FLA_TIES = ("low", "high")
EMBED_TYPES = ("whole", "instruction", "response")

__all__ = [
    "DEFAULT_COLUMNS",
    "EMBED_TYPES",
    "FEATURE_PREFIX",
    "FLA_METRICS",
    "FLA_TIES",
    "FORMATS",
    "KEEPS",
    "ORDERS",
    "POLICIES",
    "RESO_KEYS",
    "SCORE_KEYS",
    "TARGET_POLICIES",
    "check_drop_rate",
    "default_column",
    "detect_policy",
    "first_k",
    "resofilter_keep",
    "resofilter_select",
    "superfiltering_select",
    "target_budget",
]


def detect_policy(columns: Sequence[str]) -> str:
    """``superfiltering`` for a score file with an ``ifd`` (or, without one, an ``rifd``)
    column, ``resofilter`` for a ``score`` column.

    Raises:
        ValueError: If the file has a Superfiltering column and ``score``, or neither.
    """
    sf = [c for c in DEFAULT_COLUMNS["superfiltering"] if c in columns]
    has_score = "score" in columns
    if sf and has_score:
        raise ValueError(f"the score file has both `{sf[0]}` and `score` columns: pass --policy")
    if not (sf or has_score):
        raise ValueError(
            "the score file has neither an `ifd` or `rifd` (Superfiltering) nor a `score` "
            f"(ResoFilter) column; its columns: {sorted(columns)[:12]}"
        )
    return "superfiltering" if sf else "resofilter"


def default_column(policy: str, columns: Sequence[str]) -> str:
    """The column ``policy`` selects on without ``--column``: the first of its
    ``DEFAULT_COLUMNS`` in ``columns`` (else the first of them, which the caller reports
    missing)."""
    names = DEFAULT_COLUMNS[policy]
    return next((c for c in names if c in columns), names[0])


def target_budget(rows: int, candidates: int, *, rate: float, count: int = 0) -> int:
    """Rows a target-aware policy selects: ``count`` if > 0, else floor(rate x rows of the
    score file), at most the ``candidates``."""
    if count < 0 or not 0.0 <= rate <= 1.0:
        raise ValueError(f"--count must be >= 0 and --rate in [0, 1], got {count}, {rate}")
    return min(candidates, count if count > 0 else math.floor(rate * rows))


def first_k(
    keys: np.ndarray, pos: np.ndarray, k: int | None, ties: np.ndarray | None = None
) -> np.ndarray:
    """``pos`` ordered by ``keys`` ascending, then ``ties`` (default: ``pos``, ascending); the
    first ``k`` (None: all).

    A small ``k`` only sorts the rows whose key is at most the k-th smallest (np.partition);
    every row tied with the k-th is among them, so the result is that of the full sort.
    """
    if k == 0:
        return pos[:0]
    if k is not None and 0 < k < len(pos):
        kth = np.partition(keys, k - 1)[k - 1]
        near = keys <= kth  # [m] the k rows in front and every row tied with the k-th
        keys, pos = keys[near], pos[near]
        ties = None if ties is None else ties[near]
    order = np.argsort(keys, kind="stable") if ties is None else np.lexsort((ties, keys))
    return pos[order][:k]


def superfiltering_select(
    ifd: np.ndarray, *, rate: float, count: int = 0, threshold: float = 1.0
) -> np.ndarray:
    """Positions of the selected rows, ordered by IFD descending (ties: lower position first).

    Args:
        ifd: [n] IFD per row (NaN / None for rows without a score).
        rate: fraction of the n rows to keep (k = floor(rate * n)), unless `count` > 0.
        count: an absolute number of rows to keep when > 0.
        threshold: only IFD strictly below it is eligible.
    """
    values = as_float(ifd)  # [n]
    k = count if count > 0 else math.floor(rate * len(values))
    eligible = np.nonzero(np.isfinite(values) & (values < threshold))[0]  # [m] ascending
    return first_k(-values[eligible], eligible, k)  # IFD desc, then position


def check_drop_rate(p: float) -> None:
    """Raises ValueError unless ``p`` is a number in [0, 1)."""
    if not (isinstance(p, int | float) and 0.0 <= p < 1.0):
        raise ValueError(f"drop rates must be in [0, 1), got {p!r}")


def resofilter_select(
    score: Sequence[Any],
    drop_rate: float,
    *,
    keep: str = "low",
    rank: Sequence[int] | None = None,
    order: str = "original",
) -> np.ndarray:
    """Positions ResoFilter keeps: all scored rows but the first int(N x drop_rate) of the ranking.

    Args:
        score: [n] score per row; NaN / None = not scored (not a candidate, not in N).
        drop_rate: p in [0, 1).
        keep: ``low``: rank by score descending (drop the largest changes); ``high``: ascending.
        rank: [n] input order of the rows, for ties (lower first) and the output order
            (default: the positions).
        order: ``original``: kept positions in input order; ``score``: in ranking order.
    """
    (kept,) = resofilter_keep(score, (drop_rate,), keep=keep, rank=rank, order=order)
    return kept


def resofilter_keep(
    score: Sequence[Any],
    drop_rates: Sequence[float],
    *,
    keep: str = "low",
    rank: Sequence[int] | None = None,
    order: str = "original",
) -> list[np.ndarray]:
    """:func:`resofilter_select` for several drop rates, from one ranking."""
    for p in drop_rates:
        check_drop_rate(p)
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    if order not in ("score", "original"):
        raise ValueError(f"order must be 'score' or 'original', got {order!r}")
    values = as_float(score)  # [n]
    scored = np.nonzero(np.isfinite(values))[0]  # [N] ascending
    keys = (-1.0 if keep == "low" else 1.0) * values[scored]  # [N] ranking: keys ascending
    ranks = None if rank is None else np.asarray(rank, np.int64)
    ties = None if ranks is None or _ascending(ranks[scored]) else ranks[scored]
    drops = [int(len(scored) * p) for p in drop_rates]
    if order == "score":
        ranking = first_k(keys, scored, None, ties)
        return [ranking[d:] for d in drops]
    front = first_k(keys, scored, max(drops, default=0), ties)  # the rows any rate drops
    out = []
    for d in drops:
        dropped = np.zeros(len(values), bool)
        dropped[front[:d]] = True
        kept = scored[~dropped[scored]]  # ascending positions
        out.append(kept if ties is None else kept[np.argsort(ranks[kept], kind="stable")])
    return out


def _ascending(a: np.ndarray) -> bool:
    return len(a) < 2 or bool(np.all(a[1:] > a[:-1]))

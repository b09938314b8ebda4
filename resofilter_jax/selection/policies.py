"""The selection policies: which rows of a score file Superfiltering and ResoFilter keep.

Pure functions of the score columns (no files, no jax); :mod:`resofilter_jax.selection.pipeline`
applies them to a score file and writes the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from resofilter_jax.selection.rows import as_float

POLICIES = ("superfiltering", "resofilter")
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
    "check_drop_rate",
    "detect_policy",
    "resofilter_select",
    "superfiltering_select",
]


def detect_policy(columns: Sequence[str]) -> str:
    """``superfiltering`` for a score file with an ``ifd`` column, ``resofilter`` for ``score``.

    Raises:
        ValueError: If the file has both columns or neither.
    """
    has_ifd, has_score = "ifd" in columns, "score" in columns
    if has_ifd and has_score:
        raise ValueError("the score file has both `ifd` and `score` columns: pass --policy")
    if not (has_ifd or has_score):
        raise ValueError(
            "the score file has neither an `ifd` (Superfiltering) nor a `score` (ResoFilter) "
            f"column; its columns: {sorted(columns)[:12]}"
        )
    return "superfiltering" if has_ifd else "resofilter"


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
    eligible = np.nonzero(np.isfinite(values) & (values < threshold))[0]
    order = eligible[np.lexsort((eligible, -values[eligible]))]  # IFD desc, then position
    return order[:k]


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
    check_drop_rate(drop_rate)
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    values = as_float(score)  # [n]
    rank = np.arange(len(values)) if rank is None else np.asarray(rank, np.int64)
    scored = np.nonzero(np.isfinite(values))[0]  # [N]
    sign = -1.0 if keep == "low" else 1.0
    ranking = scored[np.lexsort((rank[scored], sign * values[scored]))]
    kept = ranking[int(len(scored) * drop_rate) :]
    if order == "score":
        return kept
    if order != "original":
        raise ValueError(f"order must be 'score' or 'original', got {order!r}")
    return kept[np.argsort(rank[kept], kind="stable")]

"""Superfiltering.D: the IFD stage's rows, then facility location over their embeddings.

The reference (Superfiltering ``code_diversity_fla/do_fla.py``):

1. IFD stage: rows with IFD < 1, IFD descending (stable sort: ties in file order), first
   ``ifd_num`` (10400 in the published script).
2. Embed each kept row (:mod:`resofilter_jax.selection.embeddings`: the reference's text, the
   scoring model's mean-pooled, L2-normalised final hidden states).
3. Greedily pick ``fla_num`` (1040) by facility location
   (:mod:`resofilter_jax.selection.facility_location`: its kernel, ties and cost).
4. Write the picked rows in greedy selection order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from resofilter_jax.selection.facility_location import (
    Metric,
    SimilarityKernel,
    Ties,
    lazy_greedy,
)

__all__ = ["DiversityResult", "superfiltering_d", "superfiltering_d_details"]


class DiversityResult(NamedTuple):
    """Output of :func:`superfiltering_d_details`.

    Attributes:
        positions: [fla_num] int64 picked positions in greedy selection order.
        gains: [fla_num] float64 marginal gain of each pick (non-increasing).
        objective: ``f(S)`` of the picks over the IFD subset (the sum of the gains; exact,
            as each is a multiple of 2**-30).
        candidates: [m] int64 positions of the IFD stage, in IFD order.
        embed_seconds, greedy_seconds: Wall time of the embedding call; of kernel + greedy.
    """

    positions: np.ndarray
    gains: np.ndarray
    objective: float
    candidates: np.ndarray
    embed_seconds: float
    greedy_seconds: float


def superfiltering_d_details(
    ifd_order: Sequence[int] | np.ndarray,
    embeddings: np.ndarray | Callable[[np.ndarray], np.ndarray],
    *,
    ifd_num: int | None,
    fla_num: int,
    metric: Metric = "euclidean",
    ties: Ties = "low",
    memory_budget: int = 2 * 1024**3,
    progress: bool = False,
) -> DiversityResult:
    """The reference's two stages: top ``ifd_num`` by IFD, then ``fla_num`` by facility location.

    Args:
        ifd_order: Positions ordered by IFD descending, e.g. ``superfiltering_select(ifd,
            rate=..., count=ifd_num)`` (:mod:`resofilter_jax.selection.policies`).
        embeddings: [n_rows, hidden] embeddings indexed by position, or a callable that
            embeds given positions [m] -> [m, hidden] (so only the IFD subset is embedded),
            e.g. ``lambda p: embed_texts(model, tok, [texts[i] for i in p], max_length=...)``
            (:func:`resofilter_jax.selection.embeddings.embed_texts`).
        ifd_num: Rows kept by the IFD stage (None: all of ``ifd_order``).
        fla_num: Rows picked by facility location (at most the IFD subset's size).
        metric, ties, memory_budget, progress: See :func:`facility_location`.
    """
    top = np.asarray(ifd_order, np.int64).reshape(-1)
    if ifd_num is not None:
        if ifd_num < 0:
            raise ValueError(f"ifd_num must be >= 0, got {ifd_num}")
        top = top[:ifd_num]
    if fla_num < 0 or fla_num > top.size:
        raise ValueError(f"fla_num={fla_num} must lie in [0, {top.size}] (the IFD stage's rows)")
    t0 = time.perf_counter()
    emb = embeddings(top) if callable(embeddings) else np.asarray(embeddings)[top]
    emb = np.asarray(emb, np.float32)  # [m, hidden]
    t1 = time.perf_counter()
    if emb.ndim != 2 or emb.shape[0] != top.size:
        raise ValueError(f"got embeddings of shape {emb.shape} for {top.size} positions")
    kernel = SimilarityKernel(emb, metric=metric, memory_budget=memory_budget)
    res = lazy_greedy(kernel, fla_num, ties=ties, progress=progress)
    return DiversityResult(
        positions=top[res.indices],
        gains=res.gains,
        objective=float(res.gains.sum()),
        candidates=top,
        embed_seconds=t1 - t0,
        greedy_seconds=time.perf_counter() - t1,
    )


def superfiltering_d(
    ifd_order: Sequence[int] | np.ndarray,
    embeddings: np.ndarray | Callable[[np.ndarray], np.ndarray],
    *,
    ifd_num: int | None,
    fla_num: int,
    metric: Metric = "euclidean",
    ties: Ties = "low",
    memory_budget: int = 2 * 1024**3,
    progress: bool = False,
) -> np.ndarray:
    """:func:`superfiltering_d_details`' picks: [fla_num] int64 positions in greedy order.

    That is the order the reference writes (``[filtered_data[i] for i in fla_idxs]``); sort
    the positions for file order.
    """
    return superfiltering_d_details(
        ifd_order,
        embeddings,
        ifd_num=ifd_num,
        fla_num=fla_num,
        metric=metric,
        ties=ties,
        memory_budget=memory_budget,
        progress=progress,
    ).positions

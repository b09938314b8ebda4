"""Rank statistics in numpy (no scipy): average ranks, Pearson, Spearman, Kendall tau-b."""

from __future__ import annotations

import math

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """[n] 1-based ranks, ties get the average of their ranks. O(n log n)."""
    x = np.asarray(x)
    n = len(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.nonzero(xs[1:] != xs[:-1])[0] + 1]  # first position of each tie group
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either input is constant or has < 2 values."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(np.clip(dx @ dy / den, -1.0, 1.0)) if den > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho: Pearson correlation of average ranks. O(n log n)."""
    return pearson(rankdata(x), rankdata(y))


def _dense_ranks(x: np.ndarray) -> np.ndarray:
    """[n] int64 0-based ranks, equal values share one."""
    return np.unique(x, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _tie_pairs(keys: np.ndarray) -> int:
    """Number of pairs with equal keys: sum over runs of equal keys of t(t-1)/2. O(n log n)."""
    k = np.sort(keys)
    edges = np.r_[0, np.nonzero(k[1:] != k[:-1])[0] + 1, len(k)]
    t = np.diff(edges).astype(np.int64)
    return int(np.sum(t * (t - 1) // 2))


def count_inversions(r: np.ndarray) -> int:
    """Pairs i < j with r[i] > r[j] (strictly) for non-negative integer ranks r < len(r).

    Bottom-up merge sort with each level vectorised: O(n log^2 n) time, O(n) memory.
    """
    r = np.asarray(r, np.int64)
    n = len(r)
    if n < 2:
        return 0
    pos = np.arange(n)
    cur = r.copy()  # sorted within blocks of `width`
    total = 0
    width = 1
    while width < n:
        pair = pos // (2 * width)  # [n] which merge each element belongs to
        left = (pos // width) % 2 == 0
        keys = pair * n + cur  # [n] sorted within each pair's left and right half
        lk, rk = keys[left], keys[~left]  # lk is globally sorted
        left_end = np.searchsorted(lk, (pair[~left] + 1) * n, side="left")
        total += int(np.sum(left_end - np.searchsorted(lk, rk, side="right")))
        cur = np.sort(keys, kind="stable") - pair * n  # timsort merges the two sorted runs
        width *= 2
    return total


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b (Knight's algorithm): sort by (x, y), count y-inversions. O(n log^2 n).

    tau_b = (n0 - n1 - n2 + n3 - 2 * discordant) / sqrt((n0 - n1) * (n0 - n2)), where n0 is the
    number of pairs, n1 / n2 the pairs tied in x / y and n3 those tied in both. NaN when x or y
    is constant.
    """
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    rx, ry = _dense_ranks(x), _dense_ranks(y)
    order = np.lexsort((ry, rx))  # by x, then y: pairs tied in x are never inversions
    n0 = n * (n - 1) // 2
    n1, n2 = _tie_pairs(rx), _tie_pairs(ry)
    n3 = _tie_pairs(rx * (int(ry.max(initial=0)) + 1) + ry)  # pairs tied in both
    discordant = count_inversions(ry[order])
    den = math.sqrt(float(n0 - n1) * float(n0 - n2))
    if den == 0:
        return math.nan
    return float(np.clip((n0 - n1 - n2 + n3 - 2 * discordant) / den, -1.0, 1.0))

"""Packing an unpacked resonance test batch into rows of several examples (test helper)."""

from __future__ import annotations

from typing import Any

import numpy as np

from resofilter_jax.data import BatchPlan, collate_packed


def packed_batch(
    batch: dict[str, np.ndarray], rows: list[list[int]], length: int, dummy_rows: int = 0
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """The real rows of an unpacked batch packed as ``rows`` (lists of its row indices).

    Returns the packed arrays [len(rows) + dummy_rows, length] and, per original row, its
    (packed row, slot).
    """
    lens = batch["attention_mask"].sum(1)
    seqs = [batch["input_ids"][i, :n] for i, n in enumerate(lens)]
    labels = [batch["labels"][i, :n] for i, n in enumerate(lens)]
    plan = BatchPlan(length, np.r_[np.arange(len(rows)), -np.ones(dummy_rows, np.int64)])
    arrays, segments = collate_packed(plan, rows, seqs, [1] * len(seqs), 0, labels)
    where = [(0, 0)] * len(seqs)
    for g in segments:
        where[g.seq] = (g.row, int(arrays["attention_mask"][g.row, g.offset]) - 1)
    return arrays, where


def per_example(out: dict[str, Any], where: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Packed results [B, S, ...] -> [n, ...] in the original row order."""
    return {k: np.stack([np.asarray(v)[r, s] for r, s in where]) for k, v in out.items()}

"""Sequence packing: several short sequences share one padded row, kept apart by segment ids.

Length buckets alone pad every sequence up to its bucket and every bucket's last batch with
dummy rows (1.7 padded tokens per real token on a few hundred ShareGPT samples). Packing
puts whole sequences end to end in rows whose length is a bucket:

* :func:`pack_sequences` is best-fit decreasing: the longest sequence opens a row of its own
  bucket, and every shorter sequence goes into the open row with the least free space that
  still holds it (or opens a row of its own bucket). Short sequences fill the tails of long
  rows; rows never grow past the bucket their first sequence chose, so attention cost per
  token stays near that of unpacked buckets. Training packs with it too, with the one
  bucket ``max_length`` (:func:`resofilter_jax.training.sft_data.packed_rows`).
* :func:`collate_packed` writes a batch of packed rows: ``attention_mask`` holds each token's
  segment id (1, 2, ... within the row; 0 = padding), which the models' attention masks
  turn into a block-diagonal causal mask, and ``positions`` restart at 0 in every segment,
  so each sequence computes exactly what it computes alone.

A packed row is an "item" for :func:`resofilter_jax.data.plan_batches`, with its used length.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from resofilter_jax.data.batching import BatchPlan
from resofilter_jax.data.encoding import IGNORE_INDEX

__all__ = ["Segment", "collate_packed", "pack_sequences", "packed_lengths", "segment_slots"]


def pack_sequences(
    lengths: Sequence[int],
    buckets: Sequence[int],
    *,
    pack: bool = True,
    max_per_row: int | None = None,
) -> list[list[int]]:
    """Packs sequences into rows whose capacity is a bucket length (best-fit decreasing).

    Args:
        lengths: [n] sequence lengths (each at most the largest bucket).
        buckets: Row capacities to choose from; a new row gets the smallest bucket that holds
            the sequence that opens it.
        pack: False: one sequence per row (the unpacked layout), in index order.
        max_per_row: A row holding this many sequences takes no more (None: no limit).

    Returns:
        Rows as lists of sequence indices, in placement order; every index exactly once.
        Deterministic: ties are broken by index.

    Raises:
        ValueError: If a sequence is longer than the largest bucket.
    """
    lens = [int(x) for x in lengths]
    if max_per_row is not None and max_per_row < 1:
        raise ValueError(f"max_per_row must be >= 1, got {max_per_row}")
    if not pack or max_per_row == 1:
        return [[i] for i in range(len(lens))]
    edges = sorted(set(int(b) for b in buckets))
    if lens and max(lens) > edges[-1]:
        i = lens.index(max(lens))
        raise ValueError(
            f"sequence {i} has {lens[i]} tokens, more than the largest bucket {edges[-1]}"
        )
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # sorted (free tokens, row id)
    for i in sorted(range(len(lens)), key=lambda j: (-lens[j], j)):
        n = lens[i]
        at = bisect.bisect_left(open_rows, (n, -1))  # tightest row with free >= n
        if at < len(open_rows):
            free, r = open_rows.pop(at)
            rows[r].append(i)
            free -= n
        else:
            r = len(rows)
            rows.append([i])
            free = edges[bisect.bisect_left(edges, n)] - n
        if free > 0 and (max_per_row is None or len(rows[r]) < max_per_row):
            bisect.insort(open_rows, (free, r))
    return rows


def packed_lengths(rows: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[int]:
    """Used tokens of every packed row (the row's length for bucketing)."""
    return [sum(int(lengths[i]) for i in row) for row in rows]


@dataclass(frozen=True)
class Segment:
    """Where one sequence sits in a collated batch.

    Attributes:
        seq: The sequence's index.
        row: Batch row.
        offset: First slot of the sequence in the row.
        length: Its tokens.
        scored: Tokens scored (predicted from the previous slot): ``length - max(start, 1)``.
    """

    seq: int
    row: int
    offset: int
    length: int
    scored: int


def collate_packed(
    plan: BatchPlan,
    rows: Sequence[Sequence[int]],
    seqs: Sequence[np.ndarray],
    starts: Sequence[int],
    pad_id: int,
    labels: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], list[Segment]]:
    """Builds the arrays of one batch of packed rows.

    Args:
        plan: The batch; ``plan.rows`` index ``rows`` (-1: a dummy row).
        rows: Packed rows (sequence indices), from :func:`pack_sequences`.
        seqs: Token ids of every sequence.
        starts: First scored position of every sequence (Superfiltering's start).
        pad_id: Padding token id.
        labels: Optional SFT labels of every sequence (IGNORE_INDEX where not trained on).

    Returns:
        (arrays, segments): ``input_ids`` [B, L] int32, ``attention_mask`` [B, L] int32
        segment ids (0 = padding), ``positions`` [B, L] int32 (from 0 in each segment),
        ``loss_mask`` [B, L] float32 (1 where token t of a segment is scored, i.e.
        ``max(start, 1) <= t - offset < length``), with ``labels`` also ``labels`` [B, L]
        int32 (IGNORE_INDEX on padding and on each segment's first token, which nothing in
        its segment predicts), and one :class:`Segment` per sequence.

    Raises:
        ValueError: If a row's sequences do not fit the batch length.
    """
    bsz, length = int(plan.rows.size), plan.length
    input_ids = np.full((bsz, length), pad_id, np.int32)  # [B, L]
    segment_ids = np.zeros((bsz, length), np.int32)  # [B, L]
    positions = np.zeros((bsz, length), np.int32)  # [B, L]
    loss_mask = np.zeros((bsz, length), np.float32)  # [B, L]
    label_rows = np.full((bsz, length), IGNORE_INDEX, np.int32)  # [B, L]
    segments: list[Segment] = []
    for b, r in enumerate(plan.rows.tolist()):
        if r < 0:
            continue
        offset = 0
        for s, i in enumerate(rows[r]):
            ids = np.asarray(seqs[i])
            n = int(ids.size)
            if offset + n > length:
                raise ValueError(f"packed row {r} needs more than the batch length {length}")
            first = max(int(starts[i]), 1)
            input_ids[b, offset : offset + n] = ids
            segment_ids[b, offset : offset + n] = s + 1
            positions[b, offset : offset + n] = np.arange(n, dtype=np.int32)
            loss_mask[b, offset + first : offset + n] = 1.0
            if labels is not None:
                label_rows[b, offset + 1 : offset + n] = np.asarray(labels[i])[1:n]
            segments.append(Segment(int(i), b, offset, n, max(n - first, 0)))
            offset += n
    arrays = {
        "input_ids": input_ids,
        "attention_mask": segment_ids,
        "positions": positions,
        "loss_mask": loss_mask,
    }
    if labels is not None:
        arrays["labels"] = label_rows
    return arrays, segments


def segment_slots(arrays: dict[str, np.ndarray]) -> int:
    """Segments of the fullest row of a collated batch (0 when it has no real token)."""
    seg = arrays["attention_mask"]
    return int(seg.max()) if seg.size else 0

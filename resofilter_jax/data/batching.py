"""Length bucketing, token-budget batch plans, padding/collation and per-host slicing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from resofilter_jax.data.encoding import IGNORE_INDEX

__all__ = [
    "BatchPlan",
    "bucket_lengths",
    "collate",
    "host_slice",
    "pad_to_multiple",
    "plan_batches",
]

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPlan:
    """One padded batch: which items go in which row, at which sequence length.

    Attributes:
        length: Padded sequence length L (a bucket).
        rows: [B] int64 item indices; -1 marks a dummy (all-padding) row.
    """

    length: int
    rows: np.ndarray

    @property
    def items(self) -> np.ndarray:
        """[n_real] the real item indices of this batch."""
        return self.rows[self.rows >= 0]


def bucket_lengths(max_length: int, min_bucket: int = 32, step: int = 0) -> list[int]:
    """Sequence-length buckets: ``min_bucket * 2**k`` below ``max_length``, then ``max_length``.

    E.g. ``bucket_lengths(512) == [32, 64, 128, 256, 512]`` and
    ``bucket_lengths(1000) == [32, 64, 128, 256, 512, 1000]``. With ``step > 0`` the doubling
    stops at ``step`` and buckets then grow by ``step``:
    ``bucket_lengths(1024, 64, 128) == [64, 128, 256, 384, 512, 640, 768, 896, 1024]``, which
    pads a length-uniform batch by about step / 2 tokens per row instead of up to 2x (more
    compiled shapes, much less padding).
    """
    if max_length < 1 or min_bucket < 1 or step < 0:
        raise ValueError(
            f"need max_length >= 1, min_bucket >= 1 and step >= 0, got {max_length}, "
            f"{min_bucket}, {step}"
        )
    out = []
    b = min_bucket
    while b < max_length:
        out.append(b)
        b = b + step if step and b >= step else b * 2
    out.append(max_length)
    return out


def _rows_per_batch(length: int, token_budget: int, multiple: int, max_batch: int | None) -> int:
    """Rows in a full batch of sequence length ``length``."""
    rows = token_budget // length
    if max_batch is not None:
        rows = min(rows, max_batch)
    return max(multiple, rows // multiple * multiple)


def plan_batches(
    lengths: Sequence[int],
    *,
    buckets: Sequence[int],
    token_budget: int,
    batch_multiple: int = 1,
    max_batch: int | None = None,
    pow2_tail: bool = False,
) -> list[BatchPlan]:
    """Groups items into padded batches of similar length.

    Each item goes to the smallest bucket ``>= its length``; within a bucket items are
    sorted by length (ties by index) and cut into batches of
    ``max(batch_multiple, min(token_budget // bucket, max_batch))`` rows rounded down to
    a multiple of ``batch_multiple``. The last batch of a bucket is padded with dummy rows
    (index -1) up to a multiple of ``batch_multiple``. Every item appears exactly once.
    With ``pow2_tail`` that last batch is instead padded to ``batch_multiple`` times a
    power of two (at most a full batch), so a run compiles at most ~log2(rows) batch
    shapes per bucket. Plans are ordered by bucket, then by length.

    Raises:
        ValueError: If an item is longer than the largest bucket, or bad arguments.
    """
    if not buckets:
        raise ValueError("need at least one bucket")
    if token_budget < 1 or batch_multiple < 1 or (max_batch is not None and max_batch < 1):
        raise ValueError("token_budget, batch_multiple and max_batch must be >= 1")
    edges = np.asarray(sorted(set(buckets)), np.int64)  # [n_buckets]
    lens = np.asarray(lengths, np.int64).reshape(-1)  # [n_items]
    if lens.size and lens.min() < 0:
        raise ValueError("lengths must be >= 0")
    too_long = np.nonzero(lens > edges[-1])[0]
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"{too_long.size} items are longer than the largest bucket {int(edges[-1])} "
            f"(e.g. item {i} with {int(lens[i])} tokens); truncate them or add a bucket"
        )
    which = np.searchsorted(edges, lens, side="left")  # [n_items] bucket id per item
    order = np.lexsort((np.arange(lens.size), lens, which))  # by bucket, length, index
    plans = []
    for b, length in enumerate(edges.tolist()):
        members = order[which[order] == b]  # [n_b] sorted by length
        if members.size == 0:
            continue
        per = _rows_per_batch(length, token_budget, batch_multiple, max_batch)
        for s in range(0, members.size, per):
            rows = members[s : s + per]
            pad = -rows.size % batch_multiple
            if pow2_tail and rows.size < per:
                units = -(-rows.size // batch_multiple)  # ceil
                pad = min(per, batch_multiple * (1 << (units - 1).bit_length())) - rows.size
            rows = np.concatenate([rows, np.full((pad,), -1, np.int64)])  # [B]
            plans.append(BatchPlan(int(length), rows))
    return plans


def collate(
    plan: BatchPlan,
    seqs: Sequence[np.ndarray],
    starts_or_labels: Sequence[int] | Sequence[np.ndarray],
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Builds the padded arrays of one batch.

    Args:
        plan: The batch.
        seqs: Token ids of every item (indexed by item index).
        starts_or_labels: Per item either the first scored position (IFD) or the labels
            array (SFT, same length as the ids, -100 where masked).
        pad_id: Padding token id.

    Returns:
        ``input_ids`` [B, L] int32 (right-padded), ``attention_mask`` [B, L] int32,
        ``row`` [B] int32 (item index, -1 for dummy rows), and either ``loss_mask``
        [B, L] float32 (IFD: 1 where ``max(start, 1) <= t < n``, i.e. token t is scored as
        predicted from position t - 1) or ``labels`` [B, L] int32 (SFT, -100 padded).
        Dummy rows are all padding with zero masks.
    """
    rows = np.asarray(plan.rows, np.int64)  # [B]
    bsz, length = rows.size, plan.length
    real = [int(i) for i in rows if i >= 0]
    sft = bool(real) and isinstance(starts_or_labels[real[0]], np.ndarray)
    input_ids = np.full((bsz, length), pad_id, np.int32)  # [B, L]
    labels = np.full((bsz, length), IGNORE_INDEX, np.int32)  # [B, L]
    n = np.zeros((bsz,), np.int64)  # [B] true lengths
    start = np.zeros((bsz,), np.int64)  # [B] first scored position
    for b, i in enumerate(rows.tolist()):
        if i < 0:
            continue
        ids = np.asarray(seqs[i])
        if ids.size > length:
            raise ValueError(f"item {i} has {ids.size} tokens, more than the batch length {length}")
        input_ids[b, : ids.size] = ids
        n[b] = ids.size
        if sft:
            lab = np.asarray(starts_or_labels[i])
            if lab.shape != ids.shape:
                raise ValueError(f"item {i}: labels shape {lab.shape} != ids shape {ids.shape}")
            labels[b, : lab.size] = lab
        else:
            start[b] = int(starts_or_labels[i])
    t = np.arange(length)[None, :]  # [1, L]
    out = {
        "input_ids": input_ids,
        "attention_mask": (t < n[:, None]).astype(np.int32),  # [B, L]
        "row": rows.astype(np.int32),  # [B]
    }
    if sft:
        out["labels"] = labels
    else:
        scored = (t >= np.maximum(start, 1)[:, None]) & (t < n[:, None])  # [B, L]
        out["loss_mask"] = scored.astype(np.float32)
    return out


def host_slice(items: Sequence[T], process_index: int, process_count: int) -> Sequence[T]:
    """This host's contiguous share of ``items``.

    The split is even: with ``q, r = divmod(len(items), process_count)`` hosts
    ``0 .. r-1`` get ``q + 1`` items and the others ``q``, in order, so concatenating the
    slices of hosts ``0 .. process_count-1`` gives back ``items``.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
    q, r = divmod(len(items), process_count)
    start = process_index * q + min(process_index, r)
    stop = start + q + (1 if process_index < r else 0)
    return items[start:stop]


def pad_to_multiple(
    x: np.ndarray, multiple: int, *, axis: int = 0, value: int | float = 0
) -> np.ndarray:
    """Pads ``x`` along ``axis`` with ``value`` to a size that is a multiple of ``multiple``."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    x = np.asarray(x)
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return np.pad(x, widths, constant_values=value)

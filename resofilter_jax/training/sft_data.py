"""Training rows, optional sequence packing, and a resumable epoch/batch plan.

A *row* is one encoded example, or (``packing=True``) several examples concatenated, each
with its own positions restarting at 0 and its own segment id (1, 2, ...), so that attention
never crosses examples (the models read segment ids from ``attention_mask``).

The data position of a run is its global optimizer step ``s``: epoch ``s // steps_per_epoch``
visits the rows in the permutation drawn from ``(seed, epoch)``, batch ``s % steps_per_epoch``
of it. Re-deriving the plan from ``(seed, step)`` is what makes a resumed run see exactly the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from resofilter_jax.data import IGNORE_INDEX, SFTExample, bucket_lengths, pack_sequences


@dataclasses.dataclass(frozen=True)
class Row:
    """One training row.

    Attributes:
        ids: [n] int32 token ids.
        labels: [n] int32 targets, ``IGNORE_INDEX`` where not trained on (prompts, and the
            first token of every packed segment, which has nothing of its own to predict it).
        segments: [n] int32 segment id per token, 1..k.
        positions: [n] int32 position ids, restarting at 0 in every segment.
        examples: the example indices in this row.
    """

    ids: np.ndarray
    labels: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    examples: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.ids.size)


def single_rows(examples: Sequence[SFTExample]) -> list[Row]:
    """One row per example."""
    return [
        Row(
            ex.ids.astype(np.int32),
            ex.labels.astype(np.int32),
            np.ones(ex.ids.size, np.int32),
            np.arange(ex.ids.size, dtype=np.int32),
            (i,),
        )
        for i, ex in enumerate(examples)
    ]


def packed_rows(examples: Sequence[SFTExample], max_length: int) -> list[Row]:
    """Packs examples into rows of at most ``max_length`` tokens.

    Rows come from :func:`resofilter_jax.data.pack_sequences` with the one capacity
    ``max_length`` (best-fit decreasing, ties by index), in the order they were opened; each
    row lists its examples in index order. The layout is part of :func:`rows_fingerprint`, so
    changing it invalidates the resume check of existing checkpoints.

    Raises:
        ValueError: If an example is longer than ``max_length``.
    """
    singles = single_rows(examples)
    return [
        merge_rows([singles[i] for i in sorted(placed)])
        for placed in pack_sequences([ex.ids.size for ex in examples], [max_length])
    ]


def rows_fingerprint(rows: Sequence[Row]) -> str:
    """sha256 of every row's ids, labels and segments (detects changed data on resume)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(np.int64(len(r)).tobytes())
        h.update(r.ids.tobytes())
        h.update(r.labels.tobytes())
        h.update(r.segments.tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which rows each optimizer step trains on.

    Attributes:
        num_rows: rows in the data set.
        batch_size: rows per optimizer step (the last batch of an epoch may be short).
        epochs: passes over the data.
        seed: permutation seed.
        shuffle: permute the rows every epoch (else data order).
    """

    num_rows: int
    batch_size: int
    epochs: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ValueError("no training rows (every example was dropped or the data is empty)")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"need batch_size >= 1 and epochs >= 1, got {self}")

    @property
    def steps_per_epoch(self) -> int:
        """ceil(num_rows / batch_size): the last, short batch is kept (as HF Trainer does)."""
        return math.ceil(self.num_rows / self.batch_size)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of all epochs."""
        return self.steps_per_epoch * self.epochs

    def permutation(self, epoch: int) -> np.ndarray:
        """[num_rows] the row order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def position(self, step: int) -> dict[str, int]:
        """The data position before optimizer step ``step`` (0-based)."""
        return {
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "batch_in_epoch": step % self.steps_per_epoch,
        }

    def rows_at(self, step: int) -> np.ndarray:
        """[batch_size] row indices of optimizer step ``step``; -1 pads a short last batch."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the plan's {self.total_steps} steps")
        pos = self.position(step)
        start = pos["batch_in_epoch"] * self.batch_size
        rows = self.permutation(pos["epoch"])[start : start + self.batch_size]
        return np.concatenate([rows, np.full(self.batch_size - rows.size, -1, np.int64)])

    def state(self, step: int, fingerprint: str) -> dict[str, Any]:
        """What a checkpoint records about the data position (JSON-serialisable)."""
        return {
            **self.position(step),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "rows_fingerprint": fingerprint,
        }

    def check_resume(self, saved: dict[str, Any], fingerprint: str) -> None:
        """Raises ValueError if a checkpoint's data state belongs to a different plan or data."""
        mine = self.state(int(saved["step"]), fingerprint)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                "the checkpoint was written for other data or batching, (saved, now): "
                f"{diff}; use a fresh workdir or restore the original settings"
            )


def row_length(n: int, max_length: int, min_bucket: int) -> int:
    """Padded length of a batch whose longest row has ``n`` tokens.

    The smallest length bucket (``min_bucket * 2**k``, then ``max_length``) that holds it, so
    a run compiles the train step for a handful of shapes only.

    Raises:
        ValueError: If ``n > max_length``.
    """
    for b in bucket_lengths(max_length, min_bucket):
        if n <= b:
            return b
    raise ValueError(f"a row of {n} tokens is longer than max_length {max_length}")


def collate_rows(
    rows: Sequence[Row],
    picks: np.ndarray,
    *,
    accum: int,
    length: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Arrays [accum, micro, length] for the rows ``picks`` (-1: an all-padding dummy row).

    Row ``j`` of the batch goes to micro-batch ``j // micro``. Returns ``input_ids``,
    ``labels`` (-100 padded), ``segment_ids`` (0 on padding; the models' attention mask) and
    ``positions``, all int32.
    """
    bsz = picks.size
    if bsz % accum:
        raise ValueError(f"batch of {bsz} rows does not split into {accum} micro-batches")
    ids = np.full((bsz, length), pad_id, np.int32)  # [B, L]
    labels = np.full((bsz, length), IGNORE_INDEX, np.int32)  # [B, L]
    segments = np.zeros((bsz, length), np.int32)  # [B, L]
    positions = np.zeros((bsz, length), np.int32)  # [B, L]
    for b, i in enumerate(picks.tolist()):
        if i < 0:
            continue
        r = rows[i]
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} tokens, more than the batch length {length}")
        ids[b, : len(r)] = r.ids
        labels[b, : len(r)] = r.labels
        segments[b, : len(r)] = r.segments
        positions[b, : len(r)] = r.positions
    out = {"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": positions}
    return {k: v.reshape(accum, bsz // accum, length) for k, v in out.items()}


def merge_rows(parts: Sequence[Row]) -> Row:
    """One row holding ``parts`` in order, kept apart by segment ids (renumbered 1..k over the
    parts' own segments); each part's first label is ``IGNORE_INDEX`` (never predicted from
    the previous part's last token; a row's first label is never predicted anyway)."""
    labels, segments, offset = [], [], 0
    for r in parts:
        lab = r.labels.copy()
        lab[:1] = IGNORE_INDEX
        labels.append(lab)
        segments.append(r.segments + offset)
        offset += int(r.segments.max(initial=0))
    return Row(
        np.concatenate([r.ids for r in parts]),
        np.concatenate(labels),
        np.concatenate(segments),
        np.concatenate([r.positions for r in parts]),
        tuple(e for r in parts for e in r.examples),
    )


@dataclasses.dataclass(frozen=True)
class StepRows:
    """The rows of one optimizer step, as collated: ``rows`` [accum * per_micro] (None: an
    all-padding row), micro-batch ``m`` being ``rows[m * per_micro : (m + 1) * per_micro]``,
    each padded to ``length``."""

    rows: list[Row | None]
    per_micro: int
    length: int


def step_rows(
    rows: Sequence[Row],
    plan: BatchPlan,
    step: int,
    *,
    accum: int,
    max_length: int,
    min_bucket: int,
    pack: bool = False,
    row_multiple: int = 1,
) -> StepRows:
    """The rows of optimizer step ``step``, padded to the length bucket of its longest row.

    ``pack``: the rows of each micro-batch are packed (best-fit decreasing,
    :func:`resofilter_jax.data.pack_sequences`) into as few rows of that length as hold them,
    the same count for every micro-batch, rounded up to ``row_multiple`` (the devices the
    rows split over): the same examples and targets per step as unpacked, less padding to
    compute (padding-free steps; the loss is the same up to summation order). Where packing
    would save no row the step stays unpacked.
    """
    picks = plan.rows_at(step)  # [batch]
    longest = max((len(rows[i]) for i in picks.tolist() if i >= 0), default=1)
    length = row_length(longest, max_length, min_bucket)
    return pick_rows(rows, picks, accum=accum, length=length, pack=pack, row_multiple=row_multiple)


def pick_rows(
    rows: Sequence[Row],
    picks: np.ndarray,
    *,
    accum: int,
    length: int,
    pack: bool = False,
    row_multiple: int = 1,
) -> StepRows:
    """The rows ``picks`` [batch] (-1: an all-padding row) as ``accum`` micro-batches of
    ``length``-token rows, packed as :func:`step_rows` describes where ``pack``."""
    micro = picks.size // accum
    unpacked = StepRows([rows[i] if i >= 0 else None for i in picks.tolist()], micro, length)
    if not pack:
        return unpacked
    groups = []  # per micro-batch: rows to merge, as lists of row indices
    for members in picks.reshape(accum, micro).tolist():
        real = [i for i in members if i >= 0]
        placed = pack_sequences([len(rows[i]) for i in real], [length]) if real else []
        groups.append([[real[j] for j in sorted(g)] for g in placed])
    most = max(1, max(len(g) for g in groups))
    per_micro = -(-most // row_multiple) * row_multiple
    if per_micro >= micro:
        return unpacked
    out: list[Row | None] = []
    for g in groups:
        out += [merge_rows([rows[i] for i in members]) for members in g]
        out += [None] * (per_micro - len(g))
    return StepRows(out, per_micro, length)


def collate_step(
    layout: StepRows, *, accum: int, pad_id: int, local: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Arrays [accum, per_micro, length] of ``layout`` (:func:`collate_rows`); ``local``: only
    these rows of every micro-batch (one process's share), [accum, local.size, length]."""
    present = [r for r in layout.rows if r is not None]
    index = iter(range(len(present)))
    picks = np.array([-1 if r is None else next(index) for r in layout.rows], np.int64)
    if local is not None:
        picks = picks.reshape(accum, -1)[:, local].reshape(-1)  # [accum * local rows]
    return collate_rows(present, picks, accum=accum, length=layout.length, pad_id=pad_id)


def batch_tokens(rows: Sequence[Row], plan: BatchPlan, step: int) -> int:
    """Real (non-padding) tokens of optimizer step ``step``'s whole batch."""
    return int(sum(len(rows[i]) for i in plan.rows_at(step).tolist() if i >= 0))

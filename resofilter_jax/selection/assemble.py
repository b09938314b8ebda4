"""Output rows of a selection: the input's own rows with score columns, or ResoFilter's
training rows, made in the order the data file is read (see :func:`row_maker`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from resofilter_jax.data import Record
from resofilter_jax.selection.rows import RowKey, ScoredData, reference_row
from resofilter_jax.selection.score_file import ScoreFile, is_sorted

__all__ = ["ScoreKeys", "row_maker"]


@dataclasses.dataclass(frozen=True)
class ScoreKeys:
    """The row keys of a score file: [n] ``index`` and [n] ``turn`` (None: no turn column)."""

    index: np.ndarray
    turn: np.ndarray | None

    @classmethod
    def read(cls, scores: ScoreFile) -> ScoreKeys:
        index, turn = scores.keys()
        return cls(
            np.asarray(index, np.int64), None if turn is None else np.asarray(turn, np.int64)
        )

    def turns(self, pos: np.ndarray) -> np.ndarray:
        """[m] turn of the rows ``pos`` (0 without a turn column)."""
        return np.zeros(len(pos), np.int64) if self.turn is None else self.turn[pos]

    def data_order(self, union: np.ndarray) -> np.ndarray:
        """``union`` (ascending positions) sorted by (index, turn, position): input order."""
        index, turn = self.index[union], self.turns(union)
        if is_sorted(index, turn):
            return union
        return union[np.lexsort((union, turn, index))]


def row_maker(
    source: ScoredData,
    fmt: str,
    scores: ScoreFile,
    keys: ScoreKeys,
    union: np.ndarray,
    attach: Sequence[str],
    records: Mapping[RowKey, Record] | None = None,
    extra: Mapping[str, Mapping[int, Any]] | None = None,
) -> tuple[Callable[[np.ndarray], Iterator[dict[str, Any]]], np.ndarray | None]:
    """``(make, stream)`` for :func:`~resofilter_jax.selection.output.write_outputs`.

    ``make(positions)`` yields the output row of each position; ``stream`` is None when any
    order works, else the input order of ``union`` (the data file is read once, in order).

    Args:
        source: Where the input rows come from.
        fmt: ``rows`` (the input row, or just its index, with the ``attach`` columns;
            ``turn`` too when the score file has it; then the ``extra`` values) or
            ``reference`` (:func:`reference_row`).
        scores: The score file.
        keys: Its row keys.
        union: Every position that will be made (ascending).
        attach: Score columns to attach (rows format; absent ones are skipped).
        records: Records already read (reference format), used when they cover ``union``.
        extra: Column name -> {position: value}, attached last (rows format).
    """
    union = np.asarray(union, np.int64)
    if fmt == "reference":
        if not source.data:
            raise ValueError("--format reference needs --data (the file that was scored)")
        if records is not None:
            have = set(records)
            idx, trn = keys.index[union].tolist(), keys.turns(union).tolist()
            if all(k in have for k in zip(idx, trn, strict=True)):
                known = records

                def from_known(order: np.ndarray) -> Iterator[dict[str, Any]]:
                    ks = zip(keys.index[order].tolist(), keys.turns(order).tolist(), strict=True)
                    return (reference_row(known[k]) for k in ks)

                return from_known, None
        stream = keys.data_order(union)

        def from_data(order: np.ndarray) -> Iterator[dict[str, Any]]:
            recs = source.iter_records(keys.index[order], keys.turns(order))
            return (reference_row(r) for r in recs)

        return from_data, stream

    def make(order: np.ndarray) -> Iterator[dict[str, Any]]:
        bases = source.iter_raw(keys.index[order]) if source.data else None
        extras = list((extra or {}).items())
        for pos, vals in scores.iter_values(attach, order):
            index = keys.index[pos].tolist()
            turns = keys.turn[pos].tolist() if keys.turn is not None else None
            names = list(vals)
            per_row = zip(*vals.values(), strict=True) if names else repeat((), len(pos))
            for j, values in enumerate(per_row):  # values: this row's attached columns
                base = next(bases) if bases is not None else None
                row = dict(base) if isinstance(base, dict) else {"index": index[j]}
                if turns is not None:
                    row["turn"] = turns[j]
                row.update(zip(names, values, strict=True))
                for name, by_pos in extras:
                    row[name] = by_pos[int(pos[j])]
                yield row

    return make, keys.data_order(union) if source.data else None

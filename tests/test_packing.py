"""Sequence packing: the packer, the packed batch arrays, and IFD parity of packed rows.

Packed rows must give every sequence exactly the losses it has alone, for every attention
variant (learned positions, rope, sliding windows, Gemma's soft-capping and local rope), so
the parity cases run the packed scorer against the batch-of-one PyTorch loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.scoring import MAX_LENGTH, alpaca_rows, assert_matches_reference, records_of, tiny
from torch_reference import ifd_reference

from resofilter_jax.data import (
    BatchPlan,
    SFTExample,
    collate_packed,
    pack_sequences,
    packed_lengths,
    segment_slots,
)
from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.scoring.runner import score_records
from resofilter_jax.training.sft_data import packed_rows, rows_fingerprint


def test_pack_sequences_places_every_sequence_once_within_its_row() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=300).tolist()
    buckets = [16, 32, 64, 128, 200]
    rows = pack_sequences(lengths, buckets)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    for row in rows:  # a row's capacity is the bucket of the sequence that opened it
        cap = min(b for b in buckets if b >= lengths[row[0]])
        assert sum(lengths[i] for i in row) <= cap
        assert lengths[row[0]] == max(lengths[i] for i in row)
    used = sum(packed_lengths(rows, lengths))
    padded = sum(min(b for b in buckets if b >= n) for n in packed_lengths(rows, lengths))
    unpacked = sum(min(b for b in buckets if b >= n) for n in lengths)
    assert used == sum(lengths)
    assert padded < 1.12 * used and unpacked > 1.2 * used  # packing halves the padding here
    assert pack_sequences(lengths, buckets) == rows  # deterministic


def test_pack_sequences_best_fit_example() -> None:
    # 10 opens a 16-row (6 free), 9 opens another (7 free); 6 fills the first exactly,
    # 5 takes the tightest remaining (7 free), 3 opens a 4-row of its own.
    rows = pack_sequences([10, 9, 6, 5, 3], [4, 8, 16])
    assert rows == [[0, 2], [1, 3], [4]]
    assert pack_sequences([10, 9, 6], [16], pack=False) == [[0], [1], [2]]
    assert pack_sequences([], [16]) == []
    with pytest.raises(ValueError, match="largest bucket"):
        pack_sequences([17], [8, 16])
    # At most 2 per row: the 3 would fit the first row's 6 free slots but opens its own row.
    assert pack_sequences([10, 3, 3, 3], [16], max_per_row=2) == [[0, 1], [2, 3]]
    assert pack_sequences([10, 3, 3], [16], max_per_row=1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_per_row"):
        pack_sequences([1], [16], max_per_row=0)


def test_training_rows_pack_with_pack_sequences() -> None:
    """SFT rows come from the same packer (one bucket: max_length), examples in index order.

    The layout and the rows fingerprint are pinned: a resumed run checks the fingerprint
    recorded in its checkpoint, so a change here would refuse to resume older runs.
    """

    def example(i: int, n: int) -> SFTExample:
        ids = np.arange(3, 3 + n, dtype=np.int32) + i
        labels = np.where(np.arange(n) < 2, IGNORE_INDEX, ids).astype(np.int32)
        return SFTExample(index=i, ids=ids, labels=labels, status="ok")

    lengths = [10, 9, 6, 5, 3, 7, 7, 2, 16]
    examples = [example(i, n) for i, n in enumerate(lengths)]
    rows = packed_rows(examples, max_length=16)
    placed = pack_sequences(lengths, [16])
    assert [r.examples for r in rows] == [tuple(sorted(r)) for r in placed]
    # Placed 6, 3, 4 (decreasing length); the row keeps them in index order.
    assert placed[3] == [6, 3, 4]
    assert [r.examples for r in rows] == [(8,), (0, 2), (1, 5), (3, 4, 6), (7,)]
    row = rows[3]
    np.testing.assert_array_equal(row.segments, [1] * 5 + [2] * 3 + [3] * 7)
    np.testing.assert_array_equal(row.positions, [*range(5), *range(3), *range(7)])
    x = IGNORE_INDEX  # each segment's first token is never a target
    np.testing.assert_array_equal(row.labels, [x, x, 8, 9, 10, x, x, 9, x, x, 11, 12, 13, 14, 15])
    assert rows_fingerprint(rows) == (
        "68c0d857998aaa7d66b2985b8281f8faca81809ff9a16bceb4dfec36713eb661"
    )
    with pytest.raises(ValueError, match=r"sequence 1 has 17 tokens.*largest bucket 16"):
        packed_rows([example(0, 3), example(1, 17)], max_length=16)


def test_collate_packed_arrays() -> None:
    seqs = [np.array([5, 6, 7]), np.array([8, 9]), np.array([10, 11, 12, 13])]
    starts = [0, 1, 2]
    rows = [[2, 1], [0]]
    plan = BatchPlan(8, np.array([0, -1, 1]))
    arrays, segments = collate_packed(plan, rows, seqs, starts, pad_id=0)
    np.testing.assert_array_equal(
        arrays["input_ids"], [[10, 11, 12, 13, 8, 9, 0, 0], [0] * 8, [5, 6, 7, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        arrays["attention_mask"], [[1, 1, 1, 1, 2, 2, 0, 0], [0] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        arrays["positions"], [[0, 1, 2, 3, 0, 1, 0, 0], [0] * 8, [0, 1, 2, 0, 0, 0, 0, 0]]
    )
    # sequence 2 scores its tokens 2, 3; sequence 1 its token 1; sequence 0 (start 0) 1, 2
    np.testing.assert_array_equal(
        arrays["loss_mask"], [[0, 0, 1, 1, 0, 1, 0, 0], [0] * 8, [0, 1, 1, 0, 0, 0, 0, 0]]
    )
    assert [(g.seq, g.row, g.offset, g.length, g.scored) for g in segments] == [
        (2, 0, 0, 4, 2),
        (1, 0, 4, 2, 1),
        (0, 2, 0, 3, 2),
    ]
    with pytest.raises(ValueError, match="batch length"):
        collate_packed(BatchPlan(5, np.array([0])), rows, seqs, starts, pad_id=0)
    assert segment_slots(arrays) == 2 and "labels" not in arrays
    # SFT labels: copied per segment, IGNORE on padding and on each segment's first token.
    labels = [np.array([-100, 6, 7]), np.array([-100, 9]), np.array([-100, -100, 12, 13])]
    arrays, _ = collate_packed(plan, rows, seqs, starts, pad_id=0, labels=labels)
    x = IGNORE_INDEX
    np.testing.assert_array_equal(
        arrays["labels"], [[x, x, 12, 13, x, 9, x, x], [x] * 8, [x, 6, 7, x, x, x, x, x]]
    )
    labels[1] = np.array([8, 9])  # a label on a segment's first token is still dropped
    again, _ = collate_packed(plan, rows, seqs, starts, pad_id=0, labels=labels)
    np.testing.assert_array_equal(again["labels"], arrays["labels"])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tiny_packing"))


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("gpt2", "none"),
        pytest.param("mistral", "bos", marks=pytest.mark.slow),
        pytest.param("gemma2", "bos", marks=pytest.mark.slow),
        pytest.param("gemma3", "bos", marks=pytest.mark.slow),
    ],
)
def test_packed_scores_match_torch_loop(name: str, layout: str, tiny_root: str) -> None:
    """Packed rows (several sequences, sliding windows crossing segment starts) = torch loop."""
    lm, hf, _ = tiny(name, layout, str(Path(tiny_root)))
    rows = alpaca_rows(30, seed=5)
    kw = dict(max_length=MAX_LENGTH, token_budget=256, min_bucket=16, progress=False)
    packed, ps = score_records(lm.model, lm.tokenizer, records_of(rows), pack=True, **kw)
    single, ss = score_records(lm.model, lm.tokenizer, records_of(rows), pack=False, **kw)
    ref = ifd_reference(lm.tokenizer, hf, rows, MAX_LENGTH)
    assert assert_matches_reference(packed, ref, rtol=1e-5) >= 15
    assert packed["status"] == single["status"]
    for k in ("loss_direct", "loss_condition", "ifd", "n_tokens_direct", "n_tokens_condition"):
        np.testing.assert_allclose(packed[k], single[k], rtol=1e-5, err_msg=k)
    assert ps.sequences == ss.sequences and ps.tokens == ss.tokens
    assert ps.padded_tokens < ss.padded_tokens

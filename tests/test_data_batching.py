"""Tests for resofilter_jax.data.batching."""

from __future__ import annotations

import numpy as np
import pytest
from support.data import build_tokenizer, random_texts

from resofilter_jax.data import (
    IGNORE_INDEX,
    BatchPlan,
    Record,
    bucket_lengths,
    collate,
    encode_ifd_pairs,
    encode_sft_examples,
    host_slice,
    num_scored,
    pad_to_multiple,
    plan_batches,
)


def test_bucket_lengths():
    assert bucket_lengths(512) == [32, 64, 128, 256, 512]
    assert bucket_lengths(1000) == [32, 64, 128, 256, 512, 1000]
    assert bucket_lengths(33) == [32, 33]
    assert bucket_lengths(32) == [32]
    assert bucket_lengths(10) == [10]
    assert bucket_lengths(2048, min_bucket=256) == [256, 512, 1024, 2048]
    with pytest.raises(ValueError):
        bucket_lengths(0)
    with pytest.raises(ValueError):
        bucket_lengths(64, min_bucket=0)


def check_plans(plans, lengths, buckets, budget, multiple, max_batch):
    edges = sorted(buckets)
    seen = np.concatenate([p.rows for p in plans]) if plans else np.zeros((0,), np.int64)
    real = seen[seen >= 0]
    assert sorted(real.tolist()) == list(range(len(lengths)))  # each item exactly once
    last_of_bucket = {}
    for k, p in enumerate(plans):
        last_of_bucket[p.length] = k
    for k, p in enumerate(plans):
        assert p.length in edges
        assert p.rows.size % multiple == 0
        full = max(multiple, min(budget // p.length, max_batch or 10**9) // multiple * multiple)
        assert p.rows.size <= full
        items = p.items
        assert items.size > 0
        if k != last_of_bucket[p.length]:
            assert p.rows.size == full and items.size == full  # only the last batch pads
        dummy = p.rows[p.rows < 0]
        assert np.all(dummy == -1) and np.all(p.rows[: items.size] >= 0)  # dummies at the end
        lens = np.asarray(lengths)[items]
        assert np.all(lens <= p.length)
        smaller = [e for e in edges if e < p.length]
        if smaller:
            assert np.all(lens > smaller[-1])  # the smallest bucket that fits
        assert np.all(np.diff(lens) >= 0)  # sorted within the batch
    # Across the batches of one bucket lengths never decrease either.
    for length in {p.length for p in plans}:
        lens = np.concatenate([np.asarray(lengths)[p.items] for p in plans if p.length == length])
        assert np.all(np.diff(lens) >= 0)


@pytest.mark.parametrize("seed", range(30))
def test_plan_batches_randomized(seed):
    rng = np.random.default_rng(seed)
    max_length = int(rng.choice([16, 100, 256, 512]))
    buckets = bucket_lengths(max_length, min_bucket=int(rng.choice([4, 8, 32])))
    n = int(rng.integers(0, 400))
    lengths = rng.integers(0, max_length + 1, size=n).tolist()
    budget = int(rng.integers(1, 8 * max_length))
    multiple = int(rng.choice([1, 2, 4, 8]))
    max_batch = None if rng.random() < 0.5 else int(rng.integers(1, 64))
    plans = plan_batches(
        lengths, buckets=buckets, token_budget=budget, batch_multiple=multiple, max_batch=max_batch
    )
    check_plans(plans, lengths, buckets, budget, multiple, max_batch)


def test_plan_batches_example():
    lengths = [5, 30, 3, 31, 64, 17, 33]
    plans = plan_batches(lengths, buckets=[16, 32, 64], token_budget=64, batch_multiple=2)
    got = [(p.length, p.rows.tolist()) for p in plans]
    assert got == [(16, [2, 0]), (32, [5, 1]), (32, [3, -1]), (64, [6, 4])]


def test_plan_batches_errors():
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        plan_batches([10, 70, 80], buckets=[32, 64], token_budget=128)
    with pytest.raises(ValueError, match=">= 0"):
        plan_batches([-1], buckets=[32], token_budget=128)
    with pytest.raises(ValueError, match="bucket"):
        plan_batches([1], buckets=[], token_budget=128)
    with pytest.raises(ValueError):
        plan_batches([1], buckets=[8], token_budget=0)
    assert plan_batches([], buckets=[8], token_budget=8) == []


def test_collate_ifd_loss_mask():
    seqs = [
        np.array([5, 6, 7, 8], np.int32),
        np.array([9], np.int32),
        np.array([1, 2, 3], np.int32),
    ]
    starts = [2, 0, 0]
    plan = BatchPlan(6, np.array([0, 1, 2, -1]))
    out = collate(plan, seqs, starts, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "loss_mask", "row"}
    np.testing.assert_array_equal(
        out["input_ids"],
        [[5, 6, 7, 8, 0, 0], [9, 0, 0, 0, 0, 0], [1, 2, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        out["attention_mask"],
        [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        out["loss_mask"],
        [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(out["row"], [0, 1, 2, -1])
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    assert out["loss_mask"].dtype == np.float32 and out["row"].dtype == np.int32


def test_collate_sft_labels():
    seqs = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
    labels = [np.array([-100, 6, 7], np.int32), np.array([-100, -100], np.int32)]
    out = collate(BatchPlan(4, np.array([1, 0])), seqs, labels, pad_id=3)
    assert set(out) == {"input_ids", "attention_mask", "labels", "row"}
    np.testing.assert_array_equal(out["input_ids"], [[8, 9, 3, 3], [5, 6, 7, 3]])
    np.testing.assert_array_equal(out["labels"], [[-100, -100, -100, -100], [-100, 6, 7, -100]])
    np.testing.assert_array_equal(out["row"], [1, 0])


def test_collate_errors():
    seqs = [np.arange(5, dtype=np.int32)]
    with pytest.raises(ValueError, match="more than the batch length"):
        collate(BatchPlan(4, np.array([0])), seqs, [0], pad_id=0)
    with pytest.raises(ValueError, match="labels shape"):
        collate(BatchPlan(8, np.array([0])), seqs, [np.zeros(3, np.int32)], pad_id=0)


@pytest.mark.parametrize("layout", ["none", "boseos"])
def test_end_to_end_masks_count_scored_tokens(layout):
    tok = build_tokenizer(layout)
    texts = random_texts(120, seed=21)
    records = [Record(i, texts[2 * i], output=texts[2 * i + 1]) for i in range(60)]
    max_length = 48
    pairs = [p for p in encode_ifd_pairs(records, tok, max_length=max_length) if p.status == "ok"]
    seqs = [p.cond_ids for p in pairs]
    starts = [p.cond_start for p in pairs]
    plans = plan_batches(
        [s.size for s in seqs],
        buckets=bucket_lengths(max_length, 8),
        token_budget=128,
        batch_multiple=4,
    )
    counted = np.zeros(len(seqs), np.int64)
    for plan in plans:
        batch = collate(plan, seqs, starts, tok.pad_token_id)
        for b, i in enumerate(batch["row"]):
            if i < 0:
                assert batch["attention_mask"][b].sum() == 0 and batch["loss_mask"][b].sum() == 0
                continue
            np.testing.assert_array_equal(batch["input_ids"][b, : seqs[i].size], seqs[i])
            counted[i] += int(batch["loss_mask"][b].sum())
    assert counted.tolist() == [num_scored(s.size, st) for s, st in zip(seqs, starts, strict=True)]

    examples = encode_sft_examples(records, tok, max_length=max_length, template="none")
    ids = [e.ids for e in examples]
    labels = [e.labels for e in examples]
    for plan in plan_batches([x.size for x in ids], buckets=[16, 32, 48], token_budget=96):
        batch = collate(plan, ids, labels, tok.pad_token_id)
        for b, i in enumerate(batch["row"]):
            got = batch["labels"][b]
            assert np.all(got[labels[i].size :] == IGNORE_INDEX)
            np.testing.assert_array_equal(got[: labels[i].size], labels[i])


def test_host_slice_even_contiguous_split():
    for n in range(0, 30):
        items = list(range(n))
        for count in range(1, 9):
            parts = [host_slice(items, i, count) for i in range(count)]
            assert [x for part in parts for x in part] == items
            sizes = [len(p) for p in parts]
            q, r = divmod(n, count)
            assert sizes == [q + 1] * r + [q] * (count - r)
    arr = np.arange(10)
    np.testing.assert_array_equal(host_slice(arr, 1, 3), [4, 5, 6])
    for bad in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            host_slice(items, *bad)


def test_pad_to_multiple():
    x = np.arange(6).reshape(3, 2)
    y = pad_to_multiple(x, 4, value=-1)
    np.testing.assert_array_equal(y, [[0, 1], [2, 3], [4, 5], [-1, -1]])
    z = pad_to_multiple(x, 3, axis=1)
    np.testing.assert_array_equal(z, [[0, 1, 0], [2, 3, 0], [4, 5, 0]])
    assert pad_to_multiple(x, 3) is x or np.array_equal(pad_to_multiple(x, 3), x)
    assert pad_to_multiple(np.zeros((0,)), 4).shape == (0,)
    with pytest.raises(ValueError):
        pad_to_multiple(x, 0)


def test_pow2_tail_bounds_the_number_of_batch_shapes():
    rng = np.random.default_rng(7)
    for multiple in (1, 2, 8):
        lengths = rng.integers(1, 300, size=1000)
        plans = plan_batches(
            lengths,
            buckets=[64, 128, 256, 300],
            token_budget=4096,
            batch_multiple=multiple,
            pow2_tail=True,
        )
        rows = np.concatenate([p.rows for p in plans])
        assert sorted(rows[rows >= 0].tolist()) == list(range(1000))  # each item exactly once
        for length in (64, 128, 256, 300):
            sizes = {p.rows.size for p in plans if p.length == length}
            full = max(sizes)
            tails = sizes - {full}
            assert all(
                s % multiple == 0 and (s // multiple) & (s // multiple - 1) == 0 for s in tails
            ), (length, sizes)
            assert all(s <= full for s in sizes)


def test_bucket_lengths_with_a_linear_step() -> None:
    assert bucket_lengths(1024, 64, 128) == [64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert bucket_lengths(1000, 64, 128) == [64, 128, 256, 384, 512, 640, 768, 896, 1000]
    assert bucket_lengths(100, 64, 128) == [64, 100]
    assert bucket_lengths(512, 32, 0) == bucket_lengths(512, 32)
    with pytest.raises(ValueError, match="step"):
        bucket_lengths(512, 32, -1)

"""The scorer's streamed input: the scan pass, hashed duplicate queries, shard reads."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from resofilter_jax.data import Record, host_slice
from resofilter_jax.data.templates import user_query
from resofilter_jax.scoring.outputs import shard_ranges
from resofilter_jax.scoring.record_stream import (
    DuplicateFinder,
    StreamedRecords,
    duplicate_of,
    scan_records,
)


def _records(n: int) -> list[Record]:
    return [Record(index=i, instruction=f"q{i}", output=f"a{i}") for i in range(n)]


def _reference_duplicates(records: list[Record]) -> list[int]:
    """The text-keyed reference: the index of the first record with the same query."""
    first: dict[str, int] = {}
    out = []
    for k, r in enumerate(records):
        if not r.ok:
            out.append(-1)
            continue
        j = first.setdefault(user_query(r), k)
        out.append(-1 if j == k else records[j].index)
    return out


def test_hashed_duplicates_match_the_text_reference_on_a_random_pool() -> None:
    rng = random.Random(0)
    words = ["a", "b", "é", "\ud800", "日本", " ", "\n", ""]
    records = []
    for i in range(3000):
        turn = rng.randrange(3)
        status = "error:bad_json" if rng.random() < 0.05 else "ok"
        records.append(
            Record(
                index=i - turn,  # ShareGPT "all" turns share their conversation's index
                instruction="".join(rng.choices(words, k=rng.randrange(3))),
                input="".join(rng.choices(words, k=rng.randrange(2))),
                turn=turn,
                status=status,
            )
        )
    got = duplicate_of(records)
    assert got.dtype == np.int64
    assert got.tolist() == _reference_duplicates(records)
    assert (got >= 0).sum() > 1000  # the pool has many duplicates


def test_an_empty_input_and_a_single_record_have_no_duplicates() -> None:
    assert duplicate_of([]).tolist() == []
    assert duplicate_of(_records(1)).tolist() == [-1]
    assert DuplicateFinder().first_positions().shape == (0,)


def test_instruction_plus_input_equals_the_same_joined_instruction() -> None:
    recs = [Record(0, "Translate", input="hello"), Record(1, "Translate\nhello")]
    assert duplicate_of(recs).tolist() == [-1, 0]


def test_scan_counts_ids_and_finds_duplicates_only_when_asked() -> None:
    recs = _records(5) + [Record(5, "q1", id="x")]
    scan = scan_records(iter(recs), find_duplicates=True)
    assert (scan.total, scan.has_id) == (6, True)
    assert scan.duplicate_of.tolist() == [-1, -1, -1, -1, -1, 1]
    plain = scan_records(iter(_records(3)), find_duplicates=False)
    assert (plain.total, plain.has_id, plain.duplicate_of) == (3, False, None)


def _counting_source(records: list[Record]) -> tuple[StreamedRecords, list[int]]:
    opened = [0]

    def open_records():
        opened[0] += 1
        return iter(records)

    return StreamedRecords(open_records, len(records)), opened


@pytest.mark.parametrize(("total", "shard_size", "count"), [(17, 5, 3), (10, 5, 2), (3, 8, 4)])
def test_every_process_reads_its_rows_of_every_shard_in_one_pass(
    total: int, shard_size: int, count: int
) -> None:
    records = _records(total)
    seen: list[int] = []
    for p in range(count):
        stream, opened = _counting_source(records)
        assert len(stream) == total
        for lo, hi in shard_ranges(total, shard_size):
            part = host_slice(range(lo, hi), p, count)  # what Hosts.rows hands the runner
            got = stream[part.start : part.stop]
            assert got == records[part.start : part.stop]
            seen += [r.index for r in got]
        assert opened[0] <= 1  # forward reads share one pass
    assert sorted(seen) == list(range(total))  # every row on exactly one process


def test_a_read_behind_the_position_reopens_and_single_items_work() -> None:
    records = _records(10)
    stream, opened = _counting_source(records)
    assert stream[6:9] == records[6:9]
    assert stream[2:4] == records[2:4]  # behind: a second pass
    assert opened[0] == 2
    assert stream[-1] == records[9] and stream[4] == records[4]
    assert stream[7:3] == []
    with pytest.raises(IndexError):
        stream[10]
    with pytest.raises(ValueError, match="contiguous"):
        stream[0:6:2]


def test_an_input_that_shrank_since_the_scan_is_an_error() -> None:
    stream = StreamedRecords(lambda: iter(_records(4)), 6)
    with pytest.raises(RuntimeError, match="changed during the run"):
        stream[3:6]


def test_reads_from_a_prefetch_thread_and_the_loop_do_not_interleave() -> None:
    records = _records(4000)
    stream, _ = _counting_source(records)
    got: dict[int, list[Record]] = {}

    def read(k: int) -> None:
        got[k] = stream[k * 1000 : (k + 1) * 1000]

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert got[k] == records[k * 1000 : (k + 1) * 1000]

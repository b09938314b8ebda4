"""Streaming a process's own rows of a multi-process IFD job."""

from __future__ import annotations

import pytest

from resofilter_jax.data import Record, host_slice
from resofilter_jax.scoring.outputs import shard_ranges
from resofilter_jax.scoring.process_records import stream_process_records


def _records(n: int) -> list[Record]:
    return [Record(index=i, instruction=f"q{i}", output=f"a{i}", id=None) for i in range(n)]


@pytest.mark.parametrize(("total", "shard_size", "count"), [(17, 5, 3), (10, 5, 2), (3, 8, 4)])
def test_each_process_holds_exactly_its_rows_of_every_shard(
    total: int, shard_size: int, count: int
) -> None:
    records = _records(total)
    seen: list[int] = []
    for p in range(count):
        mine = stream_process_records(
            iter(records), shard_size=shard_size, process_index=p, process_count=count
        )
        assert len(mine) == total and mine.has_id is False
        for lo, hi in shard_ranges(total, shard_size):
            part = host_slice(range(lo, hi), p, count)  # what Hosts.rows hands the runner
            assert mine[part.start : part.stop] == records[part.start : part.stop]
            others = [i for i in range(lo, hi) if i not in part]
            for i in others:
                with pytest.raises(IndexError, match="another process"):
                    mine[i]
        seen += [r.index for r in mine.own_records()]
    assert sorted(seen) == list(range(total))  # every row on exactly one process


def test_has_id_sees_rows_of_other_processes() -> None:
    records = _records(6)
    records[5] = Record(index=5, instruction="q", output="a", id="x")
    mine = stream_process_records(iter(records), shard_size=6, process_index=0, process_count=2)
    assert mine.has_id and 5 not in [r.index for r in mine.own_records()]
    with pytest.raises(TypeError):
        list(mine)

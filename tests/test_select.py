"""Superfiltering selection: policy, dataset-size-relative k, output in the input's format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resofilter_jax.select import SelectConfig, run, superfiltering_select


def test_policy_threshold_order_ties_and_k() -> None:
    ifd = [0.5, None, 0.9, 1.0, 0.9, float("nan"), 0.2, 1.5, 0.95, 0.7]
    # 10 rows -> k = floor(0.3 * 10) = 3 of the eligible (< 1.0) ones, by IFD descending,
    # the tie at 0.9 broken by the lower position.
    assert superfiltering_select(ifd, rate=0.3).tolist() == [8, 2, 4]
    assert superfiltering_select(ifd, rate=0.3, threshold=1.01).tolist() == [3, 8, 2]
    assert superfiltering_select(ifd, rate=0.0, count=5).tolist() == [8, 2, 4, 9, 0]
    assert superfiltering_select(ifd, rate=1.0).tolist() == [8, 2, 4, 9, 0, 6]  # all eligible


def test_k_is_relative_to_this_dataset_not_52002() -> None:
    rng = np.random.default_rng(0)
    ifd = rng.uniform(0.1, 0.99, size=1234)
    assert len(superfiltering_select(ifd, rate=0.05)) == math.floor(0.05 * 1234)


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    data = [
        {"instruction": f"task {i}", "input": "", "output": f"answer {i}", "extra": i}
        for i in range(6)
    ]
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(data))
    ifd = [0.8, 0.3, None, 0.9, 1.2, 0.85]
    table = pa.table(
        {
            "index": list(range(6)),
            "status": ["ok", "ok", "empty_output", "ok", "ok", "ok"],
            "ifd": [np.nan if v is None else v for v in ifd],
            "ppl_condition": [1.0] * 6,
        }
    )
    scores = tmp_path / "scores.parquet"
    pq.write_table(table, scores)
    return data_path, scores


def test_run_writes_input_rows_with_scores(tmp_path: Path) -> None:
    data, scores = _write_inputs(tmp_path)
    summary = run(
        SelectConfig(
            scores=str(scores), data=str(data), rate=0.5, output=str(tmp_path / "sel.json")
        )
    )
    assert summary == {
        "rows": 6,
        "eligible": 4,
        "selected": 3,
        "output": str(tmp_path / "sel.json"),
    }
    rows = json.loads((tmp_path / "sel.json").read_text())
    assert [r["extra"] for r in rows] == [3, 5, 0]  # IFD 0.9, 0.85, 0.8
    assert rows[0]["instruction"] == "task 3" and rows[0]["ifd"] == pytest.approx(0.9)

    run(
        SelectConfig(
            scores=str(scores),
            data=str(data),
            rate=0.5,
            order="original",
            output=str(tmp_path / "sel.jsonl"),
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert [r["extra"] for r in lines] == [0, 3, 5]


def test_wrong_data_file_is_refused(tmp_path: Path) -> None:
    _, scores = _write_inputs(tmp_path)
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    with pytest.raises(ValueError, match="not in"):
        run(
            SelectConfig(
                scores=str(scores), data=str(short), rate=0.5, output=str(tmp_path / "o.jsonl")
            )
        )

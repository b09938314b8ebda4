"""Selection test helpers: scored inputs written for the select command and its readers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
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


# Scored (ok) rows 0 1 2 4 5 7 9 (N = 7); ranking by score descending, ties lower index first:
# 1 2 9 (5.0) 5 (4.0) 0 (3.0) 7 (2.0) 4 (1.0). Row 3 is a duplicate of row 1 and row 8 has no
# response tokens: neither is a candidate, even with a number in its score column.
RESO_STATUS = [
    "ok",
    "ok",
    "ok",
    "duplicate_of:1",
    "ok",
    "ok",
    "error:bad_json",
    "ok",
    "no_response_tokens",
    "ok",
]


RESO_SCORE = [3.0, 5.0, 5.0, 0.1, 1.0, 4.0, None, 2.0, 0.2, 5.0]


FEATURE = "reso/model.layers.0.mlp.up_proj.weight/mean_abs"


def reso_inputs(tmp_path: Path, fmt: str = "parquet") -> tuple[Path, Path]:
    """An Alpaca JSONL file (row 3 repeats row 1's query, row 6 is bad JSON) and its scores."""
    lines = []
    for i in range(10):
        row = {
            "instruction": f"task {i}",
            "input": f"ctx {i}" if i % 2 else "",
            "output": f"ans {i}",
        }
        lines.append(json.dumps(dict(row, extra=i)))
    lines[3] = json.dumps(
        {"instruction": "task 1", "input": "ctx 1", "output": "other", "extra": 3}
    )
    lines[6] = '{"instruction": "cut'
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    scores = tmp_path / f"scores.{fmt}"
    score = [np.nan if v is None else v for v in RESO_SCORE]
    cols = {
        "index": list(range(10)),
        "status": RESO_STATUS,
        "score": score,
        "loss": [0.5 + i for i in range(10)],
        "ppl": [1.5 + i for i in range(10)],
        "n_tokens": [10 + i for i in range(10)],
        FEATURE: [x * 2 for x in score],
    }
    if fmt == "parquet":
        pq.write_table(pa.table(cols), scores)
    else:
        rows = [{k: v[i] for k, v in cols.items()} for i in range(10)]
        rows = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in rows
        ]
        scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "method": "resonance",
        "data": {"format": "alpaca", "fields": {}, "sharegpt_turns": "first"},
    }
    (tmp_path / "run_config.json").write_text(json.dumps(cfg))  # the scorer's fingerprint
    return data, scores


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]

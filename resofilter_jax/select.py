"""Select rows from a score file and write them in the input's own format, scores attached.

    python -m resofilter_jax.select --scores outputs/ifd/scores.parquet \
        --data data.json --rate 0.1 --output selected.json

Superfiltering policy (DESIGN 3.1): keep rows whose IFD is a number strictly below
`--threshold` (1.0), order them by IFD descending (ties: lower index first) and keep the first
k = floor(rate x rows in THIS score file) (the reference hard-codes Alpaca's 52002), or
`--count` rows. `--order original` restores input order. Rows with a non-ok status are never
selected but still counted in the dataset size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from absl import app, flags

from resofilter_jax.data import iter_raw_rows

SCORE_KEYS = (
    "loss_direct",
    "loss_condition",
    "ppl_direct",
    "ppl_condition",
    "ifd",
    "n_tokens_direct",
    "n_tokens_condition",
)


@dataclasses.dataclass
class SelectConfig:
    """What to select and where to write it."""

    scores: str
    output: str
    data: str = ""  # the scored input; "" = write only the score rows
    rate: float = 0.1
    count: int = 0  # an absolute number of rows; overrides rate when > 0
    threshold: float = 1.0
    order: str = "score"  # score | original
    allow_truncated: bool = True
    reader: str = "auto"


def read_scores(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Columns of a `scores.parquet` or `scores.jsonl` file as numpy arrays."""
    p = Path(path)
    if p.suffix == ".parquet":
        table = pq.read_table(p)
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    keys = list(rows[0]) if rows else []
    return {k: np.asarray([r.get(k) for r in rows], dtype=object) for k in keys}


def superfiltering_select(
    ifd: np.ndarray, *, rate: float, count: int = 0, threshold: float = 1.0
) -> np.ndarray:
    """Positions of the selected rows, ordered by IFD descending (ties: lower position first).

    Args:
        ifd: [n] IFD per row (NaN / None for rows without a score).
        rate: fraction of the n rows to keep (k = floor(rate * n)), unless `count` > 0.
        threshold: only IFD strictly below it is eligible.
    """
    values = _as_float(ifd)  # [n]
    k = count if count > 0 else math.floor(rate * len(values))
    eligible = np.nonzero(np.isfinite(values) & (values < threshold))[0]
    order = eligible[np.lexsort((eligible, -values[eligible]))]  # IFD desc, then position
    return order[:k]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(config: SelectConfig) -> dict[str, Any]:
    """Selects rows and writes them (`.json` -> JSON array, else JSONL); returns a summary."""
    cols = read_scores(config.scores)
    n = len(cols["index"])
    if "ifd" not in cols:
        raise ValueError(f"{config.scores} has no `ifd` column (is it an IFD score file?)")
    picked = superfiltering_select(
        cols["ifd"], rate=config.rate, count=config.count, threshold=config.threshold
    )
    if config.order == "original":
        picked = np.sort(picked)
    elif config.order != "score":
        raise ValueError(f"order must be 'score' or 'original', got {config.order!r}")
    wanted = {int(cols["index"][i]) for i in picked}
    raw: dict[int, Any] = {}
    if config.data:
        for number, row in iter_raw_rows(
            config.data,
            reader=config.reader,
            on_error="status",
            allow_truncated=config.allow_truncated,
        ):
            if number in wanted:
                raw[number] = row
        lost = wanted - set(raw)
        if lost:
            raise ValueError(
                f"{len(lost)} selected rows (e.g. index {min(lost)}) are not in {config.data}: "
                "is it the file that was scored?"
            )
    out_rows = []
    for i in picked:
        scores = {k: _jsonable(cols[k][i]) for k in SCORE_KEYS if k in cols}
        base = raw.get(int(cols["index"][i]))
        row = dict(base) if isinstance(base, dict) else {"index": int(cols["index"][i])}
        if "turn" in cols:
            row["turn"] = int(cols["turn"][i])
        row.update(scores)
        out_rows.append(row)
    out = Path(config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if out.suffix == ".json":
            json.dump(out_rows, f, ensure_ascii=False, indent=1)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
    os.replace(tmp, out)
    ifd = _as_float(cols["ifd"])
    eligible = int(np.sum(np.isfinite(ifd) & (ifd < config.threshold)))
    return {"rows": n, "eligible": eligible, "selected": len(out_rows), "output": str(out)}


def _as_float(values: Sequence[Any]) -> np.ndarray:
    """[n] float64 with None -> NaN."""
    return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)


_SCORES = flags.DEFINE_string("scores", None, "scores.parquet or scores.jsonl of a scoring run")
_OUTPUT = flags.DEFINE_string("output", None, "output file (.json array or .jsonl)")
_DATA = flags.DEFINE_string("data", "", "the scored input file; rows are copied from it")
_RATE = flags.DEFINE_float("rate", 0.1, "fraction of this dataset's rows to keep")
_COUNT = flags.DEFINE_integer("count", 0, "absolute number of rows to keep (overrides --rate)")
_THRESHOLD = flags.DEFINE_float("threshold", 1.0, "keep IFD strictly below this")
_ORDER = flags.DEFINE_enum("order", "score", ["score", "original"], "output order")


def main(argv: list[str]) -> None:
    del argv
    summary = run(
        SelectConfig(
            scores=_SCORES.value,
            output=_OUTPUT.value,
            data=_DATA.value,
            rate=_RATE.value,
            count=_COUNT.value,
            threshold=_THRESHOLD.value,
            order=_ORDER.value,
        )
    )
    print(json.dumps(summary, indent=2), file=sys.stdout)


if __name__ == "__main__":
    flags.mark_flags_as_required(["scores", "output"])
    app.run(main)

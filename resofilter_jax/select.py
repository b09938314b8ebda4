"""Select rows from a score file and write them, scores attached or in ResoFilter's training format.

    python -m resofilter_jax.select --scores outputs/ifd/scores.parquet \
        --data data.json --rate 0.1 --output selected.json
    python -m resofilter_jax.select --scores outputs/reso/scores.parquet \
        --data gsm8k.jsonl --drop_rates 0.25,0.5,0.75 --output sel.jsonl  # sel.p75/p50/p25.jsonl

``--policy`` (default ``auto``: an ``ifd`` column means superfiltering, a ``score`` column
resofilter; a file with both or neither is refused).

Superfiltering policy (DESIGN 3.1): keep rows whose IFD is a number strictly below
`--threshold` (1.0), order them by IFD descending (ties: lower index first) and keep the first
k = floor(rate x rows in THIS score file) (the reference hard-codes Alpaca's 52002), or
`--count` rows. `--order original` restores input order. Rows with a non-ok status are never
selected but still counted in the dataset size.

ResoFilter policy (DESIGN 3.2, the reference's ``reso_filter.py``):

* The candidates are the *scored* rows: ``status == "ok"`` with a finite ``score``; N is their
  number. The reference removes exact-duplicate queries before scoring and takes N as the
  size of that de-duplicated set; our scorer keeps those rows as ``duplicate_of:<i>`` rows
  without a score, so they are not counted, and N is the same. Rows that could not be
  scored (``error:...``, ``no_response_tokens``, an ok row with a NaN score) are never
  selected and not counted either (the reference has no such rows: a bad row crashes it,
  and a row without response tokens would carry a NaN score into its sort).
* Rank the candidates by ``score`` descending, ties by lower index first (ShareGPT "all"
  mode: then lower turn), and drop the first int(N x p) of them, p = ``--drop_rate``
  (the reference's ``int(len * percent)``, a truncated float product). ``--keep low`` (the
  default, the paper's choice) thus keeps the low-change "resonant" rows; ``--keep high``
  ranks ascending instead (ties still lower index first) and keeps the high-change rows.
* The kept rows are written in input order (``--order score`` keeps the ranking order).
* ``--drop_rates 0.25,0.5,0.75`` writes one file per rate, named by the percent kept as the
  paper's p75/p50/p25: ``sel.jsonl`` -> ``sel.p75.jsonl``, ``sel.p50.jsonl``,
  ``sel.p25.jsonl``. One ranking serves all rates, so with either ``--keep`` a smaller subset
  is contained in every larger one.

Output rows (``--format rows``, the default): the input's own rows with the score columns
attached (IFD: losses, ppls, ifd, token counts; resonance: ``score, loss, ppl, n_tokens``,
plus every ``reso/<param>/<feature>`` column with ``--with_features``), ``turn`` added in
ShareGPT "all" mode; without ``--data`` just the index and the scores.
``--format reference``: the reference's training rows ``{"instruction": "", "input": <query>,
"output": <response>, "idx": <input row number>}``, where query/response come from the
records as the scorer built them (format, fields and ShareGPT mode are read from the
scorer's ``run_config.json`` next to the score file; ``--data_format`` and
``--sharegpt_turns`` override them).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from resofilter_jax.selection_io import (
    as_float,
    jsonable,
    kept_label,
    rate_output_path,
    read_raw_rows,
    read_records,
    read_scores,
    reference_row,
    row_keys,
    scored_data_settings,
    write_rows,
)

POLICIES = ("superfiltering", "resofilter")
FORMATS = ("rows", "reference")
KEEPS = ("low", "high")
SCORE_KEYS = (
    "loss_direct",
    "loss_condition",
    "ppl_direct",
    "ppl_condition",
    "ifd",
    "n_tokens_direct",
    "n_tokens_condition",
)
RESO_KEYS = ("score", "loss", "ppl", "n_tokens")
FEATURE_PREFIX = "reso/"
DUPLICATE = "duplicate_of:"

__all__ = [
    "SelectConfig",
    "detect_policy",
    "read_scores",
    "resofilter_select",
    "run",
    "superfiltering_select",
]


@dataclasses.dataclass
class SelectConfig:
    """What to select and where to write it."""

    scores: str
    output: str
    data: str = ""  # the scored input; "" = write only the score rows
    policy: str = "auto"  # auto | superfiltering | resofilter
    # Superfiltering.
    rate: float = 0.1
    count: int = 0  # an absolute number of rows; overrides rate when > 0
    threshold: float = 1.0
    # ResoFilter: drop the first int(N x p) of the ranking; several rates -> one file each.
    drop_rate: float = 0.5
    drop_rates: tuple[float, ...] = ()  # non-empty: overrides drop_rate, files sel.pXX.jsonl
    keep: str = "low"  # low: drop the largest scores | high: drop the smallest
    # Output.
    order: str = "auto"  # auto (superfiltering: score, resofilter: original) | score | original
    format: str = "rows"  # rows (input rows + scores) | reference (ResoFilter training rows)
    with_features: bool = False  # rows format: also attach every reso/<param>/<feature> column
    # Reading --data (format / sharegpt_turns: "" = as in the scorer's run_config.json).
    data_format: str = ""
    sharegpt_turns: str = ""
    allow_truncated: bool = True
    reader: str = "auto"


def detect_policy(columns: Sequence[str]) -> str:
    """``superfiltering`` for a score file with an ``ifd`` column, ``resofilter`` for ``score``.

    Raises:
        ValueError: If the file has both columns or neither.
    """
    has_ifd, has_score = "ifd" in columns, "score" in columns
    if has_ifd and has_score:
        raise ValueError("the score file has both `ifd` and `score` columns: pass --policy")
    if not (has_ifd or has_score):
        raise ValueError(
            "the score file has neither an `ifd` (Superfiltering) nor a `score` (ResoFilter) "
            f"column; its columns: {sorted(columns)[:12]}"
        )
    return "superfiltering" if has_ifd else "resofilter"


def superfiltering_select(
    ifd: np.ndarray, *, rate: float, count: int = 0, threshold: float = 1.0
) -> np.ndarray:
    """Positions of the selected rows, ordered by IFD descending (ties: lower position first).

    Args:
        ifd: [n] IFD per row (NaN / None for rows without a score).
        rate: fraction of the n rows to keep (k = floor(rate * n)), unless `count` > 0.
        count: an absolute number of rows to keep when > 0.
        threshold: only IFD strictly below it is eligible.
    """
    values = as_float(ifd)  # [n]
    k = count if count > 0 else math.floor(rate * len(values))
    eligible = np.nonzero(np.isfinite(values) & (values < threshold))[0]
    order = eligible[np.lexsort((eligible, -values[eligible]))]  # IFD desc, then position
    return order[:k]


def _check_drop_rate(p: float) -> None:
    if not (isinstance(p, int | float) and 0.0 <= p < 1.0):
        raise ValueError(f"drop rates must be in [0, 1), got {p!r}")


def resofilter_select(
    score: Sequence[Any],
    drop_rate: float,
    *,
    keep: str = "low",
    rank: Sequence[int] | None = None,
    order: str = "original",
) -> np.ndarray:
    """Positions ResoFilter keeps: all scored rows but the first int(N x drop_rate) of the ranking.

    Args:
        score: [n] score per row; NaN / None = not scored (not a candidate, not in N).
        drop_rate: p in [0, 1).
        keep: ``low``: rank by score descending (drop the largest changes); ``high``: ascending.
        rank: [n] input order of the rows, for ties (lower first) and the output order
            (default: the positions).
        order: ``original``: kept positions in input order; ``score``: in ranking order.
    """
    _check_drop_rate(drop_rate)
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    values = as_float(score)  # [n]
    rank = np.arange(len(values)) if rank is None else np.asarray(rank, np.int64)
    scored = np.nonzero(np.isfinite(values))[0]  # [N]
    sign = -1.0 if keep == "low" else 1.0
    ranking = scored[np.lexsort((rank[scored], sign * values[scored]))]
    kept = ranking[int(len(scored) * drop_rate) :]
    if order == "score":
        return kept
    if order != "original":
        raise ValueError(f"order must be 'score' or 'original', got {order!r}")
    return kept[np.argsort(rank[kept], kind="stable")]


def _row_maker(
    config: SelectConfig, cols: Mapping[str, np.ndarray], union: np.ndarray, keys: Sequence[str]
) -> Callable[[int], dict[str, Any]]:
    """``make(position) -> output row``, with the data of the ``union`` positions read once."""
    key = row_keys(cols)
    if config.format == "reference":
        if not config.data:
            raise ValueError("--format reference needs --data (the file that was scored)")
        scored = scored_data_settings(config.scores)
        records = read_records(
            config.data,
            {key[i] for i in union},
            fmt=config.data_format or scored.get("format", "auto"),
            fields=scored.get("fields"),
            sharegpt_turns=config.sharegpt_turns or scored.get("sharegpt_turns", "first"),
            reader=config.reader,
            allow_truncated=config.allow_truncated,
        )
        return lambda i: reference_row(records[key[i]])
    raw: dict[int, Any] = {}
    if config.data:
        raw = read_raw_rows(
            config.data,
            {key[i][0] for i in union},
            reader=config.reader,
            allow_truncated=config.allow_truncated,
        )

    def make(i: int) -> dict[str, Any]:
        base = raw.get(key[i][0])
        row = dict(base) if isinstance(base, dict) else {"index": key[i][0]}
        if "turn" in cols:
            row["turn"] = key[i][1]
        row.update({k: jsonable(cols[k][i]) for k in keys if k in cols})
        return row

    return make


def _order(config: SelectConfig, policy: str) -> str:
    if config.order == "auto":
        return "score" if policy == "superfiltering" else "original"
    if config.order not in ("score", "original"):
        raise ValueError(f"order must be 'auto', 'score' or 'original', got {config.order!r}")
    return config.order


def _superfiltering(config: SelectConfig, cols: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The IFD ranking, then (optionally, elsewhere) a diversity pass, then the rows."""
    picked = superfiltering_select(
        cols["ifd"], rate=config.rate, count=config.count, threshold=config.threshold
    )
    # A diversity pass (Superfiltering.D) plugs in here: it re-picks among the IFD-ranked
    # candidates `picked` before the order is settled and the rows are written.
    if _order(config, "superfiltering") == "original":
        picked = np.sort(picked)
    make = _row_maker(config, cols, picked, SCORE_KEYS)
    out = write_rows(config.output, [make(i) for i in picked])
    ifd = as_float(cols["ifd"])
    eligible = int(np.sum(np.isfinite(ifd) & (ifd < config.threshold)))
    return {"rows": len(ifd), "eligible": eligible, "selected": len(picked), "output": str(out)}


def _status_counts(status: Sequence[Any]) -> dict[str, int]:
    """Rows per status, all ``duplicate_of:<i>`` counted as ``duplicate_of``."""
    counts = collections.Counter(
        DUPLICATE[:-1] if str(s).startswith(DUPLICATE) else str(s) for s in status
    )
    return dict(sorted(counts.items()))


def _resofilter(config: SelectConfig, cols: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Drops the first int(N x p) of the resonance ranking for each rate; one file per rate."""
    if config.keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {config.keep!r}")
    if config.with_features and config.format != "rows":
        raise ValueError("--with_features applies to --format rows only")
    rates = tuple(config.drop_rates) or (config.drop_rate,)
    for p in rates:
        _check_drop_rate(p)
    labels = [kept_label(p) for p in rates]
    if len(set(labels)) != len(labels):
        raise ValueError(f"drop rates must differ, got {list(rates)} (files {labels})")
    n = len(cols["index"])
    status = cols["status"] if "status" in cols else np.full(n, "ok", dtype=object)
    ok = np.asarray([s == "ok" for s in status], bool)  # [n]
    score = np.where(ok, as_float(cols["score"]), np.nan)  # [n] NaN = not a candidate
    scored = int(np.isfinite(score).sum())  # N
    if scored < int(ok.sum()):
        logging.warning("%d ok rows have no finite score: not selected", int(ok.sum()) - scored)
    turn = cols["turn"] if "turn" in cols else np.zeros(n, np.int64)
    by_input = np.lexsort((np.asarray(turn, np.int64), np.asarray(cols["index"], np.int64)))
    rank = np.empty(n, np.int64)
    rank[by_input] = np.arange(n)  # [n] position of each row in input order
    order = _order(config, "resofilter")
    kept = [resofilter_select(score, p, keep=config.keep, rank=rank, order=order) for p in rates]
    keys = list(RESO_KEYS)
    if config.with_features:
        keys += [c for c in cols if c.startswith(FEATURE_PREFIX)]
    make = _row_maker(config, cols, np.unique(np.concatenate(kept)), keys)
    outputs = []
    for p, label, picked in zip(rates, labels, kept, strict=True):
        path = rate_output_path(config.output, p) if config.drop_rates else config.output
        out = write_rows(path, [make(i) for i in picked])
        outputs.append(
            {
                "drop_rate": p,
                "kept": label,
                "dropped": scored - len(picked),
                "selected": len(picked),
                "output": str(out),
            }
        )
    return {
        "policy": "resofilter",
        "keep": config.keep,
        "rows": n,
        "statuses": _status_counts(status),
        "scored": scored,
        "outputs": outputs,
    }


def run(config: SelectConfig) -> dict[str, Any]:
    """Selects rows and writes them (``.json`` -> JSON array, else JSONL); returns a summary.

    Raises:
        ValueError: For a score file that does not fit the policy, a bad option, or a
            ``--data`` file that does not hold the selected rows.
    """
    if config.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {config.format!r}")
    cols = read_scores(config.scores)
    if "index" not in cols:
        raise ValueError(f"{config.scores} has no `index` column (is it a score file?)")
    policy = detect_policy(list(cols)) if config.policy == "auto" else config.policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be 'auto' or one of {POLICIES}, got {config.policy!r}")
    if policy == "superfiltering":
        if "ifd" not in cols:
            raise ValueError(f"{config.scores} has no `ifd` column (is it an IFD score file?)")
        return _superfiltering(config, cols)
    if "score" not in cols:
        raise ValueError(f"{config.scores} has no `score` column (is it a resonance score file?)")
    return _resofilter(config, cols)


_SCORES = flags.DEFINE_string("scores", None, "scores.parquet or scores.jsonl of a scoring run")
_OUTPUT = flags.DEFINE_string("output", None, "output file (.json array or .jsonl)")
_DATA = flags.DEFINE_string("data", "", "the scored input file; rows are copied from it")
_POLICY = flags.DEFINE_enum(
    "policy", "auto", ["auto", *POLICIES], "auto: from the score file's ifd / score column"
)
_RATE = flags.DEFINE_float("rate", 0.1, "superfiltering: fraction of this dataset's rows to keep")
_COUNT = flags.DEFINE_integer("count", 0, "superfiltering: number of rows (overrides --rate)")
_THRESHOLD = flags.DEFINE_float("threshold", 1.0, "superfiltering: keep IFD strictly below this")
_DROP_RATE = flags.DEFINE_float("drop_rate", 0.5, "resofilter: drop int(N x p) of the ranking")
_DROP_RATES = flags.DEFINE_list(
    "drop_rates", [], "resofilter: several rates, one file each (OUTPUT stem + .pXX, XX = % kept)"
)
_KEEP = flags.DEFINE_enum("keep", "low", list(KEEPS), "resofilter: keep low- or high-score rows")
_ORDER = flags.DEFINE_enum(
    "order", "auto", ["auto", "score", "original"], "output order (auto: per policy)"
)
_FORMAT = flags.DEFINE_enum("format", "rows", list(FORMATS), "input rows + scores | reference")
_WITH_FEATURES = flags.DEFINE_bool("with_features", False, "attach the reso/... feature columns")
_DATA_FORMAT = flags.DEFINE_string("data_format", "", "data format (default: the scorer's)")
_SHAREGPT_TURNS = flags.DEFINE_string("sharegpt_turns", "", "first | all (default: the scorer's)")


def _floats(values: Sequence[str]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError as e:
        raise app.UsageError(f"--drop_rates must be comma-separated numbers: {e}") from e


def main(argv: list[str]) -> None:
    """absl entry point: selects with the flags and prints the summary."""
    del argv
    summary = run(
        SelectConfig(
            scores=_SCORES.value,
            output=_OUTPUT.value,
            data=_DATA.value,
            policy=_POLICY.value,
            rate=_RATE.value,
            count=_COUNT.value,
            threshold=_THRESHOLD.value,
            drop_rate=_DROP_RATE.value,
            drop_rates=_floats(_DROP_RATES.value),
            keep=_KEEP.value,
            order=_ORDER.value,
            format=_FORMAT.value,
            with_features=_WITH_FEATURES.value,
            data_format=_DATA_FORMAT.value,
            sharegpt_turns=_SHAREGPT_TURNS.value,
        )
    )
    print(json.dumps(summary, indent=2), file=sys.stdout)


if __name__ == "__main__":
    flags.mark_flags_as_required(["scores", "output"])
    app.run(main)

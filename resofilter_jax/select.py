"""Select rows from a score file and write them, scores attached or in ResoFilter's training format.

    python -m resofilter_jax.select --scores outputs/ifd/scores.parquet \
        --data data.json --rate 0.1 --output selected.json
    python -m resofilter_jax.select --scores outputs/ifd/scores.parquet \
        --data data.json --ifd_num 10400 --fla_num 1040 --output selected_d.json
    python -m resofilter_jax.select --scores outputs/reso/scores.parquet \
        --data gsm8k.jsonl --drop_rates 0.25,0.5,0.75 --output sel.jsonl  # sel.p75/p50/p25.jsonl

``--policy`` (default ``auto``: an ``ifd`` column means superfiltering, a ``score`` column
resofilter; a file with both or neither is refused).

Superfiltering policy (DESIGN 3.1): keep rows whose IFD is a number strictly below
`--threshold` (1.0), order them by IFD descending (ties: lower index first) and keep the first
k = floor(rate x rows in THIS score file) (the reference hard-codes Alpaca's 52002), or
`--count` rows. `--order original` restores input order. Rows with a non-ok status are never
selected but still counted in the dataset size.

Superfiltering.D (``--fla_num N``, :mod:`resofilter_jax.diversity`): the IFD stage keeps the
top ``--ifd_num M`` rows of that order (0: the rows ``--rate`` / ``--count`` keep; with M set,
``--rate`` is not used), their texts (``--embed_type``, built from the records as the scorer
built them) are embedded with ``--model`` (default: the scorer's model from
``run_config.json``, else the embedded SmolLM2; mean-pooled final hidden states where the
reference uses all-MiniLM-L6-v2), and facility location (``--fla_metric``, ``--fla_ties``)
picks N of them greedily. The rows come out in greedy order, as the reference writes them
(``--order score``: IFD order, ``original``: input order), with a ``fla_rank`` column (the
0-based greedy position; rows format only).

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
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from resofilter_jax.data import Record
from resofilter_jax.selection_io import (
    RowKey,
    ScoredData,
    as_float,
    embedding_model,
    kept_label,
    rate_output_path,
    read_scores,
    row_keys,
    row_maker,
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
FLA_METRICS = ("euclidean", "cosine")  # resofilter_jax.diversity.METRICS
FLA_TIES = ("low", "high")
EMBED_TYPES = ("whole", "instruction", "response")  # resofilter_jax.embeddings.EMB_TYPES

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
    # Superfiltering.D: facility location over embeddings of the IFD stage's rows.
    fla_num: int = 0  # rows picked by facility location; 0 = off
    ifd_num: int = 0  # rows of the IFD stage; 0 = the rows rate / count keep
    fla_metric: str = "euclidean"  # euclidean (the reference's) | cosine
    fla_ties: str = "low"  # equal gains: lowest | highest IFD-stage position
    embed_type: str = "whole"  # whole | instruction | response
    embed_input_line: bool = True  # "{instruction}\n{input}\n" even for an empty input
    model: str = ""  # "" = the scorer's model (run_config.json), else the embedded SmolLM2
    dtype: str = ""  # "" = the scorer's dtype, else float32
    max_length: int = 0  # embedding truncation; 0 = the scorer's max_length, else 1024
    token_budget: int = 16384  # padded tokens per embedding batch
    num_devices: int = 0  # 0 = all local devices
    progress: bool = False
    # ResoFilter: drop the first int(N x p) of the ranking; several rates -> one file each.
    drop_rate: float = 0.5
    drop_rates: tuple[float, ...] = ()  # non-empty: overrides drop_rate, files sel.pXX.jsonl
    keep: str = "low"  # low: drop the largest scores | high: drop the smallest
    # Output.
    order: str = "auto"  # auto (IFD: score, IFD + FL: greedy, reso: original) | score | original
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


def _source(config: SelectConfig) -> ScoredData:
    """The ``--data`` file as the scorer read it."""
    return ScoredData(
        config.scores,
        config.data,
        data_format=config.data_format,
        sharegpt_turns=config.sharegpt_turns,
        reader=config.reader,
        allow_truncated=config.allow_truncated,
    )


def _order(config: SelectConfig, policy: str) -> str:
    """``score`` or ``original`` (``auto`` with Superfiltering.D: greedy order, as ``score``)."""
    if config.order == "auto":
        return "score" if policy == "superfiltering" else "original"
    if config.order not in ("score", "original"):
        raise ValueError(f"order must be 'auto', 'score' or 'original', got {config.order!r}")
    return config.order


def _check_diversity(config: SelectConfig, policy: str) -> None:
    """Refuses Superfiltering.D options that do not fit together (before any heavy work)."""
    if policy != "superfiltering":
        if config.fla_num or config.ifd_num:
            raise ValueError("--fla_num / --ifd_num apply to the superfiltering policy only")
        return
    if config.fla_num < 0 or config.ifd_num < 0:
        raise ValueError(
            f"--fla_num and --ifd_num must be >= 0, got {config.fla_num}, {config.ifd_num}"
        )
    if config.fla_num == 0:
        if config.ifd_num:
            raise ValueError("--ifd_num is the IFD stage of Superfiltering.D: set --fla_num too")
        return
    if config.ifd_num and config.fla_num > config.ifd_num:
        raise ValueError(f"--fla_num={config.fla_num} is more than --ifd_num={config.ifd_num}")
    if config.ifd_num and config.count:
        raise ValueError("--ifd_num and --count both size the IFD stage: pass one")
    for name, value, choices in (
        ("fla_metric", config.fla_metric, FLA_METRICS),
        ("fla_ties", config.fla_ties, FLA_TIES),
        ("embed_type", config.embed_type, EMBED_TYPES),
    ):
        if value not in choices:
            raise ValueError(f"--{name} must be one of {choices}, got {value!r}")
    if config.max_length < 0 or config.token_budget <= 0 or config.num_devices < 0:
        raise ValueError("--max_length / --num_devices must be >= 0, --token_budget > 0")
    if not config.data:
        raise ValueError("--fla_num needs --data (the texts of the scored rows are embedded)")


def _diversity(
    config: SelectConfig, cols: Mapping[str, np.ndarray], candidates: np.ndarray
) -> tuple[np.ndarray, dict[RowKey, Record], dict[str, Any]]:
    """Superfiltering.D over the IFD stage ``candidates``.

    Returns:
        The picks in greedy order, the candidates' records and the summary entries.
    """
    from resofilter_jax.diversity import superfiltering_d_details
    from resofilter_jax.embeddings import diversity_texts, load_embedder

    if config.fla_num > len(candidates):
        raise ValueError(
            f"--fla_num={config.fla_num} is more than the {len(candidates)} rows of the IFD stage"
        )
    key = row_keys(cols)
    records = _source(config).records({key[i] for i in candidates})
    texts = diversity_texts(
        [records[key[i]] for i in candidates],
        config.embed_type,  # type: ignore[arg-type]
        input_line=config.embed_input_line,
    )
    text_of = dict(zip(candidates.tolist(), texts, strict=True))
    spec = embedding_model(config.scores, config.model, config.dtype, config.max_length)
    t0 = time.perf_counter()
    embed = load_embedder(
        **spec,
        token_budget=config.token_budget,
        num_devices=config.num_devices,
        progress=config.progress,
    )
    load_s = time.perf_counter() - t0
    res = superfiltering_d_details(
        candidates,
        lambda pos: embed([text_of[int(i)] for i in pos]),
        ifd_num=None,
        fla_num=config.fla_num,
        metric=config.fla_metric,  # type: ignore[arg-type]
        ties=config.fla_ties,  # type: ignore[arg-type]
        progress=config.progress,
    )
    info = {
        "ifd_num": len(candidates),
        **{k: getattr(config, k) for k in ("fla_num", "fla_metric", "fla_ties", "embed_type")},
        "model": spec["model_path"],
        "max_length": spec["max_length"],
        "objective": res.objective,
        "seconds": {
            "load_model": load_s,
            "embedding": res.embed_seconds,
            "greedy": res.greedy_seconds,
        },
    }
    return res.positions, records, info


def _superfiltering(config: SelectConfig, cols: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The IFD ranking, then optionally Superfiltering.D's facility location, then the rows."""
    picked = superfiltering_select(
        cols["ifd"],
        rate=config.rate,
        count=config.ifd_num or config.count,
        threshold=config.threshold,
    )
    records: dict[RowKey, Record] | None = None
    info: dict[str, Any] = {}
    fla_rank: dict[int, int] = {}
    if config.fla_num:
        candidates = picked
        picked, records, info = _diversity(config, cols, candidates)  # greedy order
        fla_rank = {int(i): r for r, i in enumerate(picked)}
        if config.order == "score":  # IFD order, as the candidates are
            picked = candidates[np.isin(candidates, picked)]
    if _order(config, "superfiltering") == "original":
        picked = np.sort(picked)
    make = row_maker(_source(config), config.format, cols, picked, SCORE_KEYS, records)
    rows = [make(i) for i in picked]
    if fla_rank and config.format == "rows":
        for row, i in zip(rows, picked, strict=True):
            row["fla_rank"] = fla_rank[int(i)]
    out = write_rows(config.output, rows)
    ifd = as_float(cols["ifd"])
    eligible = int(np.sum(np.isfinite(ifd) & (ifd < config.threshold)))
    summary = {"rows": len(ifd), "eligible": eligible, "selected": len(picked), "output": str(out)}
    return {**summary, **info}


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
    union = np.unique(np.concatenate(kept))
    make = row_maker(_source(config), config.format, cols, union, keys)
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
    _order(config, policy)  # a bad --order fails here, not after the embedding
    _check_diversity(config, policy)
    if policy == "superfiltering":
        if "ifd" not in cols:
            raise ValueError(f"{config.scores} has no `ifd` column (is it an IFD score file?)")
        return _superfiltering(config, cols)
    if "score" not in cols:
        raise ValueError(f"{config.scores} has no `score` column (is it a resonance score file?)")
    return _resofilter(config, cols)


# Flags: one per SelectConfig field (same name), mapped onto it by main().
flags.DEFINE_string("scores", None, "scores.parquet or scores.jsonl of a scoring run")
flags.DEFINE_string("output", None, "output file (.json array or .jsonl)")
flags.DEFINE_string("data", "", "the scored input file; rows are copied from it")
flags.DEFINE_enum("policy", "auto", ["auto", *POLICIES], "auto: from the ifd / score column")
flags.DEFINE_float("rate", 0.1, "superfiltering: fraction of this dataset's rows to keep")
flags.DEFINE_integer("count", 0, "superfiltering: number of rows (overrides --rate)")
flags.DEFINE_float("threshold", 1.0, "superfiltering: keep IFD strictly below this")
flags.DEFINE_integer("fla_num", 0, "Superfiltering.D: rows picked by facility location; 0 = off")
flags.DEFINE_integer("ifd_num", 0, "Superfiltering.D: IFD stage size; 0 = what --rate/--count keep")
flags.DEFINE_enum("fla_metric", "euclidean", list(FLA_METRICS), "FL: similarity of embeddings")
flags.DEFINE_enum("fla_ties", "low", list(FLA_TIES), "FL: equal gains go to the low/high index")
flags.DEFINE_enum("embed_type", "whole", list(EMBED_TYPES), "FL: the text that is embedded")
flags.DEFINE_bool("embed_input_line", True, "FL: keep the input line when the input is empty")
flags.DEFINE_string("model", "", "FL: embedding model (default: the scorer's, else SmolLM2)")
flags.DEFINE_string("dtype", "", "FL: float32 | bfloat16 (default: the scorer's)")
flags.DEFINE_integer("max_length", 0, "FL: tokens per text (0: the scorer's max_length)")
flags.DEFINE_integer("token_budget", 16384, "FL: padded tokens per embedding batch")
flags.DEFINE_integer("num_devices", 0, "FL: local devices to embed on (0: all)")
flags.DEFINE_bool("progress", False, "FL: show progress bars")
flags.DEFINE_float("drop_rate", 0.5, "resofilter: drop int(N x p) of the ranking")
flags.DEFINE_list(
    "drop_rates", [], "resofilter: several rates, one file each (OUTPUT stem + .pXX, XX = % kept)"
)
flags.DEFINE_enum("keep", "low", list(KEEPS), "resofilter: keep low- or high-score rows")
flags.DEFINE_enum("order", "auto", ["auto", "score", "original"], "output order (auto: per policy)")
flags.DEFINE_enum("format", "rows", list(FORMATS), "input rows + scores | reference")
flags.DEFINE_bool("with_features", False, "attach the reso/... feature columns")
flags.DEFINE_string("data_format", "", "data format (default: the scorer's)")
flags.DEFINE_string("sharegpt_turns", "", "first | all (default: the scorer's)")


def _floats(values: Sequence[str]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError as e:
        raise app.UsageError(f"--drop_rates must be comma-separated numbers: {e}") from e


def main(argv: list[str]) -> None:
    """absl entry point: selects with the flags and prints the summary."""
    del argv
    values = {
        f.name: flags.FLAGS[f.name].value
        for f in dataclasses.fields(SelectConfig)
        if f.name in flags.FLAGS
    }
    values["drop_rates"] = _floats(values["drop_rates"])
    summary = run(SelectConfig(**values))
    print(json.dumps(summary, indent=2), file=sys.stdout)


if __name__ == "__main__":
    flags.mark_flags_as_required(["scores", "output"])
    app.run(main)

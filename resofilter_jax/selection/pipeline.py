"""Select rows from a score file and write them: ``run(SelectConfig(...))``.

The behaviour (policies, ``--column``, Superfiltering.D, ResoFilter's drop rates, the
target-aware policies, output formats and orders) is documented with the command,
:mod:`resofilter_jax.select`. Superfiltering.D's modules and the target-aware policies
(:mod:`~resofilter_jax.selection.representation`, :mod:`~resofilter_jax.selection.gradient`)
import jax: they are imported only when used.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from resofilter_jax.data import Record
from resofilter_jax.selection.assemble import ScoreKeys, row_maker
from resofilter_jax.selection.output import write_outputs
from resofilter_jax.selection.policies import (
    EMBED_TYPES,
    FEATURE_PREFIX,
    FLA_METRICS,
    FLA_TIES,
    FORMATS,
    KEEPS,
    POLICIES,
    RESO_KEYS,
    SCORE_KEYS,
    TARGET_POLICIES,
    check_drop_rate,
    default_column,
    detect_policy,
    resofilter_keep,
    superfiltering_select,
    target_budget,
)
from resofilter_jax.selection.rows import (
    RowKey,
    ScoredData,
    ScoreFile,
    embedding_model,
    kept_label,
    rate_output_path,
)
from resofilter_jax.selection.score_file import is_sorted, jsonable, release_memory

__all__ = ["SelectConfig", "run"]


@dataclasses.dataclass
class SelectConfig:
    """What to select and where to write it."""

    scores: str
    output: str
    data: str = ""  # the scored input; "" = write only the score rows
    policy: str = "auto"  # auto | superfiltering | resofilter | representation | gradient
    # superfiltering / resofilter: the numeric column ranked; "" = ifd (else rifd) / score
    column: str = ""
    # Superfiltering (rate / count: also the budget of the target-aware policies).
    rate: float = 0.1
    count: int = 0  # an absolute number of rows; overrides rate when > 0
    threshold: float = 1.0  # on any --column (inf: no cut)
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
    # Target-aware policies. representation: the target rows, a data file; gradient: rows of
    # the projection run (parse_rows syntax). round_robin: None = representation yes,
    # gradient no (the analysis' cosine with the targets' mean direction).
    target: str = ""
    target_format: str = "auto"
    target_limit: int = 0  # the first N ok target records; 0 = all
    target_rows: str = ""
    round_robin: bool | None = None
    # Target-aware policies: also write every row's score (index, turn, status, the score
    # column; NaN where not a candidate) to this parquet file, e.g. for analyze --mode compare.
    scores_out: str = ""
    # Output.
    order: str = "auto"  # auto (IFD: score, IFD + FL: greedy, reso: original) | score | original
    format: str = "rows"  # rows (input rows + scores) | reference (ResoFilter training rows)
    with_features: bool = False  # rows format: also attach every reso/<param>/<feature> column
    # Reading --data (format / sharegpt_turns: "" = as in the scorer's run_config.json).
    data_format: str = ""
    sharegpt_turns: str = ""
    allow_truncated: bool = True
    reader: str = "auto"


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
    """``score`` or ``original`` (``auto``: ``original`` for resofilter, else ``score``, the
    selection order: Superfiltering.D's greedy order, the target-aware policies' pick order)."""
    if config.order == "auto":
        return "original" if policy == "resofilter" else "score"
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
    config: SelectConfig, keys: ScoreKeys, candidates: np.ndarray
) -> tuple[np.ndarray, dict[RowKey, Record], dict[str, Any]]:
    """Superfiltering.D over the IFD stage ``candidates``.

    Returns:
        The picks in greedy order, the candidates' records and the summary entries.
    """
    from resofilter_jax.selection.diversity import superfiltering_d_details
    from resofilter_jax.selection.embeddings import diversity_texts, load_embedder

    if config.fla_num > len(candidates):
        raise ValueError(
            f"--fla_num={config.fla_num} is more than the {len(candidates)} rows of the IFD stage"
        )
    key = list(zip(keys.index[candidates].tolist(), keys.turns(candidates).tolist(), strict=True))
    records = _source(config).records(key)
    texts = diversity_texts(
        [records[k] for k in key],
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


def _superfiltering(config: SelectConfig, scores: ScoreFile, column: str) -> dict[str, Any]:
    """The ranking by ``column`` (IFD), then optionally Superfiltering.D, then the rows."""
    ifd = scores.numeric_column(column)  # [n]
    picked = superfiltering_select(
        ifd, rate=config.rate, count=config.ifd_num or config.count, threshold=config.threshold
    )
    n, eligible = len(ifd), int(np.sum(np.isfinite(ifd) & (ifd < config.threshold)))
    del ifd
    release_memory()
    keys = ScoreKeys.read(scores)
    records: dict[RowKey, Record] | None = None
    info: dict[str, Any] = {}
    extra: dict[str, dict[int, int]] = {}
    if config.fla_num:
        candidates = picked
        picked, records, info = _diversity(config, keys, candidates)  # greedy order
        if config.format == "rows":
            extra["fla_rank"] = {int(i): r for r, i in enumerate(picked)}
        if config.order == "score":  # IFD order, as the candidates are
            picked = candidates[np.isin(candidates, picked)]
    if _order(config, "superfiltering") == "original":
        picked = np.sort(picked)
    make, stream = row_maker(
        _source(config),
        config.format,
        scores,
        keys,
        np.unique(picked),
        _attach(SCORE_KEYS, column),
        records,
        extra,
    )
    (out,) = write_outputs([(config.output, picked)], make, stream)
    summary = {"rows": n, "eligible": eligible, "selected": len(picked), "output": str(out)}
    if column != "ifd":
        summary = {"column": column, "threshold": jsonable(config.threshold), **summary}
    return {**summary, **info}


def _attach(keys: tuple[str, ...] | list[str], column: str) -> list[str]:
    """The columns attached to output rows: ``keys``, then ``column`` if not among them."""
    return [*keys, *([] if column in keys else [column])]


def _resofilter(config: SelectConfig, scores: ScoreFile, column: str) -> dict[str, Any]:
    """Drops the first int(N x p) of the ``column`` ranking for each rate; one file per rate."""
    if config.keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {config.keep!r}")
    if config.with_features and config.format != "rows":
        raise ValueError("--with_features applies to --format rows only")
    rates = tuple(config.drop_rates) or (config.drop_rate,)
    for p in rates:
        check_drop_rate(p)
    labels = [kept_label(p) for p in rates]
    if len(set(labels)) != len(labels):
        raise ValueError(f"drop rates must differ, got {list(rates)} (files {labels})")
    status = scores.statuses()
    n = scores.num_rows
    score = np.where(status.ok, scores.numeric_column(column), np.nan)  # [n] NaN: no candidate
    ok = int(status.ok.sum())
    scored = int(np.isfinite(score).sum())  # N
    if scored < ok:
        logging.warning("%d ok rows have no finite %s: not selected", ok - scored, column)
    keys = ScoreKeys.read(scores)
    rank = None  # the file is in input order: positions are the input order
    if not is_sorted(keys.index, keys.turn):
        by_input = np.lexsort((keys.turns(np.arange(n)), keys.index))
        rank = np.empty(n, np.int64)
        rank[by_input] = np.arange(n)  # [n] position of each row in input order
    order = _order(config, "resofilter")
    kept = resofilter_keep(score, rates, keep=config.keep, rank=rank, order=order)
    del score, rank
    release_memory()
    attach = list(RESO_KEYS)
    if config.with_features:
        attach += [c for c in scores.names if c.startswith(FEATURE_PREFIX)]
    union = np.unique(np.concatenate(kept))
    make, stream = row_maker(
        _source(config), config.format, scores, keys, union, _attach(attach, column)
    )
    paths = [
        rate_output_path(config.output, p) if config.drop_rates else config.output for p in rates
    ]
    written = write_outputs(list(zip(paths, kept, strict=True)), make, stream)
    outputs = [
        {
            "drop_rate": p,
            "kept": label,
            "dropped": scored - len(picked),
            "selected": len(picked),
            "output": str(out),
        }
        for p, label, picked, out in zip(rates, labels, kept, written, strict=True)
    ]
    head = {"policy": "resofilter", "keep": config.keep}
    if column != "score":
        head["column"] = column
    return {**head, "rows": n, "statuses": status.counts, "scored": scored, "outputs": outputs}


def _targeted(config: SelectConfig, scores: ScoreFile, policy: str) -> dict[str, Any]:
    """The representation (RDS+) or gradient (LESS) policy, then the rows."""
    status = scores.statuses()
    n = scores.num_rows
    keys = ScoreKeys.read(scores)
    target_budget(n, 0, rate=config.rate, count=config.count)  # bad values fail before any work

    def k_of(candidates: int) -> int:
        return target_budget(n, candidates, rate=config.rate, count=config.count)

    if policy == "representation":
        from resofilter_jax.selection.representation import select_representation

        picks = select_representation(config, keys, status.ok, _source(config), k_of)
    else:
        from resofilter_jax.selection.gradient import select_gradient

        picks = select_gradient(config, keys, status.ok, k_of)
    picked = picks.positions  # selection order
    if _order(config, policy) == "original":
        picked = keys.data_order(np.sort(picked))
    attach = [c for c in (*SCORE_KEYS, "rifd", *RESO_KEYS) if c in scores]
    extra = picks.extra if config.format == "rows" else {}
    make, stream = row_maker(
        _source(config), config.format, scores, keys, np.unique(picked), attach, None, extra
    )
    (out,) = write_outputs([(config.output, picked)], make, stream)
    written = {"scores_out": str(_write_scores(config.scores_out, scores, picks))}
    return {
        "policy": policy,
        "rows": n,
        "statuses": status.counts,
        **picks.info,
        "selected": len(picked),
        "output": str(out),
        **(written if config.scores_out else {}),
    }


def _write_scores(path: str, scores: ScoreFile, picks: Any) -> Path | None:
    """``--scores_out``: a score file of every row (``index``, ``turn`` when the score file
    has one, ``status`` and the policy's score column), written atomically; None without a
    path."""
    if not path:
        return None
    import pyarrow as pa

    from resofilter_jax.data.atomic import atomic_write_table

    index, turn = scores.keys()
    table = {"index": np.asarray(index, np.int64)}
    if turn is not None:
        table["turn"] = np.asarray(turn, np.int64)
    table["status"] = scores.column("status") if "status" in scores else np.full(len(index), "ok")
    table.update({name: np.asarray(v, np.float64) for name, v in picks.scores.items()})
    out = Path(path)
    atomic_write_table(out, pa.table({k: pa.array(v) for k, v in table.items()}))
    return out


def _check_target_options(config: SelectConfig, policy: str) -> None:
    """Refuses options of a policy other than ``policy`` (before any heavy work)."""
    target = policy in TARGET_POLICIES
    if config.column and target:
        raise ValueError("--column applies to the superfiltering and resofilter policies")
    given = [
        f"--{name}"
        for name, value, wanted in (
            ("target", config.target, policy == "representation"),
            ("target_limit", config.target_limit, policy == "representation"),
            ("target_rows", config.target_rows, policy == "gradient"),
            ("round_robin", config.round_robin is not None, target),
            ("scores_out", config.scores_out, target),
        )
        if value and not wanted
    ]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise ValueError(f"{', '.join(given)} {verb} not apply to the {policy} policy")
    if policy == "representation" and not config.target:
        raise ValueError("--policy representation needs --target (a data file of target rows)")
    if config.target_limit < 0:
        raise ValueError(f"--target_limit must be >= 0, got {config.target_limit}")


def run(config: SelectConfig) -> dict[str, Any]:
    """Selects rows and writes them (``.json`` -> JSON array, else JSONL); returns a summary.

    Raises:
        ValueError: For a score file that does not fit the policy, a bad option, or a
            ``--data`` file that does not hold the selected rows.
    """
    if config.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {config.format!r}")
    scores = ScoreFile(config.scores)
    if "index" not in scores:
        raise ValueError(f"{config.scores} has no `index` column (is it a score file?)")
    policy = detect_policy(scores.names) if config.policy == "auto" else config.policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be 'auto' or one of {POLICIES}, got {config.policy!r}")
    _order(config, policy)  # a bad --order fails here, not after the embedding
    _check_diversity(config, policy)
    _check_target_options(config, policy)
    if policy in TARGET_POLICIES:
        return _targeted(config, scores, policy)
    column = config.column or default_column(policy, scores.names)
    if policy == "superfiltering":
        if column not in scores:
            raise ValueError(f"{config.scores} has no `{column}` column (is it an IFD score file?)")
        return _superfiltering(config, scores, column)
    if column not in scores:
        raise ValueError(
            f"{config.scores} has no `{column}` column (is it a resonance score file?)"
        )
    return _resofilter(config, scores, column)

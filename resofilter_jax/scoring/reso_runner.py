"""The resonance scoring loop: shards of rows -> SFT examples -> bucketed batches -> columns.

Same structure as :func:`resofilter_jax.scoring.runner.score_ifd`: rows are processed in
fixed-size shards (input order); each shard's scorable examples are cut into length-bucketed,
token-budgeted batches that are split over the mesh ``data`` axis (per-example gradients stay
on their device), and batch n is pulled to host only after batch n + 1 was dispatched. A
finished shard's columns go to ``on_shard``.

Exact-duplicate queries are found over ALL records before sharding (first occurrence kept):
later copies are not scored and get ``status=duplicate_of:<index>`` with NaN scores.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import pyarrow as pa
from jax.sharding import Mesh

from resofilter_jax.data import BatchPlan, Record, collate, encode_sft_examples, plan_batches
from resofilter_jax.models.base import CausalLM
from resofilter_jax.parallel import make_mesh, num_devices, shard_batch
from resofilter_jax.scoring import outputs
from resofilter_jax.scoring.param_select import select_params
from resofilter_jax.scoring.resonance import (
    ResonanceSpec,
    dedup_queries,
    feature_names,
    make_resonance_fn,
    to_columns,
)
from resofilter_jax.scoring.runner import (
    RunStats,
    ShardCallback,
    _buckets,
    _Progress,
    print_summary,
    run_pipelined,
)

DUPLICATE = "duplicate_of:"


def is_count(name: str) -> bool:
    """Integer columns: ``n_tokens`` and the ``n_*`` count features."""
    return name.rsplit("/", 1)[-1].startswith("n_")


def reso_schema(spec: ResonanceSpec) -> pa.Schema:
    """Columns of a resonance shard file (the merge may drop ``id`` / ``turn``)."""
    head = [("index", pa.int64()), ("id", pa.string()), ("turn", pa.int64())]
    head.append(("status", pa.string()))
    cols = [(n, pa.int64() if is_count(n) else pa.float64()) for n in feature_names(spec)]
    return pa.schema(head + cols)


def _missing(name: str) -> Any:
    """Value of a column on a row without results (as the engine gives label-less rows)."""
    if name == "n_tokens":
        return 0
    return -1 if is_count(name) else np.nan


def spec_from_config(config: ml_collections.ConfigDict, model: CausalLM) -> ResonanceSpec:
    """The :class:`ResonanceSpec` of ``config.resonance`` with the chosen parameter names."""
    r = config.resonance
    if r.pattern:
        params = select_params(model, pattern=r.pattern)
    else:
        params = select_params(model, param_type=r.params_type, last_k=r.last_k or None)
    return ResonanceSpec(
        params=tuple(params),
        rule=r.rule,
        lr=float(r.lr),
        eps=float(r.eps),
        weight_decay=None if r.weight_decay < 0 else float(r.weight_decay),
        aggregate=r.aggregate,
        compute_dtype=config.model.dtype,
        memory_budget_bytes=int(r.memory_budget_gb * 2**30),
    )


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The score-changing resonance settings (parameter choice, update rule, aggregate)."""
    r = config.resonance
    return {
        "params_type": "" if r.pattern else r.params_type,
        "last_k": 0 if r.pattern else r.last_k,
        "pattern": r.pattern,
        "rule": r.rule,
        "lr": float(r.lr),
        "eps": float(r.eps),
        "weight_decay": float(r.weight_decay),
        "aggregate": r.aggregate,
    }


@dataclasses.dataclass
class _Shard:
    """A shard in flight: its records, statuses and result columns."""

    k: int
    records: Sequence[Record]
    status: list[str]
    cols: dict[str, np.ndarray]
    remaining: int = 0


def score_resonance(
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    spec: ResonanceSpec,
    *,
    max_length: int = 768,
    template: str = "gemma",
    token_budget: int = 8192,
    min_bucket: int = 64,
    shard_size: int = 2048,
    shards: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    on_shard: ShardCallback | None = None,
    progress: bool = True,
) -> RunStats:
    """Computes the resonance columns of ``records``, shard by shard.

    Args:
        model: The LM (chosen matrices per ``spec.params``).
        tokenizer: Its HF tokenizer.
        records: All rows, in input order (duplicates are found over all of them).
        spec: Parameters, update rule and features.
        max_length, template: SFT encoding settings (ResoFilter's tokenization).
        token_budget: Padded tokens per batch (rows x bucket length).
        min_bucket: Smallest bucket length (buckets double up to ``max_length``).
        shard_size: Rows per shard.
        shards: Shard numbers to compute (default: all).
        mesh: Device mesh with a ``data`` axis (default: all local devices).
        on_shard: Called as ``on_shard(k, columns)`` per finished shard; columns are
            ``index, id, turn, status`` + :func:`feature_names` (one value per row).
        progress: Show a tqdm bar.

    Returns:
        The loop's :class:`RunStats` (``sequences``: examples scored).
    """
    mesh = mesh if mesh is not None else make_mesh()
    multiple = num_devices(mesh)
    ranges = outputs.shard_ranges(len(records), shard_size)
    todo = list(range(len(ranges))) if shards is None else sorted(shards)
    stats = RunStats(shards_skipped=len(ranges) - len(todo))
    stats.rows = sum(ranges[k][1] - ranges[k][0] for k in todo)
    dup = dedup_queries(records)
    fn = make_resonance_fn(model, spec, data_shards=multiple)
    names = feature_names(spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shapes: set[tuple[int, int]] = set()
    statuses: collections.Counter[str] = collections.Counter()

    def batches() -> Iterator[tuple[_Shard, BatchPlan | None, dict[str, np.ndarray] | None]]:
        for k in todo:
            lo, hi = ranges[k]
            recs = records[lo:hi]
            keep = [i for i in range(hi - lo) if dup[lo + i] is None]
            examples = encode_sft_examples(
                [recs[i] for i in keep], tokenizer, max_length=max_length, template=template
            )
            status = [f"{DUPLICATE}{records[j].index}" if j is not None else "" for j in dup[lo:hi]]
            for i, ex in zip(keep, examples, strict=True):
                status[i] = ex.status
            cols = {
                n: np.full(hi - lo, _missing(n), np.int64 if is_count(n) else np.float64)
                for n in names
            }
            shard = _Shard(k, recs, status, cols)
            ok = [(i, ex) for i, ex in zip(keep, examples, strict=True) if ex.status == "ok"]
            rows = np.asarray([i for i, _ in ok], np.int64)  # item -> row within the shard
            seqs = [ex.ids for _, ex in ok]
            labels = [ex.labels for _, ex in ok]
            lengths = [len(s) for s in seqs]
            plans = plan_batches(
                lengths,
                buckets=_buckets(lengths, max_length, min_bucket),
                token_budget=token_budget,
                batch_multiple=multiple,
                pow2_tail=True,
            )
            shard.remaining = len(plans)
            if not plans:
                yield shard, None, None
            for plan in plans:
                batch = collate(plan, seqs, labels, pad_id)
                batch["shard_rows"] = np.where(plan.rows >= 0, rows[np.maximum(plan.rows, 0)], -1)
                yield shard, plan, batch

    bar = _Progress(stats.rows, enabled=progress)
    bar.bar.set_description("resonance")

    def finish(shard: _Shard) -> None:
        cols = {
            "index": [r.index for r in shard.records],
            "id": [r.id for r in shard.records],
            "turn": [r.turn for r in shard.records],
            "status": shard.status,
            **shard.cols,
        }
        statuses.update(shard.status)
        if on_shard is not None:
            on_shard(shard.k, cols)
        stats.shards_computed += 1
        bar.add(sum(s != "ok" for s in shard.status), 0)

    def collect(shard: _Shard, plan: BatchPlan, batch: dict, n_tokens: int, out: Any) -> None:
        where = batch["shard_rows"]  # [B] row within the shard, -1 for padding rows
        host = to_columns(out, spec)  # [B] each: blocks until the batch is done
        if stats.first_result_s == 0.0:
            stats.first_result_s = bar.elapsed()
        real = where >= 0  # [B]
        for n in names:
            shard.cols[n][where[real]] = host[n][real]
        shard.remaining -= 1
        bar.add(int(real.sum()), n_tokens)
        if shard.remaining == 0:
            finish(shard)

    def dispatch(batch: dict[str, np.ndarray]) -> Any:
        arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return fn(shard_batch(arrays, mesh))

    run_pipelined(
        batches(), dispatch=dispatch, collect=collect, finish=finish, stats=stats, shapes=shapes
    )
    bar.close()
    stats.seconds = bar.elapsed()
    stats.shapes = sorted(shapes)
    stats.statuses = dict(sorted(statuses.items()))
    if progress:
        print_summary(stats)
    return stats


def run_from_config(
    config: ml_collections.ConfigDict,
    spec: ResonanceSpec,
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    shards: Sequence[int],
    mesh: Mesh,
    on_shard: ShardCallback,
) -> RunStats:
    """:func:`score_resonance` with the settings of a ``method="resonance"`` config."""
    return score_resonance(
        model,
        tokenizer,
        records,
        spec,
        max_length=config.max_length,
        template=config.template,
        token_budget=config.token_budget,
        min_bucket=config.min_bucket,
        shard_size=config.shard_size,
        shards=shards,
        mesh=mesh,
        on_shard=on_shard,
        progress=config.progress,
    )


__all__ = [
    "DUPLICATE",
    "fingerprint",
    "reso_schema",
    "run_from_config",
    "score_resonance",
    "spec_from_config",
]

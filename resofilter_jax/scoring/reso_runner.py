"""Resonance scoring: shards of rows -> SFT examples -> bucketed batches -> columns.

The loop over shards and batches is :func:`resofilter_jax.scoring.shard_loop.run_shards`
(the only module that loops over data, shared with IFD in
:mod:`resofilter_jax.scoring.runner`); this module supplies the resonance parts: each shard's
scorable examples are packed and cut into length-bucketed, token-budgeted batches that are
split over the mesh ``data`` axis (per-example gradients stay on their device), each batch's
per-example features are written into the shard's columns, and a finished shard's columns go
to ``on_shard``.

Exact-duplicate queries are found over ALL records before sharding (first occurrence kept;
by a 128-bit hash of the query, :mod:`resofilter_jax.scoring.record_stream`): later copies
are not scored and get ``status=duplicate_of:<index>`` with NaN scores.

With ``config.features.projection_dim = K > 0`` every shard also gets
``projections/proj-<k>.npy`` (float16 [rows, K], NaN rows where nothing was scored), written
just before its score shard, and ``projections/index.json`` once all shards exist (see
`resofilter_jax.scoring.projection`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import pyarrow as pa
from jax.sharding import Mesh

from resofilter_jax.configuration import host_settings
from resofilter_jax.data import (
    DUPLICATE,
    BatchPlan,
    Record,
    collate,
    collate_packed,
    encode_sft_examples,
    pack_sequences,
    packed_lengths,
    segment_slots,
)
from resofilter_jax.data.encoded_cache import EncodedCache
from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.models.base import CausalLM
from resofilter_jax.parallel import make_mesh, traced_on
from resofilter_jax.scoring import outputs, projection, projection_parts
from resofilter_jax.scoring.distributed_plan import Hosts
from resofilter_jax.scoring.param_select import select_params
from resofilter_jax.scoring.record_stream import duplicate_of as find_duplicates
from resofilter_jax.scoring.resonance import (
    ProjectionSpec,
    ResonanceSpec,
    feature_names,
    make_resonance_fn,
    max_slots,
    param_shapes,
    to_columns,
)
from resofilter_jax.scoring.shard_loop import (
    Batch,
    RunStats,
    ShardCallback,
    ShardWork,
    length_buckets,
    resolve_token_budget,
    run_shards,
    shard_plans,
)


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


def projection_from_config(config: ml_collections.ConfigDict) -> ProjectionSpec | None:
    """The :class:`ProjectionSpec` of ``config.features`` (None when absent or K = 0)."""
    f = config.get("features")
    if f is None or not f.get("projection_dim", 0):
        return None
    return ProjectionSpec(
        dim=int(f.projection_dim),
        seed=int(f.get("projection_seed", 0)),
        kind=f.get("projection_kind", "rademacher"),
        block=int(f.get("projection_block", 0)),
    )


def spec_from_config(config: ml_collections.ConfigDict, model: CausalLM) -> ResonanceSpec:
    """The :class:`ResonanceSpec` of ``config.resonance`` (+ ``config.features``)."""
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
        micro=int(r.get("micro", 0)) or None,
        projection=projection_from_config(config),
    )


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The output-changing resonance settings (parameters, update rule, aggregate, projection).

    The projection appears only when on (older output directories keep their fingerprint);
    its block size only changes fp32 summation order and is left out, like batching.
    """
    r = config.resonance
    fp = {
        "params_type": "" if r.pattern else r.params_type,
        "last_k": 0 if r.pattern else r.last_k,
        "pattern": r.pattern,
        "rule": r.rule,
        "lr": float(r.lr),
        "eps": float(r.eps),
        "weight_decay": float(r.weight_decay),
        "aggregate": r.aggregate,
    }
    proj = projection_from_config(config)
    if proj is not None:
        fp["projection"] = {"dim": proj.dim, "seed": proj.seed, "kind": proj.kind}
    return fp


@dataclasses.dataclass
class _Shard:
    """Resonance state of a shard in flight: its statuses and result columns."""

    status: list[str]
    cols: dict[str, np.ndarray]
    proj: np.ndarray | None = None  # [rows, K] fp32, NaN where nothing was scored


def _collate_sft(
    plan: BatchPlan, seqs: Sequence[np.ndarray], labels: Sequence[np.ndarray], pad_id: int
) -> dict[str, np.ndarray]:
    """:func:`collate` with labels, also for a process's all-dummy share of a global batch."""
    if (plan.rows >= 0).any():
        return collate(plan, seqs, labels, pad_id)
    bsz, length = plan.rows.size, plan.length
    return {
        "input_ids": np.full((bsz, length), pad_id, np.int32),  # [B, L]
        "attention_mask": np.zeros((bsz, length), np.int32),  # [B, L]
        "row": plan.rows.astype(np.int32),  # [B]
        "labels": np.full((bsz, length), IGNORE_INDEX, np.int32),  # [B, L]
    }


def _agreed_slots(hosts: Hosts, local: Sequence[int], limit: int) -> list[int]:
    """Segment slots of every batch of a shard: the fullest row over all processes, rounded
    up to a power of two (fewer compiled shapes) but at most ``limit``; every process gets
    the same list."""
    every = hosts.allgather_lengths(local, len(local)) if hosts.multi else [np.asarray(local)]
    most = np.max(np.stack(every), axis=0) if local else np.zeros(0, np.int64)
    return [min(1 << max(int(n) - 1, 0).bit_length(), max(limit, int(n))) for n in most]


def _scatter(spec: ResonanceSpec, shard: _Shard, batch: Batch, out: dict[str, Any]) -> int:
    """Writes a batch's host results into the shard's columns; returns the examples done."""
    if "slots" in batch:  # packed: results [B, S, ...] -> one per segment
        slots, segments = batch["slots"], batch["segments"]
        out = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in out.items()}
        seg_ids = batch["attention_mask"]
        # [n_seg] result slot of every segment; int64 also when this process has none.
        at = np.asarray([g.row * slots + seg_ids[g.row, g.offset] - 1 for g in segments], np.int64)
        where = batch["rows"][np.asarray([g.seq for g in segments], np.int64)]  # shard rows
        done = len(segments)
    else:
        where = batch["shard_rows"]  # [B] row within the shard, -1 for padding rows
        at = np.nonzero(where >= 0)[0]
        where = where[at]
        done = len(at)
    host = to_columns(out, spec)  # [B] or [B * S] each
    for n, col in shard.cols.items():
        col[where] = host[n][at]
    if shard.proj is not None:
        shard.proj[where] = np.asarray(out["projection"])[at]  # [b, K]
    return done


def _columns(shard: _Shard) -> dict[str, Any]:
    """``status`` + the feature columns (+ ``projection``) of a finished shard."""
    cols: dict[str, Any] = {"status": shard.status, **shard.cols}
    if shard.proj is not None:
        cols["projection"] = shard.proj
    return cols


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
    bucket_step: int = 0,
    pack: bool = True,
    max_segments: int = 8,
    shard_size: int = 2048,
    shards: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    on_shard: ShardCallback | None = None,
    progress: bool = True,
    workers: int = 1,
    prefetch: int = 1,
    stop: Callable[[], bool] | None = None,
    cache: EncodedCache | None = None,
    duplicate_of: np.ndarray | None = None,
) -> RunStats:
    """Computes the resonance columns of ``records``, shard by shard.

    Args:
        model: The LM (chosen matrices per ``spec.params``).
        tokenizer: Its HF tokenizer.
        records: All rows, in input order: a list, or any sequence that serves
            ``records[lo:hi]`` (:class:`~resofilter_jax.scoring.record_stream.StreamedRecords`).
        spec: Parameters, update rule and features.
        max_length, template: SFT encoding settings (ResoFilter's tokenization).
        token_budget: Padded tokens per batch (rows x bucket length); 0: by platform
            (:func:`~resofilter_jax.scoring.shard_loop.resolve_token_budget`).
        min_bucket: Smallest bucket length (buckets double up to ``max_length``).
        bucket_step: > 0: buckets double only up to this length, then grow by it.
        pack: Pack several examples into one row (one backward pass gives each its own
            gradient, `resofilter_jax.scoring.segment_grads`); falls back to one example per
            row, with a warning, when a chosen parameter does not allow it. Same results.
        max_segments: Most examples in one packed row (the segment-masked weight gradient
            costs this many weight-gradient matmuls per chosen matrix and row); lowered to
            what the memory budget holds at ``max_length`` (below 2: not packed).
        shard_size: Rows per shard.
        shards: Shard numbers to compute (default: all).
        mesh: Device mesh with a ``data`` axis (default: all local devices).
        on_shard: Called as ``on_shard(k, columns)`` per finished shard; columns are
            ``index, id, turn, status`` + :func:`feature_names` (one value per row), plus
            ``projection`` ([rows, K] fp32) when ``spec.projection`` is set.
        progress: Show a tqdm bar.
        workers: Host threads that tokenize a shard (``data.encoding.host_workers``).
        prefetch: Shards prepared ahead in a background thread (one process; see
            :func:`~resofilter_jax.scoring.shard_loop.run_shards`).
        stop: Polled before each shard is started; True stops the loop there (see
            :func:`~resofilter_jax.scoring.shard_loop.run_shards`).
        cache: Encoded shards on disk (:mod:`resofilter_jax.data.encoded_cache`); None:
            tokenize.
        duplicate_of: [len(records)] int64, the ``Record.index`` of the first record with
            the same query or -1 (:func:`~resofilter_jax.scoring.record_stream.scan_records`);
            None: found here by reading all of ``records``.

    Returns:
        The loop's :class:`~resofilter_jax.scoring.shard_loop.RunStats` (``sequences``:
        examples scored).
    """
    mesh = mesh if mesh is not None else make_mesh()
    hosts = Hosts(mesh)
    token_budget = resolve_token_budget(token_budget, mesh.devices.flat[0].platform)
    ranges = outputs.shard_ranges(len(records), shard_size)
    cap = -(-shard_size // hosts.count)  # most examples of one process in a shard
    dup = find_duplicates(records) if duplicate_of is None else duplicate_of  # [N] int64
    if len(dup) != len(records):
        raise ValueError(f"duplicate_of has {len(dup)} entries for {len(records)} records")
    fn = make_resonance_fn(model, spec, data_shards=hosts.devices).place(mesh)  # weights once
    if pack and not fn.packable:
        warnings.warn(
            f"packing is off: the per-example gradients of {fn.unpackable} need one example "
            "per row",
            stacklevel=2,
        )
        pack = False
    if pack:  # gradients of the chosen matrices for every example of a row must fit
        max_segments = min(max_segments, max_slots(model, spec, max_length, max_segments))
        pack = max_segments > 1
    names = feature_names(spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def prepare(lo: int, hi: int) -> ShardWork:
        recs = records[lo:hi]
        keep = np.flatnonzero(dup[lo:hi] < 0).tolist()  # rows of the shard to score

        def encode() -> list[Any]:
            return encode_sft_examples(
                [recs[i] for i in keep],
                tokenizer,
                max_length=max_length,
                template=template,
                workers=workers,
            )

        examples = cache.get_or_encode(lo, hi, len(keep), encode) if cache else encode()
        status = [f"{DUPLICATE}{j}" if j >= 0 else "" for j in dup[lo:hi].tolist()]
        for i, ex in zip(keep, examples, strict=True):
            status[i] = ex.status
        cols = {
            n: np.full(hi - lo, _missing(n), np.int64 if is_count(n) else np.float64) for n in names
        }
        shard = _Shard(status, cols)
        if spec.projection is not None:
            shard.proj = np.full((hi - lo, spec.projection.dim), np.nan, np.float32)
        ok = [(i, ex) for i, ex in zip(keep, examples, strict=True) if ex.status == "ok"]
        rows = np.asarray([i for i, _ in ok], np.int64)  # item -> row within the shard
        seqs = [ex.ids for _, ex in ok]
        labels = [ex.labels for _, ex in ok]
        lengths = [len(s) for s in seqs]
        packed = pack_sequences(
            lengths,
            length_buckets(lengths, max_length, min_bucket, bucket_step),
            pack=pack,
            max_per_row=max_segments,
        )  # rows of example indices
        plans = shard_plans(
            hosts,
            packed_lengths(packed, lengths) if pack else lengths,
            cap=cap,
            max_length=max_length,
            min_bucket=min_bucket,
            bucket_step=bucket_step,
            token_budget=token_budget,
        )
        unscored = sum(s != "ok" for s in status)
        if not pack:  # collated lazily, one batch ahead of the device
            batches: Iterable[Batch] = (
                {
                    **_collate_sft(plan, seqs, labels, pad_id),
                    "shard_rows": np.where(plan.rows >= 0, rows[np.maximum(plan.rows, 0)], -1),
                }
                for plan in plans
            )
            return ShardWork(recs, shard, plans, batches, unscored)
        starts = [1] * len(seqs)  # labels mark what is trained on
        got = [collate_packed(p, packed, seqs, starts, pad_id, labels) for p in plans]
        slots = _agreed_slots(hosts, [segment_slots(a) for a, _ in got], max_segments)
        batches = [
            {**arrays, "segments": segments, "slots": n, "rows": rows}
            for (arrays, segments), n in zip(got, slots, strict=True)
        ]
        return ShardWork(recs, shard, plans, batches, unscored)

    def dispatch(batch: Batch) -> Any:
        if "slots" in batch:
            keys = ("input_ids", "attention_mask", "positions", "labels")
            packed = hosts.to_global({k: batch[k] for k in keys})
            with traced_on(mesh):
                return fn(packed, slots=batch["slots"])
        arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        rows = hosts.to_global(arrays)  # [P * B, L] global batch
        with traced_on(mesh):
            return fn(rows)

    return run_shards(
        hosts,
        ranges,
        shards,
        prepare=prepare,
        dispatch=dispatch,
        scatter=functools.partial(_scatter, spec),
        columns=_columns,
        on_shard=on_shard,
        desc="resonance",
        progress=progress,
        prefetch=prefetch,
        stop=stop,
    )


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
    cache: EncodedCache | None = None,
    duplicate_of: np.ndarray | None = None,
    stop: Callable[[], bool] | None = None,
) -> RunStats:
    """:func:`score_resonance` with the settings of a ``method="resonance"`` config.

    With a projection, each shard's ``.npy`` is written before ``on_shard`` writes its score
    shard; a shard whose score file exists but whose projection file is missing or malformed
    is recomputed too; ``projections/index.json`` is (re)written at the end. Without one, a
    stale ``projections/`` directory (of an overwritten run) is removed. With several
    processes each writes its part of a shard's projections (``projection_parts``) and
    process 0 merges them (at the end, and at the start for a killed run's parts).
    ``shards`` must be the same list on every process.
    """
    hosts = Hosts(mesh)
    lead = hosts.index == 0
    host = host_settings(config)
    out_dir = Path(config.output_dir)
    ranges = outputs.shard_ranges(len(records), config.shard_size)
    pdir = out_dir / projection.PROJ_DIR
    run = outputs.run_hash(out_dir)
    if lead:
        (pdir / projection.INDEX).unlink(missing_ok=True)
    write = on_shard
    proj = spec.projection
    if proj is None:
        if lead and pdir.is_dir():
            shutil.rmtree(pdir)
    else:
        if lead:
            projection_parts.merge_parts(out_dir, ranges, proj.dim, run)  # of a killed run
        hosts.barrier("resofilter_projections_ready")
        todo = set(shards)
        redo = [
            k
            for k, (lo, hi) in enumerate(ranges)
            if k not in todo
            and not projection.shard_matches(
                out_dir, k, hi - lo, proj.dim, outputs.shard_meta(run, k, lo, hi)
            )
        ]
        if redo:
            warnings.warn(
                f"shards {redo[:8]} have scores but no valid projection file: recomputing them",
                stacklevel=2,
            )
        shards = hosts.agree_todo(sorted(todo | set(redo)), len(ranges))

        def write(k: int, cols: dict[str, Any]) -> None:
            if hosts.multi:
                part = (hosts.index, hosts.count)
                meta = outputs.shard_meta(run, k, *ranges[k], part)
                projection_parts.write_part(out_dir, k, cols["projection"], part, meta)
            else:
                meta = outputs.shard_meta(run, k, *ranges[k])  # written before the score shard
                projection.write_shard(out_dir, k, cols["projection"], meta)
            on_shard(k, cols)

    stats = score_resonance(
        model,
        tokenizer,
        records,
        spec,
        max_length=config.max_length,
        template=config.template,
        token_budget=config.token_budget,
        min_bucket=config.min_bucket,
        bucket_step=config.get("bucket_step", 0),
        pack=config.get("pack", True),
        max_segments=config.resonance.get("max_segments", 8),
        shard_size=config.shard_size,
        shards=shards,
        mesh=mesh,
        on_shard=write,
        progress=config.progress and lead,
        workers=host["workers"],
        prefetch=host["prefetch"],
        cache=cache,
        duplicate_of=duplicate_of,
        stop=stop,
    )
    if proj is not None:
        hosts.barrier("resofilter_projections_written")
        if lead:
            projection_parts.merge_parts(out_dir, ranges, proj.dim, run)
            shapes = param_shapes(model)
            meta = projection.index_meta(
                proj, {p: shapes[p] for p in spec.params}, _model_stamp(out_dir)
            )
            projection.write_index(out_dir, meta, ranges)
    return stats


def _model_stamp(out_dir: Path) -> dict[str, Any]:
    """The ``model`` entry of the run's fingerprint (empty when there is none)."""
    path = out_dir / outputs.RUN_CONFIG
    return json.loads(path.read_text()).get("model", {}) if path.is_file() else {}


__all__ = [
    "fingerprint",
    "projection_from_config",
    "reso_schema",
    "run_from_config",
    "score_resonance",
    "spec_from_config",
]

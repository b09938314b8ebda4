"""The scoring loop: encode shards of rows, run bucketed batches on the mesh, hand back shards.

This is the only module that loops over data. Rows are processed in fixed-size shards (in
input order). For each shard the records are encoded (Superfiltering tokenization), the
direct and conditioned sequences of all its samples form one sequence list that is packed
several to a row (:mod:`resofilter_jax.data.packing`) and cut into length-bucketed,
token-budgeted batches of rows, and the batches are dispatched one ahead of the
host: batch n + 1 (and the tokenization of the next shard) is prepared and dispatched before
the results of batch n are pulled to host, so host work overlaps device work through JAX's
asynchronous dispatch. A finished shard's columns go to ``on_shard`` (e.g. a Parquet writer).

With several processes (``jax.distributed``) the mesh spans all of their devices and each
process encodes only its part of every shard; the batch plan is agreed through an all-gather
of sequence lengths (:mod:`resofilter_jax.scoring.distributed_plan`), so every process
dispatches the same steps with the same shapes, and ``on_shard`` gets this process's rows.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from resofilter_jax.data import (
    BatchPlan,
    Record,
    Segment,
    bucket_lengths,
    collate_packed,
    encode_ifd_pairs,
    pack_sequences,
    packed_lengths,
    plan_batches,
)
from resofilter_jax.models.base import CausalLM
from resofilter_jax.parallel import make_mesh, replicate
from resofilter_jax.scoring import outputs
from resofilter_jax.scoring.distributed_plan import Hosts, plan_global_batches
from resofilter_jax.scoring.ifd import (
    SCORE_COLUMNS,
    add_segment_losses,
    ifd_scores,
    ifd_sequences,
    make_batch_fn,
)

ShardCallback = Callable[[int, dict[str, Any]], None]


@dataclasses.dataclass
class RunStats:
    """Counters and timings of one scoring loop.

    Attributes:
        rows: Rows (records) in the shards that were computed.
        shards_computed, shards_skipped: Shards run now / left out (already done).
        sequences: Sequences scored (two per ``ok`` sample).
        batches: Batches dispatched.
        tokens: Real (non-padding) tokens scored.
        padded_tokens: Tokens including padding (batch rows x bucket length).
        shapes: Distinct (rows, length) batch shapes (each compiles once).
        seconds: Wall time of the loop; first_result_s: until the first batch came back
            (includes compilation).
        statuses: Rows per status.
    """

    rows: int = 0
    shards_computed: int = 0
    shards_skipped: int = 0
    sequences: int = 0
    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    first_result_s: float = 0.0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        """Computed rows per second of loop time."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Real tokens per second of loop time."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the counters, timings and rates."""
        d = dataclasses.asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        d["samples_per_s"] = self.samples_per_s
        d["tokens_per_s"] = self.tokens_per_s
        return d


@dataclasses.dataclass
class _Shard:
    """A shard in flight: its records, encodings and per-sequence results."""

    k: int
    records: Sequence[Record]
    pairs: list[Any]
    owner: np.ndarray
    loss_sum: np.ndarray  # [n_seq] float64
    count: np.ndarray  # [n_seq]
    remaining: int = 0


def _buckets(lengths: Sequence[int], max_length: int, min_bucket: int, step: int = 0) -> list[int]:
    """Bucket lengths, plus one for sequences longer than ``max_length`` (a reference quirk)."""
    buckets = bucket_lengths(max_length, min(min_bucket, max_length), step)
    longest = max(lengths, default=0)
    if longest > max_length:
        buckets.append(-(-longest // min_bucket) * min_bucket)
    return buckets


def shard_plans(
    hosts: Hosts,
    lengths: Sequence[int],
    *,
    cap: int,
    max_length: int,
    min_bucket: int,
    bucket_step: int,
    token_budget: int,
) -> list[BatchPlan]:
    """This process's batch plans of a shard (rows: its own item indices, -1 = dummy).

    One process: ``plan_batches`` over the mesh. Several: the lengths of all processes are
    all-gathered (``cap``: most items any process can have in a shard) and every process
    takes its rows of the same :func:`plan_global_batches`.
    """
    if not hosts.multi:
        return plan_batches(
            lengths,
            buckets=_buckets(lengths, max_length, min_bucket, bucket_step),
            token_budget=token_budget,
            batch_multiple=hosts.devices,
            pow2_tail=True,
        )
    every = hosts.allgather_lengths(lengths, cap)  # [P] x [n_p]
    flat = [int(x) for lens in every for x in lens]
    plans = plan_global_batches(
        every,
        buckets=_buckets(flat, max_length, min_bucket, bucket_step),
        token_budget=token_budget,
        devices_per_process=hosts.local,
    )
    return [BatchPlan(g.length, g.rows[hosts.index]) for g in plans]


def _columns(shard: _Shard) -> dict[str, Any]:
    """The output columns of a finished shard."""
    scores = ifd_scores(shard.pairs, shard.owner, shard.loss_sum, shard.count)
    return {
        "index": [r.index for r in shard.records],
        "id": [r.id for r in shard.records],
        "turn": [r.turn for r in shard.records],
        **scores,
    }


def run_pipelined(
    batches: Iterator[tuple[Any, BatchPlan | None, dict[str, np.ndarray] | None]],
    *,
    dispatch: Callable[[dict[str, np.ndarray]], Any],
    collect: Callable[[Any, BatchPlan, dict[str, np.ndarray], int, Any], None],
    finish: Callable[[Any], None],
    stats: RunStats,
    shapes: set[tuple[int, int]],
) -> None:
    """Dispatches every batch and collects batch n only after batch n + 1 is dispatched.

    `batches` yields (shard, plan, batch), or (shard, None, None) for a shard with nothing to
    run (handed straight to `finish`). `dispatch` returns device results (async);
    `collect(shard, plan, batch, n_tokens, out)` pulls them to host. Counters go to `stats`;
    a batch of packed rows lists its sequences under ``batch["segments"]``.
    """
    pending: collections.deque = collections.deque()
    for shard, plan, batch in batches:
        if plan is None or batch is None:
            finish(shard)
            continue
        rows = int(plan.rows.size)
        n_tokens = int((batch["attention_mask"] > 0).sum())  # segment ids: > 0 is real
        shapes.add((rows, plan.length))
        stats.batches += 1
        packed = batch.get("segments")
        stats.sequences += len(packed) if packed is not None else int((plan.rows >= 0).sum())
        stats.tokens += n_tokens
        stats.padded_tokens += rows * plan.length
        pending.append((shard, plan, batch, n_tokens, dispatch(batch)))  # async dispatch
        while len(pending) > 1:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())


def score_ifd(
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    max_length: int = 1024,
    template: str = "none",
    token_budget: int = 16384,
    min_bucket: int = 64,
    bucket_step: int = 0,
    chunk: int = 128,
    pack: bool = True,
    shard_size: int = 2048,
    shards: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    on_shard: ShardCallback | None = None,
    progress: bool = True,
) -> RunStats:
    """Computes the IFD columns of ``records``, shard by shard.

    Args:
        model: The scoring LM (its parameters are replicated over ``mesh``).
        tokenizer: Its HF tokenizer.
        records: All rows, in input order.
        max_length, template: Superfiltering's encoding settings.
        token_budget: Padded tokens per batch (rows x bucket length).
        min_bucket: Smallest bucket length (buckets double up to ``max_length``).
        bucket_step: > 0: buckets double only up to this length, then grow by it.
        chunk: Sequence chunk of the cross-entropy.
        pack: Pack several sequences into one row (:mod:`resofilter_jax.data.packing`);
            False: one sequence per row. The scores are the same either way.
        shard_size: Rows per shard.
        shards: Shard numbers to compute (default: all; with several processes the same
            list on every process).
        mesh: Device mesh with a ``data`` axis (default: all local devices). With several
            processes: a mesh over the devices of all of them (process by process); each
            then scores only its contiguous part of every shard (``Hosts.rows``).
        on_shard: Called as ``on_shard(k, columns)`` for every finished shard, where columns
            are ``index, id, turn, status`` + :data:`SCORE_COLUMNS` (lists/arrays of one
            value per row of this process's part of the shard).
        progress: Show a tqdm bar.

    Returns:
        The loop's :class:`RunStats`.
    """
    mesh = mesh if mesh is not None else make_mesh()
    hosts = Hosts(mesh)
    ranges = outputs.shard_ranges(len(records), shard_size)
    todo = list(range(len(ranges))) if shards is None else sorted(shards)
    stats = RunStats(shards_skipped=len(ranges) - len(todo))
    stats.rows = sum(hi - lo for lo, hi in (hosts.rows(*ranges[k]) for k in todo))
    cap = 2 * -(-shard_size // hosts.count)  # most sequences of one process in a shard
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)
    fn = make_batch_fn(graphdef, chunk=chunk)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shapes: set[tuple[int, int]] = set()
    statuses: collections.Counter[str] = collections.Counter()

    def batches() -> Iterator[tuple[_Shard, BatchPlan | None, dict[str, np.ndarray] | None]]:
        for k in todo:
            lo, hi = hosts.rows(*ranges[k])  # this process's rows of the shard
            recs = records[lo:hi]
            pairs = encode_ifd_pairs(recs, tokenizer, max_length=max_length, template=template)
            seq = ifd_sequences(pairs)
            n = len(seq.seqs)
            shard = _Shard(k, recs, pairs, seq.owner, np.zeros(n), np.zeros(n))
            rows = pack_sequences(
                seq.lengths, _buckets(seq.lengths, max_length, min_bucket, bucket_step), pack=pack
            )  # packed rows of sequence indices
            plans = shard_plans(
                hosts,
                packed_lengths(rows, seq.lengths),
                cap=cap,
                max_length=max_length,
                min_bucket=min_bucket,
                bucket_step=bucket_step,
                token_budget=token_budget,
            )
            shard.remaining = len(plans)
            if not plans:
                yield shard, None, None
            for plan in plans:
                arrays, segments = collate_packed(plan, rows, seq.seqs, seq.starts, pad_id)
                yield shard, plan, {**arrays, "segments": segments}

    progress_bar = _Progress(stats.rows, enabled=progress)

    def finish(shard: _Shard) -> None:
        cols = _columns(shard)
        statuses.update(cols["status"])
        if on_shard is not None:
            on_shard(shard.k, cols)
        stats.shards_computed += 1
        progress_bar.add(len(shard.records) - len(shard.owner), 0)  # rows with no sequences

    def collect(shard: _Shard, plan: BatchPlan, batch: dict, n_tokens: int, out: Any) -> None:
        ce = hosts.to_local(out)  # [B, L - 1]: blocks until done
        if stats.first_result_s == 0.0:
            stats.first_result_s = progress_bar.elapsed()
        segments: list[Segment] = batch["segments"]
        add_segment_losses(ce, segments, shard.loss_sum, shard.count)
        shard.remaining -= 1
        progress_bar.add(len(segments) / 2, n_tokens)  # two sequences per sample
        if shard.remaining == 0:
            finish(shard)

    def dispatch(batch: dict[str, np.ndarray]) -> Any:
        arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "positions", "loss_mask")}
        return fn(state, hosts.to_global(arrays))  # [P * B, L] global batch

    run_pipelined(
        batches(), dispatch=dispatch, collect=collect, finish=finish, stats=stats, shapes=shapes
    )
    progress_bar.close()
    stats.seconds = progress_bar.elapsed()
    stats.shapes = sorted(shapes)
    stats.statuses = dict(sorted(statuses.items()))
    if progress:
        print_summary(stats)
    return stats


class _Progress:
    """A tqdm bar over samples with samples/s and tokens/s of the finished work."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="sample", desc="ifd", disable=not enabled)
        self.t0 = time.perf_counter()
        self.samples = 0.0
        self.tokens = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, samples: float, tokens: int) -> None:
        before = int(self.samples)
        self.samples += float(samples)
        self.tokens += tokens
        self.bar.update(int(self.samples) - before)
        t = max(self.elapsed(), 1e-9)
        self.bar.set_postfix(samples_s=f"{self.samples / t:.1f}", tok_s=f"{self.tokens / t:.0f}")

    def close(self) -> None:
        self.bar.close()


def print_summary(stats: RunStats) -> None:
    """Prints rows, statuses, timings and rates of a loop to stderr."""
    lines = [
        f"scored {stats.rows} rows in {stats.shards_computed} shards "
        f"({stats.shards_skipped} already done)",
        f"statuses: {stats.statuses}",
        f"{stats.batches} batches, {len(stats.shapes)} shapes, {stats.sequences} sequences, "
        f"{stats.tokens} tokens ({stats.padded_tokens} padded)",
        f"time {stats.seconds:.1f}s (first result {stats.first_result_s:.1f}s): "
        f"{stats.samples_per_s:.2f} samples/s, {stats.tokens_per_s:.0f} tokens/s",
    ]
    print("\n".join(lines), file=sys.stderr)


def score_records(
    model: CausalLM, tokenizer: Any, records: Sequence[Record], **kw: Any
) -> tuple[dict[str, Any], RunStats]:
    """:func:`score_ifd` over all shards, returning the concatenated columns in row order."""
    got: dict[int, dict[str, Any]] = {}
    stats = score_ifd(model, tokenizer, records, on_shard=got.__setitem__, **kw)
    keys = ("index", "id", "turn", "status", *SCORE_COLUMNS)
    cols: dict[str, Any] = {}
    for key in keys:
        parts = [list(got[k][key]) for k in sorted(got)]
        flat = [x for p in parts for x in p]
        cols[key] = flat if key in ("id", "status") else np.asarray(flat)
    return cols, stats

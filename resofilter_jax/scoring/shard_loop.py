"""The shard loop shared by the scoring methods: the only module that loops over data.

Rows are processed in fixed-size shards (in input order). :func:`run_shards` owns the loop:
for every shard to compute it asks the method to encode and plan this process's rows of the
shard (:class:`ShardWork`: length-bucketed, token-budgeted batch plans from
:func:`shard_plans` and their collated batches), dispatches the batches one ahead of the host
(:func:`run_pipelined`: batch n + 1, and the encoding of the next shard, are prepared and
dispatched before the results of batch n are pulled to host, so host work overlaps device
work through JAX's asynchronous dispatch), hands every batch's results to the method to
scatter into the shard's columns, and finishes a shard once all of its batches are back:
statuses counted, ``on_shard(k, columns)`` queued to a background writer thread
(:class:`ShardWriter`: e.g. the sealed Parquet writer, in order), progress bar advanced.
Counters and timings go to one :class:`RunStats`.

A method supplies only what differs: how a shard's rows are encoded and planned, the batch
function, how a batch's results land in the shard's columns, and the shard's final columns
(:mod:`resofilter_jax.scoring.runner` for IFD, :mod:`resofilter_jax.scoring.reso_runner` for
resonance; :mod:`resofilter_jax.selection.embeddings` reuses :func:`run_pipelined`).

With several processes (``jax.distributed``) the mesh spans all of their devices and each
process encodes only its part of every shard; the batch plan is agreed through an all-gather
of sequence lengths (:mod:`resofilter_jax.scoring.distributed_plan`), so every process
dispatches the same steps with the same shapes, and ``on_shard`` gets this process's rows.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
from tqdm import tqdm

from resofilter_jax.data import BatchPlan, Record, bucket_lengths, plan_batches, status_counts
from resofilter_jax.runtime import compile_counts
from resofilter_jax.scoring.distributed_plan import Hosts, plan_global_batches

ShardCallback = Callable[[int, dict[str, Any]], None]
Batch = dict[str, Any]  # collated arrays (+ the method's bookkeeping, e.g. ``segments``)


@dataclasses.dataclass
class RunStats:
    """Counters and timings of one scoring loop.

    Attributes:
        rows: Rows (records) in the shards that were computed.
        shards_computed, shards_skipped: Shards run now / left out (already done).
        sequences: Sequences scored (IFD: two per ``ok`` sample; resonance: examples).
        batches: Batches dispatched.
        tokens: Real (non-padding) tokens scored.
        padded_tokens: Tokens including padding (batch rows x bucket length).
        shapes: Distinct batch shapes: (rows, length), plus the segment slots of packed
            resonance batches (each compiles once).
        compilations: Executables built during the loop (lowered; each is compiled by XLA
            or read from the persistent compilation cache); backend_compilations: those
            compiled by XLA (``runtime.compile_counts``).
        seconds: Wall time of the loop; first_result_s: until the first batch came back
            (includes compilation).
        host_wait_s: Time the loop waited for the host to prepare a shard (tokenize, pack,
            plan); with background preparation, only what the device did not hide.
        device_wait_s: Time the loop waited for device results (the device was the slower).
        statuses: Rows per status.
        stopped: The loop stopped early at a shard boundary (``stop``); shards not started
            are left for a resumed run.
    """

    rows: int = 0
    shards_computed: int = 0
    shards_skipped: int = 0
    sequences: int = 0
    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    compilations: int = 0
    backend_compilations: int = 0
    seconds: float = 0.0
    first_result_s: float = 0.0
    host_wait_s: float = 0.0
    device_wait_s: float = 0.0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped: bool = False

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
        f"waited {stats.host_wait_s:.1f}s for the host, {stats.device_wait_s:.1f}s for the device",
    ]
    print("\n".join(lines), file=sys.stderr)


class ShardProgress:
    """A tqdm bar over samples with samples/s and tokens/s of the finished work."""

    def __init__(self, total: int, *, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="sample", desc=desc, disable=not enabled)
        self.t0 = time.perf_counter()
        self.samples = 0.0
        self.tokens = 0
        self.host_wait = 0.0  # seconds the loop waited for shard preparation
        self.device_wait = 0.0  # seconds the loop waited for device results

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, samples: float, tokens: int) -> None:
        before = int(self.samples)
        self.samples += float(samples)
        self.tokens += tokens
        self.bar.update(int(self.samples) - before)
        t = max(self.elapsed(), 1e-9)
        self.bar.set_postfix(
            samples_s=f"{self.samples / t:.1f}",
            tok_s=f"{self.tokens / t:.0f}",
            host_wait=f"{self.host_wait / t:.0%}",  # the device idled for the host
            device_wait=f"{self.device_wait / t:.0%}",  # the host idled for the device
        )

    def close(self) -> None:
        self.bar.close()


# Padded tokens per batch when a scoring config says 0 ("auto"), by platform. On a CPU a GEMM
# runs at full rate from ~1024 rows of tokens, so small batches cost nothing and pad far less
# (each length bucket's last batch is padded with dummy rows). 128 ShareGPT rows under SmolLM2,
# packed, bucket_step 0: 45,469 real tokens padded to 57,344 (16384), 49,152 (4096) or 47,104
# (2048); bench/bench_ifd.py on a 2-core AMD EPYC: 2048 gave 1.07x the tokens/s of 4096
# (BENCHMARKS.md). Accelerators want large batches to fill their matrix units.
AUTO_TOKEN_BUDGET = {"cpu": 2048}
AUTO_TOKEN_BUDGET_ACCELERATOR = 16384


def resolve_token_budget(token_budget: int, platform: str) -> int:
    """``token_budget``, or for 0 (auto) the platform's default (``AUTO_TOKEN_BUDGET``).

    Raises:
        ValueError: For a negative budget.
    """
    if token_budget < 0:
        raise ValueError(f"token_budget must be > 0, or 0 for auto; got {token_budget}")
    if token_budget:
        return int(token_budget)
    return AUTO_TOKEN_BUDGET.get(platform, AUTO_TOKEN_BUDGET_ACCELERATOR)


def length_buckets(
    lengths: Sequence[int], max_length: int, min_bucket: int, step: int = 0
) -> list[int]:
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
            buckets=length_buckets(lengths, max_length, min_bucket, bucket_step),
            token_budget=token_budget,
            batch_multiple=hosts.devices,
            pow2_tail=True,
        )
    every = hosts.allgather_lengths(lengths, cap)  # [P] x [n_p]
    flat = [int(x) for lens in every for x in lens]
    plans = plan_global_batches(
        every,
        buckets=length_buckets(flat, max_length, min_bucket, bucket_step),
        token_budget=token_budget,
        devices_per_process=hosts.local,
    )
    return [BatchPlan(g.length, g.rows[hosts.index]) for g in plans]


def run_pipelined(
    batches: Iterator[tuple[Any, BatchPlan | None, Batch | None]],
    *,
    dispatch: Callable[[Batch], Any],
    collect: Callable[[Any, BatchPlan, Batch, int, Any], None],
    finish: Callable[[Any], None],
    stats: RunStats,
    shapes: set[tuple[int, ...]],
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
        slots = batch.get("slots")  # packed resonance compiles per segment-slot count too
        shapes.add((rows, plan.length) if slots is None else (rows, plan.length, int(slots)))
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


@dataclasses.dataclass
class ShardWork:
    """What a method prepared for this process's rows of one shard.

    Attributes:
        records: This process's rows of the shard.
        state: The method's per-shard state (encodings, result buffers), handed back to its
            ``scatter`` and ``columns``.
        plans: The shard's batch plans (the same steps and shapes on every process).
        batches: One batch per plan, in order; may be lazy (then each is collated only when
            the loop reaches it, while the previous batch runs on the device).
        unscored: Rows with nothing to run (the progress bar counts them at the shard's end).
    """

    records: Sequence[Record]
    state: Any
    plans: Sequence[BatchPlan]
    batches: Iterable[Batch]
    unscored: int


@dataclasses.dataclass
class _InFlight:
    """A shard whose batches are not all back yet."""

    k: int
    work: ShardWork
    remaining: int


class ShardWriter:
    """Runs ``on_shard`` calls in one background thread, in order, at most ``ahead`` queued.

    The device loop does not wait for Parquet encoding and disk writes. The first error of a
    write is raised in the loop at the next submit, or when the block ends; leaving the block
    (normally or by an exception) waits for every queued write, so files stay whole.
    """

    def __init__(self, ahead: int = 2) -> None:
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="resofilter-write")
        self._queued: collections.deque = collections.deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queues ``fn(*args)``; raises the error of an earlier write, if any."""
        while self._queued and (self._queued[0].done() or len(self._queued) >= self.ahead):
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(fn, *args))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            while self._queued:
                future = self._queued.popleft()
                if exc_type is None:
                    future.result()
                else:
                    future.exception()  # wait; the loop's own error wins
        finally:
            self._pool.shutdown(wait=True)


def run_shards(
    hosts: Hosts,
    ranges: Sequence[tuple[int, int]],
    shards: Sequence[int] | None,
    *,
    prepare: Callable[[int, int], ShardWork],
    dispatch: Callable[[Batch], Any],
    scatter: Callable[[Any, Batch, Any], float],
    columns: Callable[[Any], dict[str, Any]],
    on_shard: ShardCallback | None,
    desc: str,
    progress: bool,
    prefetch: int = 1,
    stop: Callable[[], bool] | None = None,
) -> RunStats:
    """Runs a scoring method over the shards ``shards`` of ``ranges``; returns its stats.

    Args:
        hosts: This process's place in the job (its rows of a shard: ``hosts.rows``).
        ranges: ``[lo, hi)`` rows of every shard.
        shards: Shard numbers to compute (None: all; with several processes the same list
            on every process).
        prepare: ``prepare(lo, hi)``: encodes and plans this process's rows ``[lo, hi)`` of
            a shard (:class:`ShardWork`); called shard by shard, in order, on every process.
        dispatch: Starts one batch on the device (async); returns its device results.
        scatter: ``scatter(state, batch, results)``: writes a batch's host results (this
            process's rows) into the shard state; returns the samples it finished.
        columns: ``columns(state)``: the finished shard's columns, ``status`` first (one
            value per row); ``index, id, turn`` are put in front of them.
        on_shard: Called as ``on_shard(k, columns)`` for every finished shard.
        desc, progress: The progress bar's label / whether it is shown (then the summary
            is printed at the end too).
        prefetch: One process: shards prepared ahead in a background thread while the
            device runs the current one (0: in the loop, as with several processes, whose
            plans agree through collectives). Results do not depend on it.
        stop: Polled before each new shard is started (all processes agree: one
            collective per shard); when True, the shards already started are finished and
            written, nothing more is started, and ``stats.stopped`` is set.
    """
    todo = list(range(len(ranges))) if shards is None else sorted(shards)
    stats = RunStats(shards_skipped=len(ranges) - len(todo))
    stats.rows = sum(hi - lo for lo, hi in (hosts.rows(*ranges[k]) for k in todo))
    shapes: set[tuple[int, ...]] = set()
    statuses: collections.Counter[str] = collections.Counter()
    compiled0 = compile_counts()

    def prepared() -> Iterator[tuple[int, ShardWork]]:
        """Shards in order; one process: prepared ``prefetch`` shards ahead in a thread."""
        if hosts.multi or prefetch <= 0:  # several processes: plans need collectives, in order
            for k in todo:
                t0 = time.perf_counter()
                work = prepare(*hosts.rows(*ranges[k]))  # this process's rows of the shard
                bar.host_wait += time.perf_counter() - t0
                yield k, work
            return
        keys = iter(todo)
        with ThreadPoolExecutor(1, thread_name_prefix="resofilter-prepare") as pool:
            ahead: collections.deque = collections.deque()
            for k in itertools.islice(keys, prefetch):
                ahead.append((k, pool.submit(prepare, *hosts.rows(*ranges[k]))))
            while ahead:
                k, future = ahead.popleft()
                nxt = next(keys, None)
                if nxt is not None:
                    ahead.append((nxt, pool.submit(prepare, *hosts.rows(*ranges[nxt]))))
                t0 = time.perf_counter()
                work = future.result()  # re-raises the preparation's error here
                bar.host_wait += time.perf_counter() - t0
                yield k, work

    def batches() -> Iterator[tuple[_InFlight, BatchPlan | None, Batch | None]]:
        for k, work in prepared():
            if stop is not None and hosts.any_process(stop()):
                stats.stopped = True  # the shards in flight still finish (run_pipelined)
                return
            shard = _InFlight(k, work, remaining=len(work.plans))
            if not work.plans:
                yield shard, None, None
            for plan, batch in zip(work.plans, work.batches, strict=True):
                yield shard, plan, batch

    bar = ShardProgress(stats.rows, desc=desc, enabled=progress)

    def finish(shard: _InFlight) -> None:
        recs = shard.work.records
        cols = {
            "index": [r.index for r in recs],
            "id": [r.id for r in recs],
            "turn": [r.turn for r in recs],
            **columns(shard.work.state),
        }
        statuses.update(status_counts(cols["status"]))  # duplicate_of:<i> folded
        if on_shard is not None:
            writes.submit(on_shard, shard.k, cols)
        stats.shards_computed += 1
        bar.add(shard.work.unscored, 0)

    def collect(shard: _InFlight, plan: BatchPlan, batch: Batch, n_tokens: int, out: Any) -> None:
        # Blocks until the batch is done; several processes: this process's rows only.
        t0 = time.perf_counter()
        out = hosts.local_tree(out) if hosts.multi else jax.device_get(out)
        bar.device_wait += time.perf_counter() - t0
        if stats.first_result_s == 0.0:
            stats.first_result_s = bar.elapsed()
        done = scatter(shard.work.state, batch, out)
        shard.remaining -= 1
        bar.add(done, n_tokens)
        if shard.remaining == 0:
            finish(shard)

    with ShardWriter() as writes:  # shard files are written in a background thread
        run_pipelined(
            batches(), dispatch=dispatch, collect=collect, finish=finish, stats=stats, shapes=shapes
        )
    bar.close()
    stats.seconds = bar.elapsed()
    stats.shapes = sorted(shapes)
    compiled = compile_counts()
    stats.compilations = compiled[0] - compiled0[0]
    stats.backend_compilations = compiled[1] - compiled0[1]
    stats.statuses = dict(sorted(statuses.items()))
    stats.host_wait_s, stats.device_wait_s = bar.host_wait, bar.device_wait
    if progress:
        print_summary(stats)
    return stats


__all__ = [
    "Batch",
    "RunStats",
    "ShardCallback",
    "ShardProgress",
    "ShardWork",
    "ShardWriter",
    "length_buckets",
    "print_summary",
    "run_pipelined",
    "run_shards",
    "shard_plans",
]

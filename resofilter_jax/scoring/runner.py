"""IFD-family scoring (``ifd``, ``rifd``): pair encodings of a shard -> packed, bucketed
batches -> columns.

The loop over shards and batches is :func:`resofilter_jax.scoring.shard_loop.run_shards`
(the only module that loops over data); this module supplies the IFD parts. For each shard
the records are encoded (Superfiltering tokenization; r-IFD: the instruction under the
reverse prompt), the direct and conditioned sequences
of all its samples form one sequence list that is packed several to a row
(:mod:`resofilter_jax.data.packing`) and cut into length-bucketed, token-budgeted batches of
rows (:func:`~resofilter_jax.scoring.shard_loop.shard_plans`), each batch's per-position
cross-entropy is summed per sequence (and, with ``token_losses``, kept per token), and a
finished shard's columns go to ``on_shard`` (e.g. a Parquet writer).

With several processes (``jax.distributed``) each process encodes only its part of every
shard and all of them dispatch the same steps with the same shapes (see ``shard_loop``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from resofilter_jax.configuration import host_settings
from resofilter_jax.data import (
    Record,
    Segment,
    collate_packed,
    encode_ifd_pairs,
    encode_rifd_pairs,
    pack_sequences,
    packed_lengths,
)
from resofilter_jax.data.encoded_cache import EncodedCache
from resofilter_jax.models.base import CausalLM
from resofilter_jax.parallel import make_mesh, replicate, traced_on
from resofilter_jax.scoring import outputs
from resofilter_jax.scoring.distributed_plan import Hosts
from resofilter_jax.scoring.ifd import (
    PAIR_METHODS,
    add_segment_losses,
    ifd_sequences,
    make_batch_fn,
    pair_scores,
)
from resofilter_jax.scoring.ifd_family import (
    DEFAULT_INFORMATIVE_THRESHOLD,
    token_columns,
    token_pair_offset,
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


@dataclasses.dataclass
class _Shard:
    """IFD state of a shard in flight: its encodings and per-sequence results."""

    pairs: list[Any]
    owner: np.ndarray
    loss_sum: np.ndarray  # [n_seq] float64
    count: np.ndarray  # [n_seq]
    tokens: list[np.ndarray] | None = None  # [n_seq] scored-token CE (token_losses only)


def _add_losses(shard: _Shard, batch: Batch, ce: np.ndarray) -> float:
    """Adds a batch's per-position CE ([B, L - 1]) to its sequences; returns samples done."""
    segments: list[Segment] = batch["segments"]
    add_segment_losses(ce, segments, shard.loss_sum, shard.count, shard.tokens)
    return len(segments) / 2  # two sequences per sample


def ifd_options(config: Any) -> dict[str, Any]:
    """The ``ifd`` section with its defaults (a config without one gets them all):
    ``token_losses`` (bool) and ``informative_threshold`` (float, nats)."""
    section = config.get("ifd") or {}
    return {
        "token_losses": bool(section.get("token_losses", False)),
        "informative_threshold": float(
            section.get("informative_threshold", DEFAULT_INFORMATIVE_THRESHOLD)
        ),
    }


def ifd_settings(config: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`score_ifd` that a score config sets (method, batching,
    CE chunk, packing, shard size, token losses; not the model, records, mesh or callbacks)."""
    host = host_settings(config)
    return {
        "method": config.get("method", "ifd"),
        **ifd_options(config),
        "max_length": config.max_length,
        "template": config.template,
        "token_budget": config.token_budget,
        "min_bucket": config.min_bucket,
        "bucket_step": config.get("bucket_step", 0),
        "chunk": config.ce_chunk,
        "pack": config.get("pack", True),
        "shard_size": config.shard_size,
        "workers": host["workers"],
        "prefetch": host["prefetch"],
    }


def score_ifd(
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    method: str = "ifd",
    token_losses: bool = False,
    informative_threshold: float = DEFAULT_INFORMATIVE_THRESHOLD,
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
    workers: int = 1,
    prefetch: int = 1,
    stop: Callable[[], bool] | None = None,
    cache: EncodedCache | None = None,
) -> RunStats:
    """Computes the IFD (or r-IFD) columns of ``records``, shard by shard.

    Args:
        model: The scoring LM (its parameters are replicated over ``mesh``).
        tokenizer: Its HF tokenizer.
        records: All rows, in input order.
        method: ``ifd`` (Superfiltering) or ``rifd`` (reverse IFD; docs/METHODS.md).
        token_losses: Also return each sequence's per-token losses (list columns) and, for
            ``ifd``, the informative-token IFD (:mod:`~resofilter_jax.scoring.ifd_family`).
        informative_threshold: Its ``|delta_t|`` threshold (nats).
        max_length, template: Superfiltering's encoding settings.
        token_budget: Padded tokens per batch (rows x bucket length); 0: by platform
            (:func:`~resofilter_jax.scoring.shard_loop.resolve_token_budget`).
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
            are ``index, id, turn, status`` + ``PAIR_METHODS[method].columns(token_losses)``
            (lists/arrays of one value per row of this process's part of the shard).
        progress: Show a tqdm bar.
        workers: Host threads that tokenize a shard (``data.encoding.host_workers``).
        prefetch: Shards prepared ahead in a background thread (one process; see
            :func:`~resofilter_jax.scoring.shard_loop.run_shards`).
        stop: Polled before each shard is started; True stops the loop there (see
            :func:`~resofilter_jax.scoring.shard_loop.run_shards`).
        cache: Encoded shards on disk (:mod:`resofilter_jax.data.encoded_cache`), keyed
            for this tokenizer, template, ``max_length`` and data; None: tokenize.

    Returns:
        The loop's :class:`~resofilter_jax.scoring.shard_loop.RunStats`.
    """
    if method not in PAIR_METHODS:
        raise ValueError(f"method must be one of {sorted(PAIR_METHODS)}, got {method!r}")
    kind = PAIR_METHODS[method]
    offset = token_pair_offset(tokenizer) if token_losses else 0
    threshold = informative_threshold if kind.informative else None
    mesh = mesh if mesh is not None else make_mesh()
    hosts = Hosts(mesh)
    token_budget = resolve_token_budget(token_budget, mesh.devices.flat[0].platform)
    ranges = outputs.shard_ranges(len(records), shard_size)
    cap = 2 * -(-shard_size // hosts.count)  # most sequences of one process in a shard
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)
    fn = make_batch_fn(graphdef, chunk=chunk)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def prepare(lo: int, hi: int) -> ShardWork:
        recs = records[lo:hi]

        def encode() -> list[Any]:
            enc = encode_ifd_pairs if method == "ifd" else encode_rifd_pairs
            return enc(recs, tokenizer, max_length=max_length, template=template, workers=workers)

        pairs = cache.get_or_encode(lo, hi, len(recs), encode) if cache else encode()
        seq = ifd_sequences(pairs)
        n = len(seq.seqs)
        rows = pack_sequences(
            seq.lengths, length_buckets(seq.lengths, max_length, min_bucket, bucket_step), pack=pack
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
        batches = (  # collated lazily, one batch ahead of the device
            {**arrays, "segments": segments}
            for arrays, segments in (
                collate_packed(plan, rows, seq.seqs, seq.starts, pad_id) for plan in plans
            )
        )
        tokens: list[np.ndarray] | None = [np.zeros(0, np.float32)] * n if token_losses else None
        shard = _Shard(pairs, seq.owner, np.zeros(n), np.zeros(n), tokens)
        return ShardWork(recs, shard, plans, batches, unscored=len(recs) - len(seq.owner))

    def columns(shard: _Shard) -> dict[str, Any]:
        """``status`` + the method's columns of a finished shard."""
        cols = pair_scores(shard.pairs, shard.owner, shard.loss_sum, shard.count, kind)
        if shard.tokens is not None:
            extra = token_columns(
                cols["status"], shard.owner, shard.tokens, offset=offset, threshold=threshold
            )
            cols.update(extra)
        return cols

    def dispatch(batch: Batch) -> Any:
        arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "positions", "loss_mask")}
        batch_on_mesh = hosts.to_global(arrays)  # [P * B, L] global batch
        with traced_on(mesh):
            return fn(state, batch_on_mesh)

    return run_shards(
        hosts,
        ranges,
        shards,
        prepare=prepare,
        dispatch=dispatch,
        scatter=_add_losses,
        columns=columns,
        on_shard=on_shard,
        desc=method,
        progress=progress,
        prefetch=prefetch,
        stop=stop,
    )


def score_records(
    model: CausalLM, tokenizer: Any, records: Sequence[Record], **kw: Any
) -> tuple[dict[str, Any], RunStats]:
    """:func:`score_ifd` over all shards, returning the concatenated columns in row order
    (the token-loss list columns as lists of arrays / None)."""
    got: dict[int, dict[str, Any]] = {}
    stats = score_ifd(model, tokenizer, records, on_shard=got.__setitem__, **kw)
    kind = PAIR_METHODS[kw.get("method", "ifd")]
    keys = ("index", "id", "turn", "status", *kind.columns(kw.get("token_losses", False)))
    cols: dict[str, Any] = {}
    for key in keys:
        parts = [list(got[k][key]) for k in sorted(got)]
        flat = [x for p in parts for x in p]
        lists = key in ("id", "status") or key.startswith("token_losses_")
        cols[key] = flat if lists else np.asarray(flat)
    return cols, stats

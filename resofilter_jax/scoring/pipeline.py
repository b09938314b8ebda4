"""The score command's library entry: ``run(config)`` scores a dataset, resumable and sharded.

Writes OUTPUT_DIR/shards/*.parquet while running (a re-run with the same configuration
computes only the missing shards), then OUTPUT_DIR/scores.parquet, scores.jsonl and run.json.

Multi-process jobs (``jax.distributed``; see launch/README.md) run the same command on every
process: the mesh spans all their devices, each process scores its part of every shard and
writes ``shards/shard-K.pPofN.parquet``, and process 0 merges after a barrier. OUTPUT_DIR
must be on a filesystem all processes share.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from resofilter_jax import assets
from resofilter_jax.configuration import check_config, host_settings
from resofilter_jax.data import ReadReport
from resofilter_jax.data.encoded_cache import EncodedCache
from resofilter_jax.data.sources import iter_records, read_report_json
from resofilter_jax.models.attention import configure_attention
from resofilter_jax.models.loading import load_model
from resofilter_jax.models.precision import run_matmul_precision, with_matmul_precision
from resofilter_jax.models.stacking import set_scan_layers
from resofilter_jax.parallel import global_devices, initialize_distributed, make_mesh
from resofilter_jax.run_lock import hold_for_job
from resofilter_jax.runtime import enable_compilation_cache, versions
from resofilter_jax.scoring import outputs, reso_runner
from resofilter_jax.scoring.distributed_plan import Hosts
from resofilter_jax.scoring.ifd import PAIR_METHODS
from resofilter_jax.scoring.ifd_family import token_pair_offset
from resofilter_jax.scoring.record_stream import ScanResult, StreamedRecords, scan_records
from resofilter_jax.scoring.runner import ifd_options, ifd_settings, score_ifd
from resofilter_jax.stop_signals import Interrupted, StopSignals

METHODS = ("ifd", "rifd", "resonance")  # ifd, rifd: two-sequence pair scores (runner.py)


def _resolve_paths(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """Model and data paths, with the embedded defaults for empty ones."""
    model_path = config.model.path or str(assets.smollm2_gguf())
    default_data = assets.gsm8k_test if config.method == "resonance" else assets.sharegpt_json
    data_path = config.data.path or str(default_data())
    return model_path, data_path


def fingerprint(config: ml_collections.ConfigDict, model_path: str, data_path: str) -> dict:
    """Everything that affects the scores and the shard layout (not batching, not paths out)."""
    data = config.data
    fp = {
        "method": config.method,
        "model": {
            **outputs.path_stamp(model_path),
            "dtype": config.model.dtype,
            "param_dtype": config.model.param_dtype,
            "matmul_precision": run_matmul_precision(config),
        },
        "data": {
            **outputs.path_stamp(data_path, mtime=False),
            "format": data.format,
            "sharegpt_turns": data.sharegpt_turns,
            "allow_truncated": data.allow_truncated,
            "on_error": data.on_error,
            "fields": dict(data.fields),
            # Only when set, so fingerprints of runs from before these fields still match.
            **{k: data[k] for k in ("reader", "split") if data.get(k, "") not in ("", "auto")},
        },
        "template": config.template,
        "max_length": config.max_length,
        "limit": config.data.limit,
        "shard_size": config.shard_size,
    }
    if config.method == "resonance":
        fp["resonance"] = reso_runner.fingerprint(config)
    elif ifd_options(config)["token_losses"]:
        fp["ifd"] = token_fingerprint(config)
    return fp


def token_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``ifd`` settings that change a pair score's outputs: only present with token losses
    (the list columns and, for ``ifd``, the informative-token column and its threshold), so
    runs with the defaults keep the fingerprint of the runs from before these settings."""
    opts = ifd_options(config)
    fp: dict[str, Any] = {"token_losses": True}
    if PAIR_METHODS[config.method].informative:
        fp["informative_threshold"] = opts["informative_threshold"]
    return fp


def pair_schema(config: ml_collections.ConfigDict) -> Any:
    """Shard schema of an ``ifd`` / ``rifd`` run (its method's columns, token lists or not)."""
    kind = PAIR_METHODS[config.method]
    return outputs.score_schema(kind.columns(ifd_options(config)["token_losses"]))


def _scan_input(
    config: ml_collections.ConfigDict, data_path: str
) -> tuple[StreamedRecords, ReadReport, ScanResult]:
    """(records, report, scan) of the input, in bounded memory.

    One pass over the whole input counts the records, notes ids and, for resonance, finds
    duplicate queries by hash (every process scans everything, so all find the same); the
    records themselves are read again shard by shard while scoring
    (:mod:`resofilter_jax.scoring.record_stream`).
    """
    stream, report = iter_records(config, data_path)
    scan = scan_records(stream, find_duplicates=config.method == "resonance")
    if report.truncated:
        logging.warning("%s", report.message)
    records = StreamedRecords(lambda: iter_records(config, data_path)[0], scan.total)
    return records, report, scan


KILL_ENV = "RESOFILTER_TEST_KILL_AFTER_SHARDS"  # test hook: "P:N" = process P dies after N
TERM_ENV = "RESOFILTER_TEST_TERM_AFTER_SHARDS"  # test hook: "P:N" = P gets SIGTERM after N


def shard_writer(
    out_dir: Path,
    hosts: Hosts,
    ranges: Sequence[tuple[int, int]],
    schema: Any = outputs.IFD_SCHEMA,
) -> Callable[[int, dict[str, Any]], None]:
    """``on_shard`` callback: this process's part (or, alone, the whole shard) of shard k,
    sealed with the run's fingerprint hash and its row range (``outputs.shard_meta``).

    Test hooks: with ``RESOFILTER_TEST_KILL_AFTER_SHARDS=P:N`` in the environment, process P
    SIGKILLs itself right after writing its N-th shard file (a crash mid-run); with
    ``RESOFILTER_TEST_TERM_AFTER_SHARDS=P:N`` it sends itself SIGTERM instead (a preemption
    notice that reaches one process of a job).
    """
    part = (hosts.index, hosts.count)
    hooks = []
    for env, sig in ((KILL_ENV, signal.SIGKILL), (TERM_ENV, signal.SIGTERM)):
        if os.environ.get(env, ""):
            victim, after = (int(x) for x in os.environ[env].split(":"))
            hooks.append((victim, after, sig))
    written = [0]
    run = outputs.run_hash(out_dir)

    def write(k: int, cols: dict[str, Any]) -> None:
        meta = outputs.shard_meta(run, k, *ranges[k], part)
        outputs.write_shard(out_dir, k, cols, schema, part, meta)
        written[0] += 1
        for victim, after, sig in hooks:
            if victim == hosts.index and written[0] == after:
                os.kill(os.getpid(), sig)

    return write


def encoded_cache(
    config: ml_collections.ConfigDict, tokenizer: Any, fp: dict[str, Any]
) -> EncodedCache | None:
    """The encoded-shard cache of this run (``host.encoded_cache_dir``; "" = none), keyed by
    the fingerprint's data stamp and limit, the template, ``max_length`` and the tokenizer."""
    root = host_settings(config)["encoded_cache_dir"]
    if not root:
        return None
    settings = {"max_length": config.max_length, "shard_size": config.shard_size}
    if config.method == "rifd":  # IFD pairs of another encoding (the key of IFD's unchanged)
        settings["encoding"] = "rifd"
    return EncodedCache(
        root,
        kind="ifd" if config.method in PAIR_METHODS else "sft",
        tokenizer=tokenizer,
        template=config.template,
        settings=settings,
        data={**fp["data"], "limit": fp["limit"]},
    )


def _score_ifd(
    config: ml_collections.ConfigDict,
    lm: Any,
    records: StreamedRecords,
    todo: list[int],
    mesh: Any,
    out_dir: Path,
    hosts: Hosts,
    fp: dict[str, Any],
    ranges: Sequence[tuple[int, int]],
    stop: Callable[[], bool],
) -> Any:
    """Runs the IFD (or r-IFD) loop over the missing shards, writing each as it finishes."""
    return score_ifd(
        lm.model,
        lm.tokenizer,
        records,
        **ifd_settings(config),
        shards=todo,
        mesh=mesh,
        on_shard=shard_writer(out_dir, hosts, ranges, pair_schema(config)),
        progress=config.progress and hosts.index == 0,
        cache=encoded_cache(config, lm.tokenizer, fp),
        stop=stop,
    )


def _stopped(out_dir: Path, n: int, signal_name: str) -> str:
    """The message of a run stopped by a signal: what is done and how to resume."""
    left = len(outputs.missing_shards(out_dir, n))
    return (
        f"stopped by {signal_name}: {n - left} of {n} shards are written in {out_dir}, "
        f"{left} remain. Run the same command again to resume (finished shards are kept, "
        "nothing is merged until all exist)."
    )


@with_matmul_precision
def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Scores ``config.data`` with ``config.model``; writes the outputs; returns the summary.

    Raises:
        NotImplementedError: For ``method="resonance"`` with a config that has no
            ``resonance`` section (e.g. an IFD config).
        ValueError: For an unknown method.
        outputs.FingerprintMismatchError: If ``output_dir`` holds a different run.
    """
    t0 = time.perf_counter()
    check_config(config)
    if config.method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
    if config.method == "resonance" and "resonance" not in config:
        raise NotImplementedError(
            "method='resonance' needs a config with a `resonance` section "
            "(see configs/reso_smollm2_gsm8k.py)"
        )
    if config.get("dry_run", False):  # compile for a target topology; no data, no weights
        from resofilter_jax.dry_run import run_dry

        return run_dry(config, "score")
    if config.get("require_model_path", False) and not config.model.path:
        raise ValueError(
            "this config needs --config.model.path=<local Hugging Face model dir or .gguf file> "
            "(e.g. a GPT-2 directory saved with save_pretrained)"
        )
    if config.get("require_data_path", False) and not config.data.path:
        raise ValueError("this config needs --config.data.path=<local data file or directory>")
    dist = initialize_distributed(config)  # before any other JAX use; no-op on one process
    enable_compilation_cache(config.compilation_cache_dir)
    model_path, data_path = _resolve_paths(config)
    if dist["process_count"] > 1:
        devices = global_devices(config.num_devices)
    else:
        devices = jax.local_devices()
        if config.num_devices:
            devices = devices[: config.num_devices]
    mesh = make_mesh(devices)
    hosts = Hosts(mesh)
    fp = fingerprint(config, model_path, data_path)
    outputs.check_output_dir(config.output_dir, fp, overwrite=config.overwrite)  # all raise
    # One live run per output directory: process 0 holds the lock for the whole job.
    lock = hold_for_job(
        config.output_dir,
        "resofilter_jax.score",
        lead=hosts.index == 0,
        any_process=hosts.any_process,
    )
    try:
        with StopSignals("the shard in flight is written") as stop:
            if hosts.index == 0:
                outputs.prepare_output_dir(config.output_dir, fp, overwrite=config.overwrite)
            hosts.barrier("resofilter_output_dir")
            out_dir = Path(config.output_dir)
            records, report, scan = _scan_input(config, data_path)
            ranges = outputs.shard_ranges(len(records), config.shard_size)
            # Finished shards are checked against their seals; bad ones are reported and (process 0)
            # removed. Every process computes the union of what any of them sees missing (lockstep).
            run = outputs.run_hash(out_dir)  # seals this run's files
            missing, problems = outputs.verify_shards(out_dir, ranges, run, remove=hosts.index == 0)
            if problems and hosts.index == 0:
                logging.warning(
                    "recomputing %d shard file(s) that cannot be trusted:\n  %s",
                    len(problems),
                    "\n  ".join(problems[:20]),
                )
            todo = hosts.agree_todo(missing, len(ranges))
            t_read = time.perf_counter()
            lm = load_model(
                model_path,
                dtype=config.model.dtype,
                param_dtype=config.model.param_dtype,
                max_length=config.max_length,
            )
            set_scan_layers(  # True: the layers are stored stacked (no stack per call)
                lm.model,
                bool(config.model.get("scan_layers", False)),
                per_layer=config.method == "resonance",  # selects parameters per layer by name
            )
            attention = configure_attention(
                lm.model,
                config.model.get("attention", "auto"),
                packed=bool(config.get("pack", True)),
            )
            t_load = time.perf_counter()
            if config.method == "resonance":
                spec = reso_runner.spec_from_config(config, lm.model)
                schema = reso_runner.reso_schema(spec)
                stats = reso_runner.run_from_config(
                    config,
                    spec,
                    lm.model,
                    lm.tokenizer,
                    records,
                    shards=todo,
                    mesh=mesh,
                    on_shard=shard_writer(out_dir, hosts, ranges, schema),
                    cache=encoded_cache(config, lm.tokenizer, fp),
                    duplicate_of=scan.duplicate_of,
                    stop=lambda: stop.requested,
                )
            else:
                schema = pair_schema(config)
                stats = _score_ifd(
                    config, lm, records, todo, mesh, out_dir, hosts, fp, ranges,
                    lambda: stop.requested,
                )  # fmt: skip
            hosts.barrier("resofilter_scored")  # every part of every shard is written
            if stats.stopped:  # every process stopped at the same shard boundary
                name = stop.name or "a signal on another process"
                raise Interrupted(_stopped(out_dir, len(ranges), name), stop.signum or 15)
            if hosts.index == 0:
                merged = outputs.merge_shards(
                    out_dir,
                    len(ranges),
                    with_id=scan.has_id,
                    with_turn=config.data.sharegpt_turns == "all",
                    expected_rows=len(records),
                    schema=schema,
                    sealed_by=(run, ranges),
                )
            hosts.barrier("resofilter_merged")
            if hosts.index == 0:
                n_rows, statuses = merged.rows, dict(sorted(merged.statuses.items()))
            else:
                n_rows = len(records)
                statuses = outputs.file_status_counts(out_dir / "scores.parquet")
            t_end = time.perf_counter()
            summary = {
                "output_dir": str(out_dir),
                "model": model_path,
                "data": data_path,
                "rows": n_rows,
                "statuses": statuses,
                "shards": {
                    "total": len(ranges),
                    "computed": len(todo),
                    "reused": len(ranges) - len(todo),
                },
                "loop": stats.summary(),
                "seconds": {
                    "read": t_read - t0,
                    "load_model": t_load - t_read,
                    "score": stats.seconds,
                    "total": t_end - t0,
                },
                "samples_per_s": stats.samples_per_s,
                "tokens_per_s": stats.tokens_per_s,
            }
            if hosts.multi:  # the loop counters above are this process's
                summary["processes"] = {"index": hosts.index, "count": hosts.count}
            if hosts.index != 0:
                return summary
            if config.method in PAIR_METHODS and ifd_options(config)["token_losses"]:
                # How to pair the stored token lists (scoring/ifd_family.py, docs/METHODS.md).
                summary["token_losses"] = {
                    "pair_offset": token_pair_offset(lm.tokenizer),
                    **token_fingerprint(config),
                }
            cfg = lm.config
            outputs.write_json(
                out_dir / "run.json",
                {
                    **summary,
                    "config": config.to_dict(),
                    "model_config": {
                        "model_type": cfg.model_type,
                        "vocab_size": cfg.vocab_size,
                        "hidden_size": cfg.hidden_size,
                        "num_hidden_layers": cfg.num_hidden_layers,
                        "source": lm.source,
                    },
                    "attention": attention,  # the backend `model.attention` resolved to, and why
                    "versions": versions(),
                    "devices": [str(d) for d in devices],
                    "distributed": dist,
                    "read_report": read_report_json(report, config.data.limit),
                },
            )
            logging.info("summary: %s", json.dumps(summary))
            return summary

    finally:
        if lock is not None:
            lock.release()

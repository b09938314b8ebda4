"""The train command's library entry: ``run(config)`` fine-tunes a causal LM on instruction data.

Writes WORKDIR/checkpoints/<step>/ (orbax; a re-run with the same WORKDIR resumes from the
newest one, at the same data position), WORKDIR/metrics.jsonl (with the held-out loss every
``train.eval_every`` steps, ``training.periodic_eval``), WORKDIR/hf/ (the trained model as a
Hugging Face directory, when the run is complete) and WORKDIR/run.json.

The same function runs as a multi-process ``jax.distributed`` job (``config.distributed``,
SLURM or a TPU pod; see ``launch/README.md``): the mesh spans every process's devices, each
process collates its own rows of every batch, orbax checkpoints are written by all processes,
and process 0 writes the other files (see ``resofilter_jax.training.multihost``).

Faults (``resofilter_jax.training.run_control``): one live run per WORKDIR (a lock);
SIGTERM / SIGINT stop after a checkpoint of the current step; a full disk raises
``DiskFullError`` naming the file, with only complete checkpoints and no partial export left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from resofilter_jax import assets
from resofilter_jax.configuration import check_config, host_settings
from resofilter_jax.data import encode_sft_examples, status_counts
from resofilter_jax.data.atomic import atomic_write_bytes, disk_full_error, is_disk_full
from resofilter_jax.data.sources import read_records
from resofilter_jax.models.base import check_remat
from resofilter_jax.models.export import export_hf
from resofilter_jax.models.loading import as_dtype, load_model
from resofilter_jax.models.precision import with_matmul_precision
from resofilter_jax.models.registry import named_params
from resofilter_jax.parallel import (
    initialize_distributed,
    make_train_mesh,
    num_devices,
    param_shardings,
)
from resofilter_jax.runtime import enable_compilation_cache, versions
from resofilter_jax.scoring.distributed_plan import Hosts
from resofilter_jax.stop_signals import Interrupted, StopSignals
from resofilter_jax.training import multihost
from resofilter_jax.training.checkpoints import Checkpointer
from resofilter_jax.training.metrics import MetricsLogger
from resofilter_jax.training.optim import optimizer_from_config
from resofilter_jax.training.periodic_eval import HeldoutEval, check_eval_config
from resofilter_jax.training.run_control import (
    hold_workdir,
    stopped_message,
)
from resofilter_jax.training.sft_data import (
    BatchPlan,
    Row,
    batch_tokens,
    collate_step,
    packed_rows,
    rows_fingerprint,
    single_rows,
    step_rows,
)
from resofilter_jax.training.trainer import Trainer, configure_for_training, merge_model


def read_training_rows(
    config: ml_collections.ConfigDict, tokenizer: Any, data_path: str
) -> tuple[list[Row], dict[str, Any]]:
    """Reads, encodes (ResoFilter's SFT encoding) and optionally packs the training data.

    Records with a non-ok status (unreadable rows, no response token left after truncation)
    are dropped and counted in the returned report.
    """
    d = config.data
    records, report = read_records(config, data_path, limit=d.limit)
    examples = encode_sft_examples(
        records,
        tokenizer,
        max_length=config.max_length,
        template=config.template,
        workers=host_settings(config)["workers"],
    )
    kept = [ex for ex in examples if ex.status == "ok"]
    dropped = status_counts([ex.status for ex in examples if ex.status != "ok"])
    if dropped:
        logging.warning(
            "dropped %d of %d examples: %s", len(examples) - len(kept), len(examples), dropped
        )
    rows = packed_rows(kept, config.max_length) if d.packing else single_rows(kept)
    info = {
        "path": data_path,
        "records": len(records),
        "examples": len(kept),
        "dropped": dropped,
        "rows": len(rows),
        "packing": bool(d.packing),
        "pack_batches": bool(d.get("pack_batches", False)),
        "tokens": int(sum(len(r) for r in rows)),
        "target_tokens": int(sum(int(np.sum(r.labels[1:] != -100)) for r in rows)),
        "read_truncated": bool(report.truncated),
    }
    return rows, info


def _plan(config: ml_collections.ConfigDict, num_rows: int) -> tuple[BatchPlan, int]:
    """The batch plan and the number of optimizer steps of the run."""
    t = config.train
    plan = BatchPlan(num_rows, t.batch_size, t.epochs, seed=t.seed, shuffle=t.shuffle)
    if t.max_steps > 0:  # as HF: max_steps wins over epochs, cycling over the data as needed
        epochs = -(-t.max_steps // plan.steps_per_epoch)
        plan = BatchPlan(num_rows, t.batch_size, epochs, seed=t.seed, shuffle=t.shuffle)
        return plan, int(t.max_steps)
    return plan, plan.total_steps


def _check_config(config: ml_collections.ConfigDict, n_devices: int) -> int:
    """Validates the batch settings; returns the number of accumulation steps."""
    t = config.train
    micro = t.micro_batch_size or t.batch_size
    if t.batch_size % micro:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={micro}"
        )
    if micro % n_devices:
        raise ValueError(
            f"train.micro_batch_size={micro} rows do not split over the {n_devices} devices "
            "of the mesh; use a multiple of the device count (or --config.mesh.data=N)"
        )
    if config.get("require_model_path", False) and not config.model.path:
        raise ValueError("this config needs --config.model.path=<local HF model dir or .gguf>")
    if config.get("require_data_path", False) and not config.data.path:
        raise ValueError("this config needs --config.data.path=<local data file>")
    check_eval_config(config)
    check_remat(t.get("remat", "none"))  # before loading; the CPU warning comes with the model
    return t.batch_size // micro


def _resume(
    ckpt: Checkpointer,
    trainer: Trainer,
    plan: BatchPlan,
    data_state: Callable[[int], dict[str, Any]],
) -> int:
    """Restores the newest checkpoint into ``trainer``; returns its step (0: none).

    Raises:
        ValueError: If the checkpoint belongs to other data, batching or schedule.
    """
    start = ckpt.latest_step() or 0
    if not start:
        return 0
    state, saved = ckpt.restore(start, trainer.abstract_state())
    mine = data_state(start)
    plan.check_resume(saved, mine["rows_fingerprint"])
    for key in ("total_steps", "warmup_steps"):
        if saved.get(key) != mine[key]:
            raise ValueError(
                f"the checkpoint's {key} is {saved.get(key)}, this run's {mine[key]}: the "
                "schedule changed (data size, batch size, epochs or warmup); use a fresh workdir"
            )
    trainer.load_state(state)
    logging.info("resumed from step %d (%s)", start, saved)
    return start


def _train_steps(
    config: ml_collections.ConfigDict,
    trainer: Trainer,
    rows: list[Row],
    plan: BatchPlan,
    steps: range,
    *,
    accum: int,
    pad_id: int,
    logger: MetricsLogger,
    ckpt: Checkpointer,
    data_state: Callable[[int], dict[str, Any]],
    evaluator: HeldoutEval | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> tuple[int, int]:
    """Runs optimizer steps ``steps`` (0-based), logging and checkpointing.

    Returns:
        (tokens trained on, steps done): ``steps.stop`` unless ``stop_requested`` (polled
        after every step, the same answer on every process) said to stop early.

    Metrics of a step are fetched after the next step is dispatched, so the host builds the
    next batch while the device works; before a checkpoint they are flushed, so the metrics
    file always covers the newest checkpoint. With several processes each collates only its
    rows of every micro-batch (``Trainer.local_rows``); token counts are the whole batch's.
    A held-out evaluation (``evaluator``) is dispatched after its step and read, like the
    step's metrics, after the next step is dispatched; its record follows the step's.
    """
    pending: tuple[int, dict[str, Any], int, int] | None = None
    pending_eval: tuple[int, Any] | None = None
    last = [time.perf_counter()]
    total_tokens = 0
    micro = plan.batch_size // accum  # rows of a micro-batch, all processes
    local = trainer.local_rows(micro)  # this process's rows of it (None: all)
    if local is not None:
        logging.info(
            "process %d collates rows %s of every %d-row micro-batch",
            jax.process_index(),
            local.tolist(),
            micro,
        )
    kill = multihost.kill_hook()

    def flush(entry: tuple[int, dict[str, Any], int, int]) -> None:
        step, metrics, n_tokens, padded = entry
        # Read one step behind (the next step is already dispatched): the learning rate comes
        # back with the step's metrics, so nothing waits for a step right after dispatching it.
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, last[0] = now - last[0], now
        if step % config.log_every == 0 or step == steps.stop:
            logger.log(
                step,
                {
                    "loss": values["loss"],
                    "lr": values["lr"],
                    "grad_norm": values["grad_norm"],
                    "target_tokens": values["tokens"],
                    "tokens": n_tokens,
                    "padded_tokens": padded,  # token slots computed (all rows, all processes)
                    "tokens_per_s": n_tokens / dt,
                    "step_time_s": dt,
                    "epoch": step / plan.steps_per_epoch,
                },
            )

    def flush_all() -> None:
        nonlocal pending, pending_eval
        if pending is not None:
            flush(pending)
            pending = None
        if pending_eval is not None:
            step, sums = pending_eval
            values = HeldoutEval.result(sums)  # waits for the evaluation (queued after step)
            now = time.perf_counter()
            values["time_s"], last[0] = now - last[0], now  # not counted in the next step's time
            logger.log_eval(step, values)
            pending_eval = None

    pack = bool(config.data.get("pack_batches", False))
    for step in steps:
        layout = step_rows(
            rows,
            plan,
            step,
            accum=accum,
            max_length=config.max_length,
            min_bucket=config.min_bucket,
            pack=pack,
            row_multiple=num_devices(trainer.mesh),
        )
        per_micro = layout.per_micro  # rows of each micro-batch, all processes
        mine = trainer.local_rows(per_micro)  # this process's rows of them (None: all)
        batch = collate_step(layout, accum=accum, pad_id=pad_id, local=mine)
        metrics = trainer.step(batch, per_micro)
        flush_all()
        n_tokens = batch_tokens(rows, plan, step)  # real (non-padding) tokens
        total_tokens += n_tokens
        padded = accum * per_micro * layout.length
        pending = (step + 1, metrics, n_tokens, padded)  # not read yet (see flush)
        if evaluator is not None and evaluator.due(step + 1, steps.stop):
            pending_eval = (step + 1, evaluator.dispatch(trainer.params))  # not read yet
        if ckpt.should_save(step + 1):
            flush_all()  # metrics up to a checkpoint are on disk before it is
            ckpt.save(step + 1, trainer.state(), data_state(step + 1))
        multihost.maybe_kill(step + 1, kill)
        if stop_requested() and step + 1 < steps.stop:  # a signal: the caller saves here
            flush_all()
            return total_tokens, step + 1
    flush_all()
    return total_tokens, steps.stop


@with_matmul_precision
def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.data``; resumes from WORKDIR's newest checkpoint.

    One live run per WORKDIR (a lock, taken by process 0). SIGTERM / SIGINT stop the run
    after the current step, once a checkpoint of it is saved (every process stops at the
    same step); a second signal stops at once.

    Returns:
        A summary: steps done, final metrics, paths (also written to WORKDIR/run.json).

    Raises:
        RunLockedError: If a live run holds WORKDIR.
        Interrupted: If a signal stopped the run (the message says how to resume).
        DiskFullError: If a checkpoint, metrics.jsonl, run.json or the export ran out of
            space (a re-run resumes from the newest complete checkpoint).
    """
    t0 = time.perf_counter()
    check_config(config)
    if config.get("dry_run", False):  # compile for a target topology; no data, no weights
        from resofilter_jax.dry_run import run_dry

        return run_dry(config, "train")
    dist = initialize_distributed(config)  # before any other JAX use; no-op on one process
    mesh = make_train_mesh(config.mesh.data, config.mesh.fsdp, multihost.train_devices())
    multihost.check_mesh(mesh)
    accum = _check_config(config, num_devices(mesh))
    workdir = Path(config.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = hold_workdir(workdir, Hosts(mesh))  # before anything in WORKDIR is touched
    try:
        with StopSignals("a checkpoint is saved") as stop:
            return _run_locked(config, t0, dist, mesh, accum, workdir, stop)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    config: ml_collections.ConfigDict,
    t0: float,
    dist: dict[str, Any],
    mesh: Any,
    accum: int,
    workdir: Path,
    stop: StopSignals,
) -> dict[str, Any]:
    """:func:`run` once WORKDIR is locked and signals are caught."""
    primary = multihost.is_primary()
    vote = multihost.StopVote(mesh)
    enable_compilation_cache(config.compilation_cache_dir)
    model_path = config.model.path or str(assets.smollm2_gguf())
    data_path = config.data.path or str(assets.gsm8k_test())
    lm = load_model(  # each tensor read on the host and placed straight to its shards
        model_path,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        max_length=config.max_length,
        shardings=lambda shapes: param_shardings(shapes, mesh),
    )
    packed = bool(config.data.packing) or bool(config.data.get("pack_batches", False))
    attention = configure_for_training(lm.model, config, packed=packed)
    rows, data_info = read_training_rows(config, lm.tokenizer, data_path)
    plan, total = _plan(config, len(rows))
    fingerprint = rows_fingerprint(rows)
    shapes = {n: tuple(v.shape) for n, v in named_params(lm.model).items()}
    tx, schedule, warmup = optimizer_from_config(config.optim, shapes, total)
    trainer = Trainer(
        lm.model, tx, mesh, ce_chunk=config.ce_chunk, schedule=schedule, copy_params=False
    )
    lm.model = None  # the trainer owns the (sharded) parameters now
    pad_id = lm.tokenizer.pad_token_id
    pad_id = lm.tokenizer.eos_token_id if pad_id is None else pad_id
    evaluator = None  # the held-out file is read, put on the mesh and compiled for once
    if config.train.get("eval_every", 0):
        evaluator = HeldoutEval(config, lm.tokenizer, trainer, pad_id=pad_id)
    t_setup = time.perf_counter()

    def data_state(step: int) -> dict[str, Any]:
        return {**plan.state(step, fingerprint), "total_steps": total, "warmup_steps": warmup}

    ckpt = Checkpointer(
        workdir / "checkpoints",
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        use_async=config.checkpoint.use_async,
    )
    start = _resume(ckpt, trainer, plan, data_state)
    stop_at = min(total, config.train.stop_after_steps) if config.train.stop_after_steps else total

    def interrupted(done: int, ran: bool) -> Interrupted:
        name = stop.name or "a signal on another process"
        message = stopped_message(name, done, total, workdir, ran)
        return Interrupted(message, stop.signum or signal.SIGTERM)

    if vote.now(stop.requested):  # a signal during the set-up: stop before the first step
        ckpt.close()
        raise interrupted(start, False)
    logger = MetricsLogger(
        workdir,
        total_steps=total,
        start_step=start,
        progress=config.progress and primary,
        tensorboard=config.tensorboard,
        write=primary,
    )
    t_loop = time.perf_counter()
    n_tokens, stop_at = _train_steps(
        config,
        trainer,
        rows,
        plan,
        range(start, stop_at),
        accum=accum,
        pad_id=pad_id,
        logger=logger,
        ckpt=ckpt,
        data_state=data_state,
        evaluator=evaluator,
        stop_requested=lambda: vote.poll(stop.requested),
    )
    if stop_at > start:  # the last step, or the one a signal stopped at (no-op if saved)
        ckpt.save(stop_at, trainer.state(), data_state(stop_at))
    ckpt.close()  # background saves are on disk (or have raised)
    logger.close()
    if vote.now(stop.requested):  # every process stops here, with the checkpoint saved
        raise interrupted(stop_at, stop_at > start)
    t_train = time.perf_counter()
    hf_dir = None
    if stop_at == total and config.export.enabled:
        hf_dir = _export(config, trainer, workdir / "hf", lm.tokenizer)
    t_end = time.perf_counter()
    summary = {
        "workdir": str(workdir),
        "model": model_path,
        "data": data_info,
        "steps": {
            "total": total,
            "start": start,
            "done": stop_at,
            "finished": stop_at == total,
            "warmup": warmup,
            "per_epoch": plan.steps_per_epoch,
            "accumulation": accum,
        },
        "final_metrics": logger.last,
        # held-out loss (train.eval_every): the data and the newest record, None when off
        "eval": None
        if evaluator is None
        else {**evaluator.info, "every": evaluator.every, "final": logger.last_eval or None},
        "hf_dir": hf_dir,
        "seconds": {
            "setup": t_setup - t0,
            "train": t_train - t_loop,
            "export": t_end - t_train,
            "total": t_end - t0,
        },
        "train_tokens_per_s": n_tokens / max(t_train - t_loop, 1e-9),
    }
    if dist["process_count"] > 1:
        summary["processes"] = {"index": dist["process_index"], "count": dist["process_count"]}
    multihost.barrier("resofilter_train_done")  # the export is on disk when any process returns
    if not primary:
        return summary
    record = {
        **summary,
        "config": config.to_dict(),
        "versions": versions(),
        "devices": [str(d) for d in mesh.devices.flat],
        "mesh": dict(mesh.shape),
        "distributed": dist,
        "attention": attention,  # the backend `model.attention` resolved to, and why
        "model_config": {
            "model_type": lm.config.model_type,
            "num_hidden_layers": lm.config.num_hidden_layers,
            "hidden_size": lm.config.hidden_size,
            "vocab_size": lm.config.vocab_size,
        },
    }
    atomic_write_bytes(workdir / "run.json", json.dumps(record, indent=2, default=str).encode())
    logging.info("summary: %s", json.dumps(summary, default=str))
    return summary


def _export(config: ml_collections.ConfigDict, trainer: Trainer, out: Path, tokenizer: Any) -> str:
    """Writes the trained model as a HF directory; returns its path.

    The directory is written as ``<out>.tmp`` and renamed when complete, so ``out`` is
    never a partial export. With several processes the parameters are sharded over them:
    every process gathers them to its host, process 0 writes.

    Raises:
        DiskFullError: If the export ran out of space (nothing of it is left).
    """
    dtype = as_dtype(config.export.dtype) if config.export.dtype else None
    primary = multihost.is_primary()
    tmp = out.with_name(out.name + ".tmp")
    error: Exception | None = None
    if jax.process_count() == 1:
        model = trainer.model()
    else:
        model = merge_model(trainer.parts, multihost.gather_to_host(trainer.params))
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
        try:
            export_hf(model, tmp, tokenizer=tokenizer, dtype=dtype)
            shutil.rmtree(out, ignore_errors=True)  # the export of an earlier run
            os.replace(tmp, out)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    if Hosts(trainer.mesh).any_process(error is not None):  # no process waits for a failed one
        if error is None:
            raise RuntimeError("the export failed on process 0 (see its log)")
        if is_disk_full(error):
            nbytes = sum(
                v.size * (jax.numpy.dtype(dtype or v.dtype).itemsize)
                for v in trainer.params.values()
            )
            raise disk_full_error(
                out, int(nbytes), error, how="about", resume="from its newest checkpoint"
            ) from error
        raise error
    return str(out)

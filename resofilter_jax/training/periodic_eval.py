"""The held-out loss during training: every ``train.eval_every`` optimizer steps and at the
last step (of the run, or of this invocation with ``train.stop_after_steps``); the fields
are documented in ``configs/sft_smollm2.py`` (``train.eval_every``, ``eval.*``).

The held-out file ``eval.path`` is read with the ``data`` section's reader settings (reader,
split, format, fields, on_error; the first ``eval.limit`` input rows) and encoded once, at
start-up, with the training encoding (``template``, ``max_length``: the prompt masked, EOS
appended), one example per row even when training rows are packed. The loss is the
evaluate command's (:func:`resofilter_jax.training.evaluation.heldout_loss`): the token-mean
next-token cross-entropy over the response tokens, and its perplexity.

Batches of ``eval.batch_rows`` rows (rounded up to a multiple of the mesh's devices), sorted
by length and padded to the ``min_bucket`` length buckets, are put on the training mesh once
(split over its devices like training batches; with several processes each holds its rows).
The forward is compiled at start-up, one program per bucket, for the parameters as the
trainer shards them, and runs on the trainer's current parameters: nothing is copied or
re-placed per evaluation, and with fsdp the forward runs sharded. Every process runs it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from resofilter_jax.data.sources import read_records
from resofilter_jax.parallel import num_devices, replicated, traced_on
from resofilter_jax.training.evaluation import heldout_examples, loss_batches
from resofilter_jax.training.sft_data import single_rows
from resofilter_jax.training.trainer import ModelParts, Trainer, merge_model, row_loss_sums

Array = jax.Array


def check_eval_config(config: ml_collections.ConfigDict) -> int:
    """Validates ``train.eval_every`` and ``eval``; returns ``eval_every`` (0: no evaluation).

    Raises:
        ValueError: For a negative ``eval_every``, a missing ``eval.path`` while it is on, or
            ``eval.batch_rows`` < 1.
    """
    every = int(config.train.get("eval_every", 0) or 0)
    if every < 0:
        raise ValueError(f"train.eval_every must be >= 0 (0 = no evaluation), got {every}")
    if not every:
        return 0
    ev = config.get("eval")
    if ev is None or not ev.get("path", ""):
        raise ValueError(
            f"train.eval_every={every} needs a held-out file: --config.eval.path=<file> (read "
            "like data.path, with the same reader settings and template), or "
            "--config.train.eval_every=0 to train without evaluation"
        )
    if int(ev.get("batch_rows", 8)) < 1:
        raise ValueError(f"eval.batch_rows must be >= 1, got {ev.batch_rows}")
    return every


def _loss_sums(
    parts: ModelParts, params: Mapping[str, Array], batch: Mapping[str, Array], *, ce_chunk: int
) -> tuple[Array, Array]:
    """Summed response-token CE of a batch [1, rows, seq] and the number of those tokens."""
    sums, counts = row_loss_sums(
        merge_model(parts, params), {k: v[0] for k, v in batch.items()}, ce_chunk=ce_chunk
    )
    return jnp.sum(sums), jnp.sum(counts)


class HeldoutEval:
    """The held-out loss of a :class:`Trainer`'s current parameters, on its mesh.

    :meth:`dispatch` enqueues the evaluation (it does not wait for the device);
    :meth:`result` reads it. Every process must call both.

    Attributes:
        every: ``train.eval_every``.
        info: the held-out data: path, records, examples, dropped (per status), tokens,
            target_tokens, batches, batch_rows, lengths (the compiled padded lengths),
            read_truncated.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, tokenizer: Any, trainer: Trainer, *, pad_id: int
    ):
        """Reads and encodes ``config.eval.path``, puts its batches on the mesh, compiles.

        Raises:
            ValueError: If the configuration is invalid (:func:`check_eval_config`) or no
                held-out example has a response token.
        """
        self.every = check_eval_config(config)
        ev = config.eval
        records, report = read_records(config, ev.path, limit=ev.limit)
        kept, dropped = heldout_examples(
            records, tokenizer, template=config.template, max_length=config.max_length
        )
        if not kept:
            raise ValueError(
                f"eval.path={ev.path!r}: none of its {len(records)} records has a response "
                f"token with max_length={config.max_length} ({dropped})"
            )
        if dropped:
            logging.warning(
                "held-out file: dropped %d examples: %s", len(records) - len(kept), dropped
            )
        rows = single_rows(kept)
        n_dev = num_devices(trainer.mesh)
        batch_rows = -(-int(ev.batch_rows) // n_dev) * n_dev
        local = trainer.local_rows(batch_rows)  # this process's rows of a batch (None: all)
        self._batches: list[dict[str, Array]] = []
        for _, batch in loss_batches(
            rows,
            batch_rows=batch_rows,
            max_length=config.max_length,
            min_bucket=config.min_bucket,
            pad_id=pad_id,
        ):
            if local is not None:
                batch = {k: v[:, local] for k, v in batch.items()}
            self._batches.append(trainer.put_batch(batch, batch_rows))
        fn = jax.jit(
            lambda params, batch: _loss_sums(
                trainer.parts, params, batch, ce_chunk=config.ce_chunk
            ),
            in_shardings=(trainer.param_sharding, trainer.batch_sharding),
            out_shardings=replicated(trainer.mesh),
        )
        params = trainer.abstract_state()["params"]  # as the trainer shards them
        self._compiled: dict[int, Any] = {}
        for batch in self._batches:
            length = int(batch["input_ids"].shape[-1])
            if length not in self._compiled:
                with traced_on(trainer.mesh):
                    self._compiled[length] = fn.lower(params, batch).compile()
        self.info = {
            "path": ev.path,
            "records": len(records),
            "examples": len(kept),
            "dropped": dropped,
            "tokens": int(sum(len(r) for r in rows)),
            "target_tokens": int(sum(int(np.sum(r.labels[1:] != -100)) for r in rows)),
            "batches": len(self._batches),
            "batch_rows": batch_rows,
            "lengths": sorted(self._compiled),
            "read_truncated": bool(report.truncated),
        }

    def due(self, step: int, last: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (1-based) of a run ending at
        ``last``."""
        return step % self.every == 0 or step == last

    def dispatch(self, params: Mapping[str, Array]) -> list[tuple[Array, Array]]:
        """Enqueues the evaluation of ``params`` (the trainer's, as sharded); returns the
        per-batch (loss sum, token count) device scalars, not read yet."""
        return [self._compiled[int(b["input_ids"].shape[-1])](params, b) for b in self._batches]

    @staticmethod
    def result(pending: list[tuple[Array, Array]]) -> dict[str, float | int]:
        """``loss`` (token mean), ``ppl`` and ``tokens`` of a dispatched evaluation (waits)."""
        values = jax.device_get(pending)
        total = math.fsum(float(s) for s, _ in values)
        tokens = int(round(math.fsum(float(c) for _, c in values)))
        loss = total / max(tokens, 1)
        with np.errstate(over="ignore"):
            ppl = float(np.exp(loss))
        return {"loss": loss, "ppl": ppl, "tokens": tokens}

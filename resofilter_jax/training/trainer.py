"""The jit-compiled SFT train step, with token-weighted gradient accumulation and sharding.

Loss normalisation: the loss of an optimizer step is the **mean next-token cross-entropy over
every target token of the whole effective batch** (all micro-batches, all devices):
``sum(CE over targets) / number of targets``. Micro-batches contribute their *summed* CE and
gradients, which are divided once by the step's total target count, so an accumulated step is
the same update as one big-batch step, and long and short examples weigh per token. This is HF
Trainer's normalisation with ``average_tokens_across_devices=True`` (the loss divided by
``num_items_in_batch``).

Training state is a flat ``{HF name: array}`` dict of parameters (master copy in the model's
``param_dtype``, normally fp32; the forward pass runs in the model's ``dtype``, e.g. bf16) and
the optax state. Both are sharded by ``parallel.PARTITION_RULES`` over the mesh and donated
to the step; batches [accum, rows, seq] split their rows over every device. With layers stored
stacked (``scan_layers``) the decoder-layer entries are [L, ...] arrays named
``model.layers.*.x`` (see ``models/stacking.py``), which the partition rules, the decay mask,
checkpoints and the HF export handle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resofilter_jax.data import IGNORE_INDEX
from resofilter_jax.models.attention import configure_attention
from resofilter_jax.models.base import CausalLM, check_remat
from resofilter_jax.models.registry import param_name
from resofilter_jax.models.stacking import set_scan_layers
from resofilter_jax.parallel import (
    PARTITION_RULES,
    num_devices,
    param_shardings,
    replicated,
    traced_on,
    train_batch_sharding,
)
from resofilter_jax.scoring.losses import token_loss_sum, token_losses
from resofilter_jax.training import multihost

Array = jax.Array
Params = dict[str, Array]
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


class ModelParts(NamedTuple):
    """What rebuilds the model from a flat parameter dict (inside or outside jit)."""

    graphdef: Any
    rest: Any  # non-parameter state (empty for the model families here)
    paths: dict[str, tuple]  # HF name -> NNX state path


def configure_for_training(model: CausalLM, config: Any, *, packed: bool) -> str:
    """The train config's model settings on ``model``, in place; returns the attention backend.

    Layers stored stacked with ``model.scan_layers`` (:func:`set_scan_layers`), the
    ``train.remat`` policy (:func:`check_remat` warns where it cannot help) and
    ``model.attention`` for packed or unpacked rows. The train command and the benchmark both
    build their model with it.
    """
    scan = bool(config.model.get("scan_layers", False))
    set_scan_layers(model, scan)  # True: layers stored stacked
    model.remat = check_remat(config.train.get("remat", "none"), scan_layers=scan)
    return configure_attention(model, config.model.get("attention", "auto"), packed=packed)


def split_model(model: CausalLM) -> tuple[ModelParts, Params]:
    """The model's structure and its parameters as ``{HF name: array}``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = list(nnx.to_flat_state(params))
    paths = {param_name(path): path for path, _ in flat}
    values = {param_name(path): var.get_value() for path, var in flat}
    return ModelParts(graphdef, rest, paths), values


def merge_model(parts: ModelParts, params: Mapping[str, Array]) -> CausalLM:
    """The model with ``params`` (any subset of leaves may be tracers)."""
    state = nnx.from_flat_state({parts.paths[n]: v for n, v in params.items()})
    return nnx.merge(parts.graphdef, state, parts.rest)


def row_loss_sums(
    model: CausalLM, batch: Mapping[str, Array], *, ce_chunk: int
) -> tuple[Array, Array]:
    """Per-row summed next-token CE over the target tokens, and their counts.

    Token ``t`` is a target where ``labels[:, t] != -100``; it is predicted from position
    ``t - 1`` (HF's shifted loss). ``segment_ids`` is the attention mask (0 = padding; packed
    segments never attend to each other) and ``positions`` the position ids.

    Args:
        batch: ``input_ids``, ``labels``, ``segment_ids``, ``positions``, each [rows, seq].
    Returns:
        (loss_sum [rows], count [rows]), fp32.
    """
    ce, valid = _batch_loss(token_losses, model, batch, ce_chunk)  # [rows, seq - 1], 0 if no target
    return jnp.sum(ce, axis=1), jnp.sum(valid[:, 1:], axis=1, dtype=jnp.float32)


def _batch_loss(
    loss_fn: Callable[..., Array], model: CausalLM, batch: Mapping[str, Array], ce_chunk: int
) -> tuple[Array, Array]:
    """(``loss_fn`` (``token_losses`` or ``token_loss_sum``) on the batch's targets, valid
    [rows, seq] bool: where token t is a target)."""
    labels = batch["labels"]  # [rows, seq]
    valid = labels != IGNORE_INDEX  # position 0 is never a target
    loss = loss_fn(
        model,
        batch["input_ids"],
        batch["segment_ids"],
        valid.astype(jnp.float32),
        batch["positions"],
        targets=jnp.where(valid, labels, 0)[:, 1:],
        chunk=ce_chunk,
    )
    return loss, valid


def loss_sums(
    parts: ModelParts, params: Mapping[str, Array], batch: Mapping[str, Array], *, ce_chunk: int
) -> tuple[Array, Array]:
    """Summed CE over every target token of a micro-batch, and their count (fp32 scalars).

    The sum of :func:`row_loss_sums` (see it for the batch layout), computed as one scalar so
    that the CE's gradient comes from the forward pass's logits (``token_loss_sum``).
    """
    total, valid = _batch_loss(token_loss_sum, merge_model(parts, params), batch, ce_chunk)
    return total, jnp.sum(valid[:, 1:], dtype=jnp.float32)


def schedule_count(opt_state: Any) -> Array:
    """The step count of the optimizer's learning-rate schedule (int32 scalar, before update).

    Raises:
        ValueError: If the state holds no ``ScaleByScheduleState`` or more than one.
    """
    counts = [
        count
        for path, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        if getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState"
    ]
    if len(counts) != 1:
        raise ValueError(
            f"the optimizer state holds {len(counts)} learning-rate schedules; the step can "
            "report the learning rate only for an optimizer with exactly one"
        )
    return counts[0]


def make_step_fn(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    *,
    ce_chunk: int = 256,
    grad_sharding: Mapping[str, NamedSharding] | None = None,
    schedule: optax.Schedule | None = None,
) -> Callable[[Params, Any, dict[str, Array]], tuple[Params, Any, dict[str, Array]]]:
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)`` (not jitted).

    ``batch`` leaves are [accum, rows, seq]; the micro-batches run one after another under
    ``lax.scan``, summing fp32 gradients, then one optimizer update is applied with the
    gradient of the step's token-mean loss. ``metrics``: ``loss`` (that mean),
    ``grad_norm`` (its global norm before clipping) and ``tokens`` (target count); with
    ``schedule`` (the one inside ``tx``) also ``lr``, the learning rate this update used
    (read from the optimizer's own schedule count, so the caller never waits for it).
    ``grad_sharding`` pins the gradient accumulator to the parameters' shardings (fsdp).
    """

    def micro(params: Params, mb: dict[str, Array]) -> tuple[tuple[Array, Array], Params]:
        return jax.value_and_grad(
            lambda p: loss_sums(parts, p, mb, ce_chunk=ce_chunk), has_aux=True
        )(params)

    def step(
        params: Params, opt_state: Any, batch: dict[str, Array]
    ) -> tuple[Params, Any, dict[str, Array]]:
        def body(
            carry: tuple[Params, Array, Array], mb: dict[str, Array]
        ) -> tuple[tuple[Params, Array, Array], None]:
            g_sum, l_sum, n_sum = carry
            (loss, n), g = micro(params, mb)
            g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
            return (g_sum, l_sum + loss, n_sum + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if grad_sharding is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, dict(grad_sharding))
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (g_sum, l_sum, n_sum), _ = jax.lax.scan(body, init, batch)
        denom = jnp.maximum(n_sum, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": l_sum / denom, "grad_norm": grad_norm, "tokens": n_sum}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(schedule_count(opt_state)), jnp.float32)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    return step


class Trainer:
    """Sharded parameters + optimizer state and the compiled train step.

    Attributes:
        params: {HF name: array}, sharded by the partition rules.
        opt_state: the optax state, sharded like the parameters it mirrors.
    """

    def __init__(
        self,
        model: CausalLM,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        *,
        ce_chunk: int = 256,
        rules: Sequence[tuple[str, PartitionSpec]] = PARTITION_RULES,
        donate: bool = True,
        schedule: optax.Schedule | None = None,
        copy_params: bool = True,
    ):
        """Copies the model's parameters onto the mesh and builds the optimizer state.

        The model object itself is left untouched (its arrays are copied, never donated),
        unless ``copy_params=False``: then parameters that already have their target sharding
        (loaded with ``load_model(shardings=...)``) are taken over without a copy, and the
        caller must not use the model afterwards (the step donates those buffers).
        ``schedule``: the learning-rate schedule inside ``tx``; the step's metrics then
        carry ``lr`` (see :func:`make_step_fn`).
        """
        self.mesh, self.tx = mesh, tx
        self.parts, params = split_model(model)
        self.param_sharding = param_shardings({n: v.shape for n, v in params.items()}, mesh, rules)
        # A copy unless handed over (the step donates these buffers). With several processes
        # each copies the blocks of its own devices.
        self.params: Params = multihost.put_global(params, self.param_sharding, copy=copy_params)
        rep = replicated(mesh)
        self.opt_sharding = optax.tree_utils.tree_map_params(
            tx,
            lambda _, s: s,
            jax.eval_shape(tx.init, self.params),
            self.param_sharding,
            transform_non_params=lambda _: rep,
        )
        self.opt_state = jax.jit(tx.init, out_shardings=self.opt_sharding)(self.params)
        self.batch_sharding = train_batch_sharding(mesh)
        self._step = jax.jit(
            make_step_fn(
                self.parts,
                tx,
                ce_chunk=ce_chunk,
                grad_sharding=self.param_sharding,
                schedule=schedule,
            ),
            in_shardings=(self.param_sharding, self.opt_sharding, self.batch_sharding),
            out_shardings=(self.param_sharding, self.opt_sharding, rep),
            donate_argnums=(0, 1) if donate else (),
        )

    def local_rows(self, rows: int) -> np.ndarray | None:
        """[local rows] the rows of a micro-batch of ``rows`` rows that this process's devices
        hold (the rows it collates), sorted; None with a single process (every row)."""
        return multihost.local_rows(self.batch_sharding, rows)

    def put_batch(
        self, batch: Mapping[str, np.ndarray], rows: int | None = None
    ) -> dict[str, Array]:
        """Host arrays [accum, rows, seq] -> device arrays with rows split over the mesh.

        With several processes ``batch`` holds only this process's rows, those of
        :meth:`local_rows` ([accum, local rows, seq]), and ``rows`` is the global row count.

        Raises:
            ValueError: If the rows of a micro-batch do not split over the devices.
        """
        rows = batch["input_ids"].shape[1] if rows is None else rows
        n = num_devices(self.mesh)
        if rows % n:
            raise ValueError(
                f"a micro-batch of {rows} rows does not split over {n} devices; make the "
                "micro-batch size a multiple of the device count"
            )
        if not self.batch_sharding.is_fully_addressable:
            picked = {k: batch[k] for k in BATCH_KEYS}
            return multihost.put_local_batch(picked, self.batch_sharding, rows)
        return {k: jax.device_put(np.asarray(batch[k]), self.batch_sharding) for k in BATCH_KEYS}

    def step(self, batch: Mapping[str, np.ndarray], rows: int | None = None) -> dict[str, Array]:
        """One optimizer step on ``batch``; returns its metrics (device scalars, not fetched).

        ``rows``: the global rows of a micro-batch when ``batch`` holds this process's rows.
        """
        arrays = self.put_batch(batch, rows)
        with traced_on(self.mesh):
            self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, arrays)
        return metrics

    def model(self) -> CausalLM:
        """The model with the current parameters (shares their arrays)."""
        return merge_model(self.parts, self.params)

    def state(self) -> dict[str, Any]:
        """{"params", "opt_state"}: what a checkpoint saves."""
        return {"params": self.params, "opt_state": self.opt_state}

    def abstract_state(self) -> dict[str, Any]:
        """The state as sharded ``jax.ShapeDtypeStruct``s (a checkpoint restore target)."""

        def spec(x: Array, s: NamedSharding) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        return {
            "params": jax.tree.map(spec, self.params, self.param_sharding),
            "opt_state": jax.tree.map(spec, self.opt_state, self.opt_sharding),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replaces params and optimizer state (e.g. from a restored checkpoint)."""
        self.params = jax.device_put(state["params"], self.param_sharding)
        self.opt_state = jax.device_put(state["opt_state"], self.opt_sharding)

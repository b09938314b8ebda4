"""ResoFilter's "resonance" score: what ONE optimizer step on ONE example would do to chosen layers.

The published loop restores the weights, builds a fresh ``torch.optim.AdamW(lr=1e-5)`` per
sample, takes one step on that sample alone and measures ``mean |theta_before - theta_after|``
of the chosen matrices. The first AdamW step has a closed form, so only per-example gradients
of the chosen matrices are needed (computed batched with ``vmap(grad)``); the update and its
features are computed on device right after the gradient and only scalars leave the device.

**First AdamW step, checked against** ``torch/optim/adam.py::_single_tensor_adam`` (the CPU
path of ``AdamW``, which is ``Adam(decoupled_weight_decay=True)``), from ``m = v = 0``, step 1:

* ``param.mul_(1 - lr * wd)``                        -> ``theta * (1 - lr * wd)``
* ``exp_avg.lerp_(g, 1 - b1)``                       -> ``m = (1 - b1) g``
* ``exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)``     -> ``v = (1 - b2) g^2``
* ``denom = sqrt(v) / sqrt(1 - b2) + eps``           -> ``|g| + eps``
* ``param.addcdiv_(m, denom, -lr / (1 - b1))``       -> ``- lr g / (|g| + eps)``

so ``delta = theta_after - theta_before = -lr * (g / (|g| + eps) + wd * theta)``: the bias
corrections cancel and the betas drop out. ``adam`` (``torch.optim.Adam``, coupled L2 decay)
is the same with ``g <- g + wd * theta`` and no decoupled term; ``sgd`` is ``-lr (g + wd theta)``.

``delta`` is computed in fp32 from the closed form: no ``theta - theta'`` cancellation (in fp32
that difference carries ~ulp(theta) ~ 1e-8 of error on ~1e-5 changes).

Features, per example and chosen matrix, of ``delta`` (the update, ``theta_after -
theta_before``; the reference's ``before - after`` is ``-delta``): ``mean_abs`` (the reference's
``mean_diff``), ``std``/``std_abs`` (unbiased, ``n - 1``, as ``torch.std`` by default), ``max``,
``min``, ``l1``, ``l2``, ``cosine``/``pearson`` between theta and theta + delta plus
``cosine_gap``/``pearson_gap`` = 1 - those (computed without cancellation; the correlations
themselves round to 1.0 in fp32), quantiles of ``|delta|`` (linear interpolation, as
``torch.quantile``'s default) and counts of ``|delta| <= b``, ``delta > b``, ``delta < -b``.

With ``spec.projection`` set, the same pass also returns each example's fp32 gradient of the
chosen matrices, concatenated in ``spec.params`` order and randomly projected to K dims
(`resofilter_jax.scoring.projection`), as ``projection`` [B, K].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.registry import abstract_model, param_name
from resofilter_jax.parallel import replicate
from resofilter_jax.scoring.losses import chunked_token_ce
from resofilter_jax.scoring.param_select import layer_index, param_names
from resofilter_jax.scoring.projection import ProjectionSpec, project
from resofilter_jax.scoring.reso_features import (
    DTYPES,
    RULES,
    SCALARS,
    ResonanceSpec,
    feature_bytes,
    feature_names,
    features_in_turn,
    matrix_feature_names,
    matrix_features,
    update_delta,
)
from resofilter_jax.scoring.segment_grads import segment_grads, unsupported

Array = jax.Array

__all__ = [
    "RULES",
    "ProjectionSpec",
    "ResonanceFn",
    "ResonanceSpec",
    "example_bytes",
    "feature_names",
    "make_resonance_fn",
    "matrix_feature_names",
    "matrix_features",
    "max_slots",
    "microbatch_size",
    "param_shapes",
    "to_columns",
    "update_delta",
]


def example_bytes(
    model: CausalLM,
    spec: ResonanceSpec,
    seq_len: int,
    *,
    backward_layers: int | None = None,
    segments: int = 1,
) -> int:
    """Estimated device bytes of a step of one row (gradients, features, activations).

    Each further row of the step adds :func:`_row_bytes`; this adds what a step holds once.
    Per example (``segments`` S of them in a packed row, one unpacked): its fp32 gradient of
    the chosen matrices and its projection accumulator when ``spec.projection`` is set (the
    projection's shared block is not per row: see :func:`microbatch_size`). Per row: saved
    activations of the layers the backward pass crosses (~10 hidden- and 4
    intermediate-sized vectors per token and two [heads, L, L] attention maps per layer,
    plus one layer in flight), one chunk of fp32 logits with its cotangent and, packed, the
    segment-masked output gradient of the widest chosen matrix. Features
    (:func:`feature_bytes`): unpacked, every example of the step at once (per row); packed,
    the S slots of one row at once, rows in turn (once per step, with that row's gradients).
    """
    row = _row_bytes(model, spec, seq_len, backward_layers, segments)
    if segments == 1:
        return row
    n_chosen = sum(math.prod(shape) for shape in _chosen_shapes(model, spec))
    features = feature_bytes(_chosen_shapes(model, spec), len(spec.quantiles))
    return row + segments * (4 * n_chosen + features)


def _chosen_shapes(model: CausalLM, spec: ResonanceSpec) -> list[tuple[int, ...]]:
    shapes = param_shapes(model)
    return [shapes[p] for p in spec.params]


def _row_bytes(
    model: CausalLM,
    spec: ResonanceSpec,
    seq_len: int,
    backward_layers: int | None,
    segments: int,
) -> int:
    """Device bytes each row adds to a step (see :func:`example_bytes`)."""
    cfg = model.config
    chosen = _chosen_shapes(model, spec)
    n_chosen = sum(math.prod(shape) for shape in chosen)
    if backward_layers is None:
        backward_layers = _backward_layers(spec.params, cfg.num_hidden_layers)
    c = jnp.dtype(DTYPES[spec.compute_dtype]).itemsize
    per_layer = seq_len * (10 * cfg.hidden_size + 4 * cfg.intermediate_size) * c
    per_layer += 2 * cfg.num_attention_heads * seq_len * seq_len * c
    logits = 3 * min(spec.ce_chunk, seq_len) * cfg.vocab_size * 4
    per_example = 4 * n_chosen
    if spec.projection is not None:
        per_example += spec.projection.example_bytes()
    if segments == 1:  # the features of every example of the step at once
        per_example += feature_bytes(chosen, len(spec.quantiles))
    masked = 0
    if segments > 1:
        masked = segments * seq_len * max(max(shape) for shape in chosen) * c
    return segments * per_example + (backward_layers + 1) * per_layer + logits + masked


def _backward_layers(params: Sequence[str], num_layers: int) -> int:
    """How many decoder layers the backward pass crosses for these parameters."""
    idx = [layer_index(p) for p in params]
    if any(
        i is None and ("embed" in p or ".wte." in p or ".wpe." in p)
        for i, p in zip(idx, params, strict=True)
    ):
        return num_layers
    lowest = min((i for i in idx if i is not None), default=num_layers)
    return num_layers - lowest


def param_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    """HF name -> shape (the model's own layout) of every parameter."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {param_name(path): tuple(var.shape) for path, var in flat}


def microbatch_size(
    model: CausalLM, spec: ResonanceSpec, seq_len: int, rows: int, *, segments: int = 1
) -> int:
    """Rows per device per step (the projection's shared block comes off the budget): one
    row (:func:`example_bytes`), then as many as fit of :func:`_row_bytes` each.

    ``segments``: examples packed per row (1: unpacked, one example per row).
    """
    if spec.micro is not None:
        return max(1, min(spec.micro, rows))
    need = example_bytes(model, spec, seq_len, segments=segments)
    budget = spec.memory_budget_bytes
    if spec.projection is not None:
        budget -= spec.projection.fixed_bytes()
    if need > budget:
        what = "one example" if segments == 1 else f"one row of {segments} packed examples"
        raise ValueError(
            f"{what} needs about {need / 2**20:.1f} MiB at sequence length {seq_len} "
            f"(per-example gradients of {len(spec.params)} chosen parameters + activations) but "
            f"memory_budget_bytes is {spec.memory_budget_bytes / 2**20:.1f} MiB"
            + (" less the projection block" if spec.projection is not None else "")
            + "; raise the budget, shorten max_length or choose fewer / smaller parameters"
            + ("" if segments == 1 else ", or pack fewer examples per row")
        )
    more = (budget - need) // _row_bytes(model, spec, seq_len, None, segments)
    return max(1, min(rows, 1 + more))


def max_slots(model: CausalLM, spec: ResonanceSpec, seq_len: int, limit: int) -> int:
    """Most examples (at most ``limit``) one packed row of ``seq_len`` may hold within the
    per-device memory budget (0: not even one)."""
    budget = spec.memory_budget_bytes
    if spec.projection is not None:
        budget -= spec.projection.fixed_bytes()
    fits = [
        s for s in range(1, limit + 1) if example_bytes(model, spec, seq_len, segments=s) <= budget
    ]
    return max(fits, default=0)


class ResonanceFn:
    """Jitted ``batch -> per-example results`` for one model and spec.

    Call it with a collated batch (``input_ids``, ``attention_mask``, ``labels`` [B, L]); it
    returns ``score``, ``loss``, ``ppl`` [B] fp32, ``n_tokens`` [B] int32, every per-matrix
    feature as [B, n_params] (columns in ``spec.params`` order) and, with ``spec.projection``,
    ``projection`` [B, K] fp32. Rows without a label token (e.g. dummy padding rows) get NaN
    (floats) and -1 (counts).

    Packed rows (several examples per row, from :func:`resofilter_jax.data.collate_packed`
    with labels: ``attention_mask`` holds segment ids, plus ``positions``) are scored with
    ``fn(batch, slots=S)``: one backward pass per row gives every example's gradient
    (`resofilter_jax.scoring.segment_grads`), and the results are [B, S, ...], slot s of row
    b being the example with segment id s + 1 (empty slots: NaN / -1). Possible when
    :attr:`packable`; otherwise :attr:`unpackable` names the parameters in the way.
    """

    def __init__(self, model: CausalLM, spec: ResonanceSpec, *, data_shards: int = 1):
        known = set(param_names(model))
        missing = [p for p in spec.params if p not in known]
        if missing:
            raise ValueError(f"the model has no parameter(s) {missing}")
        self.spec, self.model, self.data_shards = spec, model, data_shards
        self.unpackable = unsupported(model, spec.params)
        chosen = set(spec.params)

        def is_chosen(path: tuple, _: Any) -> bool:
            return param_name(path) in chosen

        graphdef, theta, rest = nnx.split(model, is_chosen, ...)
        cdt = DTYPES[spec.compute_dtype]
        if cdt != jnp.float32:  # same tree, built with the low-precision compute dtype
            low = abstract_model(model.config, dtype=cdt, param_dtype=cdt)
            low.attention = getattr(model, "attention", "reference")  # the resolved backend
            graphdef = nnx.split(low, is_chosen, ...)[0]
            rest = jax.tree.map(
                lambda x: _cast(x, cdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, rest
            )
        self._theta = jax.tree.map(lambda x: _cast(x, jnp.float32), theta)
        self._shapes = {p: tuple(v.shape) for p, v in _by_name(self._theta).items()}
        self._rest = rest
        self._graphdef = graphdef
        self._jitted = jax.jit(self._batch, static_argnames="slots")

    def place(self, mesh: Mesh) -> ResonanceFn:
        """Puts the weights on every device of ``mesh`` once (replicated), so that calls with a
        batch sharded over the mesh move only the batch. Returns self."""
        self._theta = replicate(self._theta, mesh)
        self._rest = replicate(self._rest, mesh)
        return self

    @property
    def packable(self) -> bool:
        """Whether packed rows can be scored (every chosen parameter is supported)."""
        return not self.unpackable

    def __call__(self, batch: dict[str, Any], slots: int | None = None) -> dict[str, Array]:
        return self._jitted(self._theta, self._rest, self._inputs(batch, slots), slots=slots)

    def lower(self, batch: dict[str, Any], slots: int | None = None) -> Any:
        """``jax.jit(...).lower`` for this batch (cost analysis, AOT compile)."""
        return self._jitted.lower(self._theta, self._rest, self._inputs(batch, slots), slots=slots)

    def _inputs(self, batch: dict[str, Any], slots: int | None) -> dict[str, Array]:
        keys = ("input_ids", "attention_mask", "labels")
        if slots is not None:
            if self.unpackable:
                raise ValueError(
                    f"packed rows need per-token parameters; {self.unpackable} are not "
                    "(embedding tables, the LM head): score them unpacked"
                )
            if slots < 1:
                raise ValueError(f"slots must be >= 1, got {slots}")
            keys += ("positions",)
        if all(isinstance(batch[k], jax.ShapeDtypeStruct) for k in keys):  # lowering only
            return {k: batch[k] for k in keys}
        seg = batch["attention_mask"]
        if slots is not None and isinstance(seg, np.ndarray) and seg.size and seg.max() > slots:
            raise ValueError(f"a row holds {seg.max()} segments, more than slots={slots}")
        return {k: jnp.asarray(batch[k], jnp.int32) for k in keys}

    def _example(
        self, theta: nnx.State, rest: nnx.State, ids: Array, mask: Array, labels: Array
    ) -> dict[str, Array]:
        """Loss, gradient and features of one example (ids, mask, labels [L])."""
        spec, cdt = self.spec, DTYPES[self.spec.compute_dtype]
        valid = (labels[1:] != IGNORE_INDEX).astype(jnp.float32)  # [L-1]; label t from t-1
        targets = jnp.where(labels[1:] == IGNORE_INDEX, 0, labels[1:])  # [L-1]

        def loss_fn(th: nnx.State) -> tuple[Array, Array]:
            model = nnx.merge(self._graphdef, jax.tree.map(lambda x: x.astype(cdt), th), rest)
            hidden = model.hidden_states(ids[None], mask[None])[0]  # [L, H]
            ce = chunked_token_ce(
                hidden[:-1],
                model.output_embedding(),
                targets,
                dtype=model.dtype,
                softcap=model.config.final_logit_softcapping,
                chunk=spec.ce_chunk,
                scored=valid,
            )  # [L-1], 0 where not valid
            n = jnp.sum(valid)
            return jnp.sum(ce * valid) / jnp.maximum(n, 1.0), n

        (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        out = self._features(_by_name(theta), _by_name(grads))
        out["loss"], out["n_tokens"] = loss, n.astype(jnp.int32)
        return out

    def _matrix_features(self, th: dict[str, Array], gr: dict[str, Array]) -> dict[str, Array]:
        """Per-matrix features [n_params] of one example's gradients."""
        per: dict[str, dict[str, Array]] = {}
        for ps in _shape_groups(self.spec.params, self._shapes):  # one loop body per shape
            f = features_in_turn([th[p] for p in ps], [gr[p] for p in ps], self.spec)  # [k] each
            per.update({p: {k: v[i] for k, v in f.items()} for i, p in enumerate(ps)})
        feats = [per[p] for p in self.spec.params]
        return {k: jnp.stack([f[k] for f in feats]) for k in feats[0]}  # [n_params] each

    def _projection(self, gr: dict[str, Array]) -> Array:
        """[K] projection of one example's fp32 gradients (documented order); ``vmap`` it:
        the projection matrix is generated once for the whole batch."""
        assert self.spec.projection is not None
        return project([gr[p] for p in self.spec.params], self.spec.projection)

    def _features(self, th: dict[str, Array], gr: dict[str, Array]) -> dict[str, Array]:
        """Per-matrix features [n_params] (+ ``projection`` [K]) of one example's gradients."""
        out = self._matrix_features(th, gr)
        if self.spec.projection is not None:
            out["projection"] = self._projection(gr)
        return out

    def _packed_rows(
        self, theta: nnx.State, rest: nnx.State, rows: dict[str, Array], slots: int
    ) -> dict[str, Array]:
        """Results [m, S, ...] of the examples in m packed rows (one backward pass).

        Features: the S slots of a row at once (``vmap``), rows in turn (a row's feature
        temporaries, S times those of one example, are all a step holds of them), rows without
        an example skipped. Projections: every slot of the m rows at once, so the projection
        matrix is generated once per step. Empty slots are computed (zero gradients: finite
        results) and masked to the empty result 0.
        """
        cdt = DTYPES[self.spec.compute_dtype]
        theta_c = jax.tree.map(lambda x: x.astype(cdt), theta)
        grads, loss_sum, n = segment_grads(
            lambda: nnx.merge(self._graphdef, theta_c, rest),
            self.spec.params,
            self._shapes,
            rows,
            slots,
            ce_chunk=self.spec.ce_chunk,
        )  # [m, S, *shape] each; [m, S]
        m = loss_sum.shape[0]
        th = _by_name(theta)
        used = n > 0  # [m, S]
        slot_features = jax.vmap(self._matrix_features, in_axes=(None, 0))  # [S, ...] each
        empty = jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype),
            jax.eval_shape(slot_features, th, {p: g[0] for p, g in grads.items()}),
        )

        def row(x: tuple[dict[str, Array], Array]) -> dict[str, Array]:
            g, ok = x  # [S, *shape] each, [S]
            return jax.lax.cond(jnp.any(ok), lambda: slot_features(th, g), lambda: empty)

        out = jax.lax.map(row, (grads, used))  # [m, S, ...]
        if self.spec.projection is not None:
            flat = {p: g.reshape(m * slots, *g.shape[2:]) for p, g in grads.items()}  # [m * S, ...]
            proj = jax.vmap(self._projection)(flat)  # [m * S, K]
            out["projection"] = proj.reshape(m, slots, -1)

        def empty_masked(v: Array) -> Array:  # [m, S, ...]
            ok = used.reshape(used.shape + (1,) * (v.ndim - 2))
            return jnp.where(ok, v, jnp.zeros((), v.dtype))

        out = jax.tree.map(empty_masked, out)
        out["loss"] = loss_sum / jnp.maximum(n, 1.0)
        out["n_tokens"] = n.astype(jnp.int32)
        return out

    def _batch(
        self,
        theta: nnx.State,
        rest: nnx.State,
        batch: dict[str, Array],
        slots: int | None = None,
    ) -> dict[str, Array]:
        """Per-example results of a [B, L] batch in ceil(B / micro) steps of ``micro`` rows.

        Unpacked (``slots`` None): ``vmap(grad)``, one example per row, results [B, ...].
        Packed (``slots`` = S segments per row): one backward pass per step, results
        [B, S, ...].
        """
        ids = batch["input_ids"]
        bsz, seq = ids.shape
        shards = self.data_shards
        if bsz % shards:
            raise ValueError(f"batch of {bsz} rows does not split over {shards} data shards")
        rows = bsz // shards
        m = microbatch_size(self.model, self.spec, seq, rows, segments=slots or 1)
        steps = -(-rows // m)
        m = -(-rows // steps)  # as many steps, the fewest padding rows (each costs a backward)
        pad = steps * m - rows

        def to_steps(x: Array) -> Array:  # [B, ...] -> [steps, shards * m, ...]
            x = x.reshape(shards, rows, *x.shape[1:])
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            x = x.reshape(shards, steps, m, *x.shape[2:]).swapaxes(0, 1)
            return x.reshape(steps, shards * m, *x.shape[3:])

        def from_steps(x: Array) -> Array:  # [steps, shards * m, ...] -> [B, ...]
            x = x.reshape(steps, shards, m, *x.shape[2:]).swapaxes(0, 1)
            return x.reshape(shards, steps * m, *x.shape[3:])[:, :rows].reshape(bsz, *x.shape[3:])

        if slots is None:
            vmapped = jax.vmap(self._example, in_axes=(None, None, 0, 0, 0))

            def one(x: dict[str, Array]) -> dict[str, Array]:
                return vmapped(theta, rest, x["input_ids"], x["attention_mask"], x["labels"])
        else:

            def one(x: dict[str, Array]) -> dict[str, Array]:
                return self._packed_rows(theta, rest, x, slots)

        xs = {k: to_steps(v) for k, v in batch.items()}
        if steps == 1:
            out = jax.tree.map(lambda y: y[None], one({k: v[0] for k, v in xs.items()}))
        else:
            out = jax.lax.map(one, xs)
        out = jax.tree.map(from_steps, out)
        return _finish(out, self.spec)


def _shape_groups(params: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """``params`` grouped by shape (first-seen order)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for p in params:
        groups.setdefault(tuple(shapes[p]), []).append(p)
    return list(groups.values())


def _cast(x: Any, dtype: jnp.dtype) -> Any:
    """``x.astype(dtype)``; for an abstract model (dry run) a ShapeDtypeStruct of ``dtype``."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


def _by_name(state: nnx.State) -> dict[str, Array]:
    return {param_name(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def _finish(out: dict[str, Array], spec: ResonanceSpec) -> dict[str, Array]:
    """Adds score and ppl; NaN / -1 on rows without label tokens."""
    ok = out["n_tokens"] > 0  # [B] (packed: [B, S])
    x = out[spec.score_feature].astype(jnp.float32)  # [B, (S,) n_params]
    agg = {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}[spec.aggregate]
    out["score"] = agg(x, axis=-1)
    out["ppl"] = jnp.exp(out["loss"])
    for k, v in out.items():
        if k == "n_tokens":
            continue
        mask = ok.reshape(ok.shape + (1,) * (v.ndim - ok.ndim))
        bad = jnp.nan if jnp.issubdtype(v.dtype, jnp.floating) else -1
        out[k] = jnp.where(mask, v, bad)
    return out


def make_resonance_fn(
    model: CausalLM, spec: ResonanceSpec, *, data_shards: int = 1
) -> Callable[[dict[str, Any]], dict[str, Array]]:
    """A jitted ``batch -> results`` function (see :class:`ResonanceFn`).

    Args:
        model: The causal LM (its parameters are held by the function).
        spec: The parameters and update rule.
        data_shards: Devices the batch axis is split over; each step then takes ``micro``
            rows from every shard, so per-example work stays on its device.
    """
    return ResonanceFn(model, spec, data_shards=data_shards)


def to_columns(out: dict[str, Any], spec: ResonanceSpec) -> dict[str, np.ndarray]:
    """Host columns named as :func:`feature_names` (each [B]) from a result dict."""
    host = jax.device_get(out)
    cols = {k: np.asarray(host[k]) for k in SCALARS}
    for j, p in enumerate(spec.params):
        for f in matrix_feature_names(spec):
            cols[f"reso/{p}/{f}"] = np.asarray(host[f])[:, j]
    return cols

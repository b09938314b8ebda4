"""Per-example gradients of chosen parameters from ONE backward pass over packed rows.

A packed row holds several examples end to end (segment ids in ``attention_mask``, positions
restarting per segment, a block-diagonal causal mask), so no token of one example sees
another. The gradient of a parameter used token by token is a sum over tokens,
``dL/dW = sum_t delta_t x_t^T`` for a linear map, and an example's gradient is that sum over
its own tokens only. One backward pass of ``sum_k L_k`` (L_k: example k's mean loss) over the
packed rows therefore carries every example's gradient; it only has to be split by segment
where it is summed:

* **Matrices** of ``Linear`` / ``Conv1D`` (weight [out, in] / [in, out]): the module is wrapped
  so the matmul is a ``custom_vjp`` whose backward pass returns, for a zero "probe" of shape
  [rows, S, *weight], ``probe_grad[b, k] = sum_{t in segment k+1 of row b} dy_t x_t^T`` (one
  batched matmul of the segment-masked output gradient with the input), besides the usual
  input gradient. The forward pass is the module's own matmul; the probe is never read.
* **Vectors** (biases, RMSNorm / LayerNorm weights): the module runs with a per-token copy
  ``w + probe[b, seg(t)]`` ([rows, seq, dim], equal to ``w`` since the probe is zero), whose
  gradient with respect to the probe is the per-segment sum.

Gradients are taken with respect to the probes only, so the backward pass starts at the loss
and stops at the lowest chosen layer, as with ``vmap(grad)`` over unpacked examples, but padded
positions, which ``vmap`` spends on every short example, are gone. The extra cost is the
segment-masked weight gradient: S times a layer's weight-gradient matmul for S segment slots.

Embedding tables and the LM head are not token-by-token linear maps of a module input;
:func:`unsupported` names such parameters and the caller falls back to ``vmap(grad)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.models import precision
from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.layers import Conv1D, LayerNorm, Linear, RMSNorm
from resofilter_jax.scoring.losses import chunked_token_ce

Array = jax.Array

__all__ = ["segment_grads", "segment_onehot", "unsupported"]

_MATRIX_MODULES = (Linear, Conv1D)
_VECTOR_MODULES = (Linear, Conv1D, RMSNorm, LayerNorm)


def _child(obj: Any, key: Any) -> Any:
    return obj[key] if isinstance(key, int) else getattr(obj, key)


def _owner(model: nnx.Module, name: str) -> tuple[Any, Any, nnx.Module, str]:
    """(parent module, key of the module in it, the module, parameter attribute) of ``name``."""
    path = [int(p) if p.isdigit() else p for p in name.split(".")]
    parent: Any = model
    for key in path[:-2]:
        parent = _child(parent, key)
    return parent, path[-2], _child(parent, path[-2]), str(path[-1])


def unsupported(model: CausalLM, params: Sequence[str]) -> list[str]:
    """The chosen parameters whose per-example gradient cannot come from packed rows.

    Supported: weights and biases of ``Linear`` / ``Conv1D`` modules applied to token states
    (not the LM head, which is read as a matrix), and RMSNorm / LayerNorm vectors.
    """
    bad = []
    head = getattr(model, "lm_head", None)
    for p in params:
        try:
            _, _, module, attr = _owner(model, p)
        except (AttributeError, IndexError, KeyError, TypeError):
            bad.append(p)
            continue
        var = getattr(module, attr, None)
        if module is head or not isinstance(var, nnx.Param):
            bad.append(p)
        elif var.ndim == 2 and isinstance(module, _MATRIX_MODULES) and attr == "weight":
            continue
        elif var.ndim == 1 and isinstance(module, _VECTOR_MODULES):
            continue
        else:
            bad.append(p)
    return bad


def segment_onehot(segment_ids: Array, slots: int, dtype: jnp.dtype) -> Array:
    """[rows, seq, slots] with 1 where a token belongs to segment ``slot + 1`` (0 = padding)."""
    return (segment_ids[..., None] == jnp.arange(1, slots + 1)).astype(dtype)


def _matmul(x: Array, w: Array, conv: bool) -> Array:
    """x [b, l, in] times a Linear ([out, in]) or Conv1D ([in, out]) weight -> [b, l, out]."""
    return precision.einsum("bli,io->blo" if conv else "bli,oi->blo", x, w, dtype=x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _probed_matmul(x: Array, w: Array, probe: Array, onehot: Array, conv: bool) -> Array:
    """``x @ w`` whose gradient w.r.t. ``probe`` [b, S, *w.shape] is the per-segment dW."""
    del probe, onehot
    return _matmul(x, w, conv)


def _probed_fwd(
    x: Array, w: Array, probe: Array, onehot: Array, conv: bool
) -> tuple[Array, tuple[Array, Array, Array]]:
    del probe
    return _matmul(x, w, conv), (x, w, onehot)


def _probed_bwd(
    conv: bool, res: tuple[Array, Array, Array], dy: Array
) -> tuple[Array, Array, Array, Array]:
    x, w, onehot = res  # x [b, l, in], w, onehot [b, l, S]; dy [b, l, out]
    dy = dy.astype(x.dtype)  # the contract's backward: compute-dtype operands, fp32 accumulation
    dx = precision.einsum("blo,io->bli" if conv else "blo,oi->bli", dy, w, dtype=x.dtype)
    dys = onehot.astype(dy.dtype)[..., None] * dy[:, :, None, :]  # [b, l, S, out]
    spec = "blso,bli->bsio" if conv else "blso,bli->bsoi"
    dw = precision.einsum(spec, dys, x, dtype=x.dtype, out_dtype=jnp.float32)  # [b, S, *w]
    return dx, jnp.zeros_like(w), dw, jnp.zeros_like(onehot)


_probed_matmul.defvjp(_probed_fwd, _probed_bwd)


class _Probed:
    """A Linear / Conv1D / norm module run with the probes of its chosen parameters."""

    def __init__(self, module: nnx.Module, probes: dict[str, Array], onehot: Array):
        self.module, self.probes, self.onehot = module, probes, onehot

    def _per_token(self, attr: str, ndim: int) -> nnx.Param:
        """``w + probe[b, seg(t)]`` shaped [b, l, 1 ..., dim] for an input of rank ``ndim``."""
        w = getattr(self.module, attr)[...]  # [dim]
        per = w + jnp.einsum("bls,bsd->bld", self.onehot.astype(w.dtype), self.probes[attr])
        b, seq, dim = per.shape
        return nnx.Param(per.reshape(b, seq, *([1] * (ndim - 3)), dim))

    def __call__(self, x: Array) -> Array:
        m = self.module
        matrix = "weight" in self.probes and isinstance(m, _MATRIX_MODULES)
        saved = {a: getattr(m, a) for a in self.probes if not (matrix and a == "weight")}
        try:
            for attr in saved:
                setattr(m, attr, self._per_token(attr, x.ndim))
            if not matrix:
                return m(x)
            conv = isinstance(m, Conv1D)
            w = m.weight[...].astype(m.dtype)
            y = _probed_matmul(x.astype(m.dtype), w, self.probes["weight"], self.onehot, conv)
            if m.bias is not None:
                y = y + m.bias[...].astype(m.dtype)  # [out] or per token [b, l, out]
            return y
        finally:
            for attr, var in saved.items():
                setattr(m, attr, var)


def segment_grads(
    make_model: Callable[[], CausalLM],
    params: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    batch: dict[str, Array],
    slots: int,
    *,
    ce_chunk: int = 128,
) -> tuple[dict[str, Array], Array, Array]:
    """Every example's fp32 gradient of ``params`` from one pass over packed rows.

    Args:
        make_model: Returns a freshly merged model (called inside the differentiated
            function, where the chosen modules are rewired to their probes).
        params: HF names, all supported (see :func:`unsupported`).
        shapes: HF name -> parameter shape.
        batch: ``input_ids``, ``attention_mask`` (segment ids, 0 = padding), ``positions``,
            ``labels`` [rows, seq] int32; labels are IGNORE_INDEX where not trained on.
        slots: S, segments per row (segment ids above S are not allowed).
        ce_chunk: Sequence chunk of the cross-entropy.

    Returns:
        (grads, loss_sum, n_tokens): per parameter [rows, S, *shape] fp32 gradients of each
        example's mean loss; [rows, S] summed CE and scored tokens per segment (0 for an empty
        slot, whose gradient is 0). Token t counts when its label is set and t - 1 lies in
        the same segment.
    """
    ids, seg, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    onehot = segment_onehot(seg, slots, jnp.float32)  # [b, l, S]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)  # [b, l-1] predicted in-segment
    valid = ((labels[:, 1:] != IGNORE_INDEX) & same).astype(jnp.float32)  # [b, l-1]
    targets = jnp.where(labels[:, 1:] == IGNORE_INDEX, 0, labels[:, 1:])  # [b, l-1]
    target_seg = onehot[:, 1:]  # [b, l-1, S]
    n_tokens = jnp.einsum("bt,bts->bs", valid, target_seg)  # [b, S]
    inv_n = 1.0 / jnp.maximum(n_tokens, 1.0)  # [b, S]
    weight = valid * jnp.einsum("bts,bs->bt", target_seg, inv_n)  # [b, l-1]: 1/n_k on k's tokens
    rows = ids.shape[0]
    probes = {p: jnp.zeros((rows, slots, *shapes[p]), jnp.float32) for p in params}

    def total_loss(probes: dict[str, Array]) -> tuple[Array, Array]:
        model = make_model()
        cdt = model.dtype
        by_module: dict[int, tuple[Any, Any, nnx.Module, dict[str, Array]]] = {}
        for p in params:
            parent, key, module, attr = _owner(model, p)
            by_module.setdefault(id(module), (parent, key, module, {}))[3][attr] = probes[p]
        for parent, key, module, attr_probes in by_module.values():
            wrapped = _Probed(module, attr_probes, onehot.astype(cdt))
            if isinstance(key, int):
                parent[key] = wrapped
            else:
                setattr(parent, key, wrapped)
        hidden = model.hidden_states(ids, seg, batch["positions"])  # [b, l, H]
        ce = chunked_token_ce(
            hidden[:, :-1],
            model.output_embedding(),
            targets,
            dtype=cdt,
            softcap=model.config.final_logit_softcapping,
            chunk=ce_chunk,
            scored=valid,
        )  # [b, l-1], 0 where not valid
        return jnp.sum(ce * weight), ce * valid

    grads, ce = jax.grad(total_loss, has_aux=True)(probes)
    loss_sum = jnp.einsum("bt,bts->bs", ce, target_seg)  # [b, S]
    return grads, loss_sum, n_tokens

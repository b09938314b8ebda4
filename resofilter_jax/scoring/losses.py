"""Per-sequence next-token cross-entropy without materialising [batch, seq, vocab] fp32 logits."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from resofilter_jax.models import precision
from resofilter_jax.models.base import CausalLM

Array = jax.Array


def chunked_token_ce(
    hidden: Array,
    weight: Array,
    targets: Array,
    *,
    dtype: jnp.dtype,
    softcap: float | None = None,
    chunk: int = 128,
    scored: Array | None = None,
) -> Array:
    """Cross-entropy of `targets` under logits = hidden @ weight.T, one chunk of tokens at a time.

    Logits of one chunk ([rows, chunk, vocab]) exist at a time, also under `grad`: the matmul
    runs in `dtype` with fp32 accumulation, and soft-capping, logsumexp and the loss are fp32.
    Under differentiation each chunk's forward also computes the gradient of every token's
    loss with respect to its own hidden state (:func:`_ce_fwd`), so the backward pass needs no
    logits for `hidden`'s gradient, and recomputes them only where `weight` is differentiated.
    With `scored`, only the scored tokens are computed (:func:`_layout`); the others are 0.

    Args:
        hidden: [..., seq, hidden] states that predict `targets`.
        weight: [vocab, hidden] LM head.
        targets: [..., seq] int token ids.
        scored: [..., seq], nonzero where the loss is wanted (default: everywhere).
    Returns:
        [..., seq] fp32 per-token cross-entropy.
    """
    lay = _layout(targets.shape, chunk, scored)
    h_chunks, t_chunks = _to_chunks(hidden, lay, tail=1), _to_chunks(targets, lay)
    ce = _chunked_ce(jnp.dtype(dtype), softcap, h_chunks, weight, t_chunks, lay.active)
    ce = _from_chunks(ce, lay)  # [..., seq]
    return ce if scored is None else jnp.where(scored != 0, ce, 0.0)


def chunked_ce_sum(
    hidden: Array,
    weight: Array,
    targets: Array,
    weights: Array,
    *,
    dtype: jnp.dtype,
    softcap: float | None = None,
    chunk: int = 128,
) -> Array:
    """``sum(weights * chunked_token_ce(hidden, weight, targets))``: one fp32 scalar (a loss).

    Because the result is a scalar, its whole gradient is computed in the forward pass and
    the backward pass only scales it (:func:`_ce_sum_fwd`): each chunk's logits serve the
    loss, the hidden states' gradient and the LM head's, three LM-head-sized products and one
    softmax per chunk, against four and two when a per-token cotangent makes the weight's
    gradient recompute the logits (:func:`chunked_token_ce` under autodiff). Tokens of weight
    0 are not computed (unless `weights` itself is differentiated).

    Args:
        hidden: [..., seq, hidden]; weight: [vocab, hidden]; targets: [..., seq] int;
        weights: [..., seq] float, each token's weight in the sum (0 drops it).
    Returns:
        fp32 scalar.
    """
    lay = _layout(targets.shape, chunk, weights != 0)
    h_chunks, t_chunks = _to_chunks(hidden, lay, tail=1), _to_chunks(targets, lay)
    w_chunks = _to_chunks(weights.astype(jnp.float32), lay)  # [n, g, c], 0 on padding
    return _chunked_ce_sum(
        jnp.dtype(dtype), softcap, h_chunks, weight, t_chunks, w_chunks, lay.active
    )


class _Layout(NamedTuple):
    """Where each token goes in the chunks [n, groups, size] the CE loops over.

    The tokens of each group of rows (the rows of one device when a mesh is being traced on,
    all rows otherwise) are laid end to end, the scored ones first (a stable sort), and cut
    into n chunks of `size` tokens; only the first `active` chunks hold scored tokens, and the
    loops stop there. In a batch of SFT rows right-padded to 512 with ~25% of the positions
    scored (GSM8K), 3 of 4 LM-head products and softmax passes go; the permutation's gathers
    are [tokens, hidden]."""

    shape: tuple[int, ...]  # [..., seq] of the tokens
    groups: int
    size: int  # tokens per group and chunk
    n: int
    order: Array | None  # [groups, tokens per group]: chunk slot -> token (None: identity)
    inverse: Array | None  # token -> chunk slot
    active: Array  # int32 scalar


def _row_groups(rows: int) -> int:
    """Groups of rows sorted apart: the devices of the mesh being traced on
    (``parallel.traced_on``), so that a batch sharded over them is sorted where it lives; 1
    without a mesh (or when the rows do not split evenly)."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else mesh.size
    return devices if rows % devices == 0 else 1


def _layout(shape: tuple[int, ...], chunk: int, scored: Array | None) -> _Layout:
    """The chunk layout of tokens of `shape` [..., seq] (:class:`_Layout`)."""
    *lead, s = shape
    rows = math.prod(lead)
    groups = _row_groups(rows) if scored is not None else 1
    per_group = rows // groups * s
    size = rows // groups * min(chunk, s)
    n = -(-per_group // size)
    if scored is None:
        return _Layout(tuple(shape), groups, size, n, None, None, jnp.asarray(n, jnp.int32))
    keep = scored.reshape(groups, per_group) != 0
    order = jnp.argsort(~keep, axis=-1, stable=True)  # scored tokens first, in order
    slots = jnp.broadcast_to(jnp.arange(per_group, dtype=order.dtype), order.shape)
    inverse = jnp.zeros_like(order).at[jnp.arange(groups)[:, None], order].set(slots)
    count = jnp.max(jnp.sum(keep, axis=-1))
    active = ((count + size - 1) // size).astype(jnp.int32)
    return _Layout(tuple(shape), groups, size, n, order, inverse, active)


@jax.custom_vjp
def _permute(x: Array, order: Array, inverse: Array) -> Array:
    """x [g, t, ...] with its tokens reordered: ``x[:, order]`` (a gather both ways; autodiff
    would scatter-add the cotangent)."""
    return jnp.take_along_axis(x, order.reshape(*order.shape, *(1,) * (x.ndim - 2)), axis=1)


def _permute_fwd(x: Array, order: Array, inverse: Array) -> tuple[Array, tuple[Array, Array]]:
    return _permute(x, order, inverse), (order, inverse)


def _permute_bwd(res: tuple[Array, Array], ct: Array) -> tuple[Array, None, None]:
    order, inverse = res
    return _permute(ct, inverse, order), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _to_chunks(x: Array, lay: _Layout, *, tail: int = 0) -> Array:
    """x [..., seq, *tail] -> [n, groups, size, *tail] in the layout's order, zero-padded."""
    rest = x.shape[x.ndim - tail :]
    x = x.reshape(lay.groups, -1, *rest)  # [g, tokens per group, *tail]
    if lay.order is not None:
        x = _permute(x, lay.order, lay.inverse)
    pad = lay.n * lay.size - x.shape[1]
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * tail)
    return x.reshape(lay.groups, lay.n, lay.size, *rest).swapaxes(0, 1)


def _from_chunks(y: Array, lay: _Layout) -> Array:
    """y [n, groups, size] -> [..., seq] in the tokens' own order."""
    y = y.swapaxes(0, 1).reshape(lay.groups, lay.n * lay.size)
    y = y[:, : math.prod(lay.shape) // lay.groups]
    if lay.order is not None:
        y = _permute(y, lay.inverse, lay.order)
    return y.reshape(lay.shape)


def _logits(hc: Array, weight: Array, dtype: jnp.dtype, softcap: float | None) -> Array:
    """fp32 logits [b, c, vocab] of one chunk hc [b, c, hidden] (soft-capped if asked)."""
    logits = precision.einsum("bcd,vd->bcv", hc, weight, dtype=dtype, out_dtype=jnp.float32)
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def _chunk_ce(
    hc: Array, weight: Array, tc: Array, dtype: jnp.dtype, softcap: float | None
) -> Array:
    """Per-token CE [b, c] of one chunk."""
    return _ce_of_logits(_logits(hc, weight, dtype, softcap), tc)[0]


def _dlogits(logits: Array, lse: Array, tc: Array, softcap: float | None) -> Array:
    """d ce / d (pre-soft-cap logits) [b, c, vocab] = (softmax - onehot) [* softcap'], fp32."""
    dlogits = jnp.exp(logits - lse[..., None])  # softmax [b, c, vocab]
    dlogits = dlogits - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
    if softcap is not None:  # d(tanh(z / cap) * cap) / dz = 1 - (logits / cap)**2
        dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
    return dlogits


def _ce_of_logits(logits: Array, tc: Array) -> tuple[Array, Array]:
    """(CE [b, c], logsumexp [b, c]) of fp32 logits [b, c, vocab] and targets tc [b, c]."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, c]
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]  # [b, c]
    return lse - picked, lse


def _chunk_grads(
    hc: Array,
    w_c: Array,
    tc: Array,
    wc: Array | None,
    dtype: jnp.dtype,
    softcap: float | None,
    *,
    hidden: bool,
    head: bool,
) -> tuple[Array, Array | None, Array | None]:
    """One chunk's CE [b, c] and the gradients of ``sum(wc * ce)`` (wc None: every token's own,
    weight 1) with respect to hc ([b, c, hidden] fp32, if `hidden`) and the head ([hidden,
    vocab] fp32, transposed, if `head`), from the chunk's own logits: ``dlogits @ W`` and
    ``hc.T @ dlogits`` (the CPU's fast form of the latter: ``precision.weight_gradient``)."""
    logits = _logits(hc, w_c, dtype, softcap)  # [b, c, vocab]
    ce, lse = _ce_of_logits(logits, tc)  # [b, c] each
    dlogits = _dlogits(logits, lse, tc, softcap)  # [b, c, vocab]
    if wc is not None:
        dlogits = dlogits * wc[..., None]
    dh = dw_t = None
    if hidden:
        dh = precision.einsum("bcv,vd->bcd", dlogits, w_c, dtype=dtype, out_dtype=jnp.float32)
    if head:
        d, vocab = hc.shape[-1], w_c.shape[0]
        dw_t = precision.weight_gradient(hc.reshape(-1, d), dlogits.reshape(-1, vocab), dtype=dtype)
    return ce, dh, dw_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_ce(
    dtype: jnp.dtype,
    softcap: float | None,
    h_chunks: Array,
    weight: Array,
    t_chunks: Array,
    active: Array,
) -> Array:
    """CE [n, g, c] of chunks h_chunks [n, g, c, hidden], t_chunks [n, g, c]; 0 in chunks
    from `active` on."""

    def step(i: Array, ce: Array) -> Array:
        return ce.at[i].set(_chunk_ce(h_chunks[i], weight, t_chunks[i], dtype, softcap))

    return jax.lax.fori_loop(0, active, step, jnp.zeros(t_chunks.shape, jnp.float32))


def _ce_fwd(
    dtype: jnp.dtype,
    softcap: float | None,
    h_chunks: Any,
    weight: Any,
    t_chunks: Any,
    active: Any,
):
    """The CE and, where `hidden` is differentiated, each token's own gradient
    ``d ce[t] / d hidden[t] = (softmax - onehot) [* softcap'] @ weight`` ([n, g, c, hidden],
    fp32): ce[t] depends on no other position, so the backward pass only scales it by the
    cotangent. The autodiff form (logits recomputed in the backward pass) spent a third LM-head
    GEMM and a second softmax pass on it: ~16% of the packed resonance step on a 2-core Zen 4
    (BENCHMARKS.md)."""
    hs, w, ts, count = h_chunks.value, weight.value, t_chunks.value, active.value
    # the weight's gradient needs the inputs again; hidden's dtype travels as an empty array
    inputs = (hs, w, ts, count) if weight.perturbed else None
    h_dtype = jnp.zeros((0,), hs.dtype)
    if not h_chunks.perturbed:
        return _chunked_ce(dtype, softcap, hs, w, ts, count), (None, h_dtype, inputs)
    w_c = w.astype(dtype)  # the head in the compute dtype once, not per chunk

    def step(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        ce, dh = carry
        c, d, _ = _chunk_grads(hs[i], w_c, ts[i], None, dtype, softcap, hidden=True, head=False)
        return ce.at[i].set(c), dh.at[i].set(d)

    init = (jnp.zeros(ts.shape, jnp.float32), jnp.zeros(hs.shape, jnp.float32))
    ce, dh = jax.lax.fori_loop(0, count, step, init)  # [n, g, c], [n, g, c, hidden]
    return ce, (dh, h_dtype, inputs)


def _ce_bwd(dtype: jnp.dtype, softcap: float | None, res: tuple, g: Any) -> tuple:
    """Cotangents of (h_chunks, weight, targets, active) for g [n, g, c]: the hidden one from
    the saved per-token gradients, the weight's (only where it is differentiated; None is a
    zero) with each chunk's logits recomputed, summed over the chunks in fp32."""
    dh, h_dtype, inputs = res
    if isinstance(g, SymbolicZero):
        return None, None, None, None
    d_hidden = None if dh is None else (g[..., None] * dh).astype(h_dtype.dtype)
    d_weight = None
    if inputs is not None:
        hs, w, ts, count = inputs

        def step(i: Array, acc: Array) -> Array:
            _, pull = jax.vjp(lambda w_: _chunk_ce(hs[i], w_, ts[i], dtype, softcap), w)
            return acc + pull(g[i])[0].astype(jnp.float32)

        d_weight = jax.lax.fori_loop(0, count, step, jnp.zeros(w.shape, jnp.float32))
        d_weight = d_weight.astype(w.dtype)  # [vocab, hidden]
    return d_hidden, d_weight, None, None


_chunked_ce.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_ce_sum(
    dtype: jnp.dtype,
    softcap: float | None,
    h_chunks: Array,
    weight: Array,
    t_chunks: Array,
    w_chunks: Array,
    active: Array,
) -> Array:
    """sum(w_chunks * CE) over chunks h_chunks [n, g, c, hidden], t_chunks / w_chunks
    [n, g, c] (the chunks from `active` on have weight 0)."""
    return jnp.sum(w_chunks * _chunked_ce(dtype, softcap, h_chunks, weight, t_chunks, active))


def _ce_sum_fwd(
    dtype: jnp.dtype,
    softcap: float | None,
    h_chunks: Any,
    weight: Any,
    t_chunks: Any,
    w_chunks: Any,
    active: Any,
):
    """The weighted CE sum and its gradients with respect to the differentiated inputs, one
    chunk's logits at a time (:func:`_chunk_grads`): hidden's [n, g, c, hidden] and the
    head's, summed over the chunks in fp32 as [hidden, vocab]. Where the weights themselves
    are differentiated every chunk is computed (their gradient is the CE of every token)."""
    hs, w, ts, ws = h_chunks.value, weight.value, t_chunks.value, w_chunks.value
    count = jnp.asarray(ts.shape[0], jnp.int32) if w_chunks.perturbed else active.value
    dtypes = (jnp.zeros((0,), hs.dtype), jnp.zeros((0,), w.dtype))  # dtypes as residuals
    if not (h_chunks.perturbed or weight.perturbed):
        ce = _chunked_ce(dtype, softcap, hs, w, ts, count)  # [n, g, c]
        return jnp.sum(ws * ce), (None, None, ce if w_chunks.perturbed else None, dtypes)
    d, vocab = hs.shape[-1], w.shape[0]
    w_c = w.astype(dtype)  # the head in the compute dtype once, not per chunk
    want = {"hidden": h_chunks.perturbed, "head": weight.perturbed}

    def step(i: Array, carry: tuple) -> tuple:
        acc, ce, dh = carry
        c, dh_i, dw_t = _chunk_grads(hs[i], w_c, ts[i], ws[i], dtype, softcap, **want)
        return (
            acc if dw_t is None else acc + dw_t,
            ce.at[i].set(c),
            dh if dh_i is None else dh.at[i].set(dh_i),
        )

    init = (
        jnp.zeros((d, vocab) if weight.perturbed else (), jnp.float32),
        jnp.zeros(ts.shape, jnp.float32),
        jnp.zeros(hs.shape if h_chunks.perturbed else (), jnp.float32),
    )
    dw_t, ce, dh = jax.lax.fori_loop(0, count, step, init)  # [hidden, vocab], [n, g, c], ...
    grads = (
        dh if h_chunks.perturbed else None,
        dw_t if weight.perturbed else None,
        ce if w_chunks.perturbed else None,
    )
    return jnp.sum(ws * ce), (*grads, dtypes)


def _ce_sum_bwd(dtype: jnp.dtype, softcap: float | None, res: tuple, g: Any) -> tuple:
    """Cotangents of (h_chunks, weight, t_chunks, w_chunks, active): the saved gradients
    times g."""
    dh, dw_t, ce, (h_dtype, w_dtype) = res
    if isinstance(g, SymbolicZero):
        return None, None, None, None, None
    d_hidden = None if dh is None else (g * dh).astype(h_dtype.dtype)
    d_weight = None if dw_t is None else (g * dw_t.T).astype(w_dtype.dtype)  # [vocab, hidden]
    return d_hidden, d_weight, None, None if ce is None else g * ce, None


_chunked_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd, symbolic_zeros=True)


def token_losses(
    model: CausalLM,
    input_ids: Array,
    attention_mask: Array,
    loss_mask: Array,
    positions: Array | None = None,
    *,
    targets: Array | None = None,
    chunk: int = 128,
) -> Array:
    """Masked next-token CE per position: ``out[:, t - 1]`` is the loss of token t.

    Token t is scored (predicted from position t - 1) where `loss_mask[:, t]` is 1, exactly as
    HF's shifted loss with labels masked to -100 elsewhere; other positions are 0. Packed rows
    (segment ids in `attention_mask`, `positions` restarting per segment) give every sequence
    the losses it has alone; sum a segment's slots ``[offset, offset + length - 1)``.

    Args:
        input_ids, attention_mask: [batch, seq] (right padding; mask values are segment ids).
        loss_mask: [batch, seq] float, 1 on scored target positions (never a segment's first).
        positions: [batch, seq] token positions (default 0..seq-1).
        targets: [batch, seq - 1] ids predicted at each position (default ``input_ids[:, 1:]``;
            SFT passes its labels).
    Returns:
        [batch, seq - 1] fp32.
    """
    hidden, weight, targets, kw = _head_inputs(model, input_ids, attention_mask, positions, targets)
    scored = loss_mask[:, 1:]
    return chunked_token_ce(hidden, weight, targets, **kw, chunk=chunk, scored=scored)  # 0 unscored


def _head_inputs(
    model: CausalLM,
    input_ids: Array,
    attention_mask: Array,
    positions: Array | None,
    targets: Array | None,
) -> tuple[Array, Array, Array, dict[str, Any]]:
    """(hidden states [batch, seq - 1, hidden] that predict the next tokens, the LM head,
    targets [batch, seq - 1], the CE's dtype and soft-cap)."""
    hidden = model.hidden_states(input_ids, attention_mask, positions)  # [batch, seq, hidden]
    targets = input_ids[:, 1:] if targets is None else targets
    kw = {"dtype": model.dtype, "softcap": model.config.final_logit_softcapping}
    return hidden[:, :-1], model.output_embedding(), targets, kw


def token_loss_sum(
    model: CausalLM,
    input_ids: Array,
    attention_mask: Array,
    loss_mask: Array,
    positions: Array | None = None,
    *,
    targets: Array | None = None,
    chunk: int = 128,
) -> Array:
    """``sum(token_losses(...))`` as one fp32 scalar, its CE gradient computed in the forward
    pass (:func:`chunked_ce_sum`): the loss of a training step. Arguments as
    :func:`token_losses`."""
    hidden, weight, targets, kw = _head_inputs(model, input_ids, attention_mask, positions, targets)
    return chunked_ce_sum(hidden, weight, targets, loss_mask[:, 1:], **kw, chunk=chunk)


def sequence_losses(
    model: CausalLM,
    input_ids: Array,
    attention_mask: Array,
    loss_mask: Array,
    *,
    chunk: int = 128,
) -> tuple[Array, Array]:
    """Summed next-token CE and the number of scored tokens per (unpacked) row.

    Args:
        input_ids, attention_mask: [batch, seq] (right padding).
        loss_mask: [batch, seq] float, 1 on scored target positions (never position 0).
    Returns:
        (loss_sum [batch] fp32, count [batch] fp32); mean CE = loss_sum / count.
    """
    ce = token_losses(model, input_ids, attention_mask, loss_mask, chunk=chunk)  # [b, s - 1]
    return jnp.sum(ce, axis=-1), jnp.sum(loss_mask[:, 1:].astype(jnp.float32), axis=-1)

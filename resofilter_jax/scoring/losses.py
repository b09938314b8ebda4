"""Per-sequence next-token cross-entropy without materialising [batch, seq, vocab] fp32 logits."""

from __future__ import annotations

import functools
from typing import Any

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
) -> Array:
    """Cross-entropy of `targets` under logits = hidden @ weight.T, one sequence chunk at a time.

    Logits of one chunk ([b, chunk, vocab]) exist at a time, also under `grad`: the matmul runs
    in `dtype` with fp32 accumulation, and soft-capping, logsumexp and the loss are fp32. Under
    differentiation each chunk's forward also computes the gradient of every token's loss
    with respect to its own hidden state (:func:`_ce_fwd`), so the backward pass needs no
    logits for `hidden`'s gradient, and recomputes them only where `weight` is differentiated.

    Args:
        hidden: [..., seq, hidden] states that predict `targets`.
        weight: [vocab, hidden] LM head.
        targets: [..., seq] int token ids.
    Returns:
        [..., seq] fp32 per-token cross-entropy.
    """
    *lead, s, _ = hidden.shape
    h_chunks = _split_chunks(hidden, chunk, tail=1)  # [n, b, chunk, hidden]
    t_chunks = _split_chunks(targets, chunk)  # [n, b, chunk]
    ce = _chunked_ce(jnp.dtype(dtype), softcap, h_chunks, weight, t_chunks)  # [n, b, chunk]
    n, b, c = ce.shape
    return ce.swapaxes(0, 1).reshape(b, n * c)[:, :s].reshape(*lead, s)


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
    gradient recompute the logits (:func:`chunked_token_ce` under autodiff).

    Args:
        hidden: [..., seq, hidden]; weight: [vocab, hidden]; targets: [..., seq] int;
        weights: [..., seq] float, each token's weight in the sum (0 drops it).
    Returns:
        fp32 scalar.
    """
    h_chunks = _split_chunks(hidden, chunk, tail=1)  # [n, b, chunk, hidden]
    t_chunks = _split_chunks(targets, chunk)  # [n, b, chunk]
    w_chunks = _split_chunks(weights.astype(jnp.float32), chunk)  # [n, b, chunk], 0 on padding
    return _chunked_ce_sum(jnp.dtype(dtype), softcap, h_chunks, weight, t_chunks, w_chunks)


def _split_chunks(x: Array, chunk: int, *, tail: int = 0) -> Array:
    """x [..., seq, *tail] -> [n, b, chunk, *tail] (b: the leading axes flattened; ``tail``
    trailing axes after seq), the sequence zero-padded to n * chunk."""
    s, rest = x.shape[x.ndim - 1 - tail], x.shape[x.ndim - tail :]
    x = x.reshape(-1, s, *rest)  # [b, seq, *tail]
    chunk = min(chunk, s)
    pad = -s % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * tail)
    n = x.shape[1] // chunk
    return x.reshape(x.shape[0], n, chunk, *rest).swapaxes(0, 1)  # [n, b, chunk, *tail]


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_ce(
    dtype: jnp.dtype, softcap: float | None, h_chunks: Array, weight: Array, t_chunks: Array
) -> Array:
    """CE [n, b, c] of chunks h_chunks [n, b, c, hidden], t_chunks [n, b, c]."""
    if h_chunks.shape[0] == 1:
        return _chunk_ce(h_chunks[0], weight, t_chunks[0], dtype, softcap)[None]
    return jax.lax.map(
        lambda a: _chunk_ce(a[0], weight, a[1], dtype, softcap), (h_chunks, t_chunks)
    )


def _ce_fwd(dtype: jnp.dtype, softcap: float | None, h_chunks: Any, weight: Any, t_chunks: Any):
    """The CE and, where `hidden` is differentiated, each token's own gradient
    ``d ce[t] / d hidden[t] = (softmax - onehot) [* softcap'] @ weight`` ([n, b, c, hidden],
    fp32): ce[t] depends on no other position, so the backward pass only scales it by the
    cotangent. The autodiff form (logits recomputed in the backward pass) spent a third LM-head
    GEMM and a second softmax pass on it: ~16% of the packed resonance step on a 2-core Zen 4
    (BENCHMARKS.md)."""
    hs, w, ts = h_chunks.value, weight.value, t_chunks.value

    def one(a: tuple[Array, Array]) -> tuple[Array, Array]:
        hc, tc = a
        logits = _logits(hc, w_c, dtype, softcap)  # [b, c, vocab]
        ce, lse = _ce_of_logits(logits, tc)  # [b, c] each
        dlogits = _dlogits(logits, lse, tc, softcap)  # [b, c, vocab]
        dh = precision.einsum("bcv,vd->bcd", dlogits, w_c, dtype=dtype, out_dtype=jnp.float32)
        return ce, dh  # [b, c], [b, c, hidden]

    # the weight's gradient needs the inputs again; hidden's dtype travels as an empty array
    inputs = (hs, w, ts) if weight.perturbed else None
    h_dtype = jnp.zeros((0,), hs.dtype)
    if not h_chunks.perturbed:
        return _chunked_ce(dtype, softcap, hs, w, ts), (None, h_dtype, inputs)
    w_c = w.astype(dtype)  # the head in the compute dtype once, not per chunk
    ce, dh = jax.lax.map(one, (hs, ts))  # [n, b, c], [n, b, c, hidden]
    return ce, (dh, h_dtype, inputs)


def _ce_bwd(dtype: jnp.dtype, softcap: float | None, res: tuple, g: Any) -> tuple:
    """Cotangents of (h_chunks, weight, targets) for g [n, b, c]: the hidden one from the
    saved per-token gradients, the weight's (only where it is differentiated; None is a
    zero) with each chunk's logits recomputed, summed over the chunks in fp32."""
    dh, h_dtype, inputs = res
    if isinstance(g, SymbolicZero):
        return None, None, None
    d_hidden = None if dh is None else (g[..., None] * dh).astype(h_dtype.dtype)
    d_weight = None
    if inputs is not None:
        hs, w, ts = inputs

        def add(acc: Array, a: tuple[Array, Array, Array]) -> tuple[Array, None]:
            hc, tc, gc = a
            _, pull = jax.vjp(lambda w_: _chunk_ce(hc, w_, tc, dtype, softcap), w)
            return acc + pull(gc)[0].astype(jnp.float32), None

        d_weight, _ = jax.lax.scan(add, jnp.zeros(w.shape, jnp.float32), (hs, ts, g))
        d_weight = d_weight.astype(w.dtype)  # [vocab, hidden]
    return d_hidden, d_weight, None


_chunked_ce.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_ce_sum(
    dtype: jnp.dtype,
    softcap: float | None,
    h_chunks: Array,
    weight: Array,
    t_chunks: Array,
    w_chunks: Array,
) -> Array:
    """sum(w_chunks * CE) over chunks h_chunks [n, b, c, hidden], t_chunks / w_chunks [n, b, c]."""
    return jnp.sum(w_chunks * _chunked_ce(dtype, softcap, h_chunks, weight, t_chunks))


def _ce_sum_fwd(
    dtype: jnp.dtype,
    softcap: float | None,
    h_chunks: Any,
    weight: Any,
    t_chunks: Any,
    w_chunks: Any,
):
    """The weighted CE sum and its gradients with respect to the differentiated inputs, one
    chunk's logits at a time: hidden's ``(weights * dlogits) @ W`` [n, b, c, hidden] and the
    head's ``(weights * dlogits).T @ hidden``, summed over the chunks in fp32 ([hidden, vocab]:
    the CPU's fast form of that product, see ``precision.weight_gradient``)."""
    hs, w, ts, ws = h_chunks.value, weight.value, t_chunks.value, w_chunks.value
    dtypes = (jnp.zeros((0,), hs.dtype), jnp.zeros((0,), w.dtype))  # dtypes as residuals
    if not (h_chunks.perturbed or weight.perturbed):
        ce = _chunked_ce(dtype, softcap, hs, w, ts)  # [n, b, c]
        return jnp.sum(ws * ce), (None, None, ce if w_chunks.perturbed else None, dtypes)
    d, vocab = hs.shape[-1], w.shape[0]
    w_c = w.astype(dtype)  # the head in the compute dtype once, not per chunk

    def one(acc: Array, a: tuple[Array, Array, Array]) -> tuple[Array, tuple]:
        hc, tc, wc = a  # [b, c, hidden], [b, c], [b, c]
        logits = _logits(hc, w_c, dtype, softcap)  # [b, c, vocab]
        ce, lse = _ce_of_logits(logits, tc)  # [b, c] each
        dlogits = _dlogits(logits, lse, tc, softcap) * wc[..., None]  # [b, c, vocab]
        dh = None
        if h_chunks.perturbed:
            dh = precision.einsum("bcv,vd->bcd", dlogits, w_c, dtype=dtype, out_dtype=jnp.float32)
        if weight.perturbed:  # [hidden, vocab]
            acc = acc + precision.weight_gradient(
                hc.reshape(-1, d), dlogits.reshape(-1, vocab), dtype=dtype
            )
        return acc, (ce, dh)

    acc = jnp.zeros((d, vocab) if weight.perturbed else (), jnp.float32)
    dw_t, (ce, dh) = jax.lax.scan(one, acc, (hs, ts, ws))  # [hidden, vocab], [n, b, c], ...
    grads = (dh, dw_t if weight.perturbed else None, ce if w_chunks.perturbed else None)
    return jnp.sum(ws * ce), (*grads, dtypes)


def _ce_sum_bwd(dtype: jnp.dtype, softcap: float | None, res: tuple, g: Any) -> tuple:
    """Cotangents of (h_chunks, weight, t_chunks, w_chunks): the saved gradients times g."""
    dh, dw_t, ce, (h_dtype, w_dtype) = res
    if isinstance(g, SymbolicZero):
        return None, None, None, None
    d_hidden = None if dh is None else (g * dh).astype(h_dtype.dtype)
    d_weight = None if dw_t is None else (g * dw_t.T).astype(w_dtype.dtype)  # [vocab, hidden]
    return d_hidden, d_weight, None, None if ce is None else g * ce


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
    ce = chunked_token_ce(hidden, weight, targets, **kw, chunk=chunk)  # [batch, seq - 1]
    return ce * loss_mask[:, 1:].astype(jnp.float32)


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

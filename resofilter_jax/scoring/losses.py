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
    *lead, s, d = hidden.shape
    h = hidden.reshape(-1, s, d)  # [b, seq, hidden]
    t = targets.reshape(-1, s)  # [b, seq]
    b = h.shape[0]
    chunk = min(chunk, s)
    pad = -s % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        t = jnp.pad(t, ((0, 0), (0, pad)))
    n = h.shape[1] // chunk
    h_chunks = h.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, b, chunk, hidden]
    t_chunks = t.reshape(b, n, chunk).swapaxes(0, 1)  # [n, b, chunk]
    ce = _chunked_ce(jnp.dtype(dtype), softcap, h_chunks, weight, t_chunks)  # [n, b, chunk]
    return ce.swapaxes(0, 1).reshape(b, n * chunk)[:, :s].reshape(*lead, s)


def _logits(hc: Array, weight: Array, dtype: jnp.dtype, softcap: float | None) -> Array:
    """fp32 logits [b, c, vocab] of one chunk hc [b, c, hidden] (soft-capped if asked)."""
    logits = precision.einsum("bcd,vd->bcv", hc, weight, dtype=dtype, out_dtype=jnp.float32)
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def _chunk_ce(
    hc: Array, weight: Array, tc: Array, dtype: jnp.dtype, softcap: float | None
) -> Array:
    """Per-token CE [b, c] of one chunk."""
    return _ce_of_logits(_logits(hc, weight, dtype, softcap), tc)[0]


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
        logits = _logits(hc, w, dtype, softcap)  # [b, c, vocab]
        ce, lse = _ce_of_logits(logits, tc)  # [b, c] each
        dlogits = jnp.exp(logits - lse[..., None])  # softmax [b, c, vocab]
        dlogits = dlogits - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
        if softcap is not None:  # d(tanh(z / cap) * cap) / dz = 1 - (logits / cap)**2
            dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
        dh = precision.einsum("bcv,vd->bcd", dlogits, w, dtype=dtype, out_dtype=jnp.float32)
        return ce, dh  # [b, c], [b, c, hidden]

    # the weight's gradient needs the inputs again; hidden's dtype travels as an empty array
    inputs = (hs, w, ts) if weight.perturbed else None
    h_dtype = jnp.zeros((0,), hs.dtype)
    if not h_chunks.perturbed:
        return _chunked_ce(dtype, softcap, hs, w, ts), (None, h_dtype, inputs)
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
    hidden = model.hidden_states(input_ids, attention_mask, positions)  # [batch, seq, hidden]
    ce = chunked_token_ce(
        hidden[:, :-1],
        model.output_embedding(),
        input_ids[:, 1:] if targets is None else targets,
        dtype=model.dtype,
        softcap=model.config.final_logit_softcapping,
        chunk=chunk,
    )  # [batch, seq - 1]
    return ce * loss_mask[:, 1:].astype(jnp.float32)


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

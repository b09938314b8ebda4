"""Per-sequence next-token cross-entropy without materialising [batch, seq, vocab] fp32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    remat: bool = False,
) -> Array:
    """Cross-entropy of `targets` under logits = hidden @ weight.T, one sequence chunk at a time.

    Logits of one chunk ([..., chunk, vocab]) exist at a time; the matmul runs in `dtype` with
    fp32 accumulation, and soft-capping, logsumexp and the loss are fp32. With `remat` each
    chunk is recomputed in the backward pass, so also under `grad` only one chunk of logits
    is live.

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
    w = weight.astype(dtype)  # [vocab, hidden]

    def one_chunk(args: tuple[Array, Array]) -> Array:
        hc, tc = args
        logits = precision.einsum(
            "bcd,vd->bcv", hc, w, dtype=dtype, out_dtype=jnp.float32
        )  # [b, c, vocab]
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]  # [b, c]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    if n == 1:
        ce = one_chunk((h_chunks[0], t_chunks[0]))[None]  # [1, b, chunk]
    else:
        ce = jax.lax.map(jax.checkpoint(one_chunk) if remat else one_chunk, (h_chunks, t_chunks))
    return ce.swapaxes(0, 1).reshape(b, n * chunk)[:, :s].reshape(*lead, s)


def token_losses(
    model: CausalLM,
    input_ids: Array,
    attention_mask: Array,
    loss_mask: Array,
    positions: Array | None = None,
    *,
    targets: Array | None = None,
    chunk: int = 128,
    remat: bool = False,
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
        remat: recompute each CE chunk in the backward pass (training).
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
        remat=remat,
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

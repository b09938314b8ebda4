"""Per-sequence next-token cross-entropy without materialising [batch, seq, vocab] fp32 logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resofilter_jax.models.base import CausalLM, project_logits

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

    Logits of one chunk ([batch, chunk, vocab], in `dtype`) exist at a time; the logsumexp and
    the loss are computed in fp32.

    Args:
        hidden: [batch, seq, hidden] states that predict `targets`.
        weight: [vocab, hidden] LM head.
        targets: [batch, seq] int token ids.
    Returns:
        [batch, seq] fp32 per-token cross-entropy.
    """
    b, s, d = hidden.shape
    chunk = min(chunk, s)
    pad = -s % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    h_chunks = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, batch, chunk, hidden]
    t_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, batch, chunk]

    def one_chunk(args: tuple[Array, Array]) -> Array:
        h, t = args
        logits = project_logits(h, weight, dtype, softcap).astype(jnp.float32)  # [b, c, vocab]
        lse = jax.nn.logsumexp(logits, axis=-1)  # [b, c]
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]  # [b, c]
        return lse - picked

    ce = jax.lax.map(one_chunk, (h_chunks, t_chunks))  # [n, batch, chunk]
    return ce.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]


def sequence_losses(
    model: CausalLM,
    input_ids: Array,
    attention_mask: Array,
    loss_mask: Array,
    *,
    chunk: int = 128,
) -> tuple[Array, Array]:
    """Summed next-token CE and the number of scored tokens per sequence.

    Token t is scored (predicted from position t - 1) where `loss_mask[:, t]` is 1, exactly as
    HF's shifted loss with labels masked to -100 elsewhere.

    Args:
        input_ids, attention_mask: [batch, seq] (right padding).
        loss_mask: [batch, seq] float, 1 on scored target positions (never position 0).
    Returns:
        (loss_sum [batch] fp32, count [batch] fp32); mean CE = loss_sum / count.
    """
    hidden = model.hidden_states(input_ids, attention_mask)  # [batch, seq, hidden]
    ce = chunked_token_ce(
        hidden[:, :-1],
        model.output_embedding(),
        input_ids[:, 1:],
        dtype=model.dtype,
        softcap=model.config.final_logit_softcapping,
        chunk=chunk,
    )  # [batch, seq - 1]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * mask, axis=-1), jnp.sum(mask, axis=-1)

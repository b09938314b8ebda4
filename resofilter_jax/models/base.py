"""The interface every causal LM of resofilter_jax implements."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from resofilter_jax.models.config import ModelConfig

Array = jax.Array


class CausalLMOutput(NamedTuple):
    """Final normalised hidden states [batch, seq, hidden] and logits [batch, seq, vocab]."""

    hidden: Array
    logits: Array


def default_positions(input_ids: Array) -> Array:
    """Positions 0..seq-1 for every row, as HF uses when none are given (right padding)."""
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)


def project_logits(
    hidden: Array, weight: Array, dtype: jnp.dtype, softcap: float | None = None
) -> Array:
    """hidden [..., hidden] x LM head [vocab, hidden] -> logits [..., vocab] in `dtype`."""
    logits = jnp.einsum("...d,vd->...v", hidden.astype(dtype), weight.astype(dtype))
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


class CausalLM(nnx.Module):
    """Base class: subclasses implement `hidden_states` and `output_embedding`.

    Attributes:
        config: the architecture.
        dtype: compute dtype; parameters live in `param_dtype`.
    """

    config: ModelConfig
    dtype: jnp.dtype

    def hidden_states(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        """Final normalised hidden states [batch, seq, hidden]."""
        raise NotImplementedError

    def output_embedding(self) -> Array:
        """The LM head matrix [vocab, hidden] (the token embedding when tied)."""
        raise NotImplementedError

    def logits(self, hidden: Array) -> Array:
        """Logits [..., vocab] for hidden states [..., hidden] (any subset of positions).

        Applies final-logit soft-capping where the config has it.
        """
        return project_logits(
            hidden, self.output_embedding(), self.dtype, self.config.final_logit_softcapping
        )

    def logits_at(self, hidden: Array, index: Array) -> Array:
        """Logits [batch, k, vocab] at chosen positions `index` [batch, k] only."""
        picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [batch, k, hidden]
        return self.logits(picked)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None
    ) -> CausalLMOutput:
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        return CausalLMOutput(hidden=hidden, logits=self.logits(hidden))

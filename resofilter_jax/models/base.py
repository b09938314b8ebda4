"""The interface every causal LM of resofilter_jax implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from resofilter_jax.models import precision
from resofilter_jax.models.config import ModelConfig
from resofilter_jax.models.layers import KVSlot, Linear
from resofilter_jax.models.stacking import StackedLayers

Array = jax.Array


class CausalLMOutput(NamedTuple):
    """Final normalised hidden states [batch, seq, hidden] and logits [batch, seq, vocab]."""

    hidden: Array
    logits: Array


class KVCache(NamedTuple):
    """Keys and values of every decoder layer for generation (a pytree, jit-friendly).

    Attributes:
        k, v: per layer [batch, max_len, kv_heads, head_dim].
        key_mask: [batch, max_len] int32, 1 where a real token has been written.
        index: int32 scalar, the next free slot (the same for every row).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    key_mask: Array
    index: Array


def open_cache(cache: KVCache, attention_mask: Array) -> tuple[Array, list[KVSlot]]:
    """Starts a cached pass: the key mask with this pass's tokens [batch, max_len] and slots."""
    key_mask = jax.lax.dynamic_update_slice_in_dim(
        cache.key_mask, (attention_mask > 0).astype(jnp.int32), cache.index, axis=1
    )
    slots = [KVSlot(k, v, cache.index) for k, v in zip(cache.k, cache.v, strict=True)]
    return key_mask, slots


def close_cache(key_mask: Array, slots: Sequence[KVSlot], q_len: int) -> KVCache:
    """The cache after a pass of `q_len` tokens that filled `slots`."""
    index = slots[0].index + q_len
    return KVCache(tuple(s.k for s in slots), tuple(s.v for s in slots), key_mask, index)


def default_positions(input_ids: Array) -> Array:
    """Positions 0..seq-1 for every row, as HF uses when none are given (right padding)."""
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)


class CausalLM(nnx.Module):
    """Base class: subclasses implement `hidden_states` and `output_embedding`.

    Attributes:
        config: the architecture.
        dtype: compute dtype; parameters live in `param_dtype`.
    """

    config: ModelConfig
    dtype: jnp.dtype
    # Run decoder layers with one lax.scan (see `run_layers`); set it with
    # `stacking.set_scan_layers`, which also stores the layers stacked.
    scan_layers: bool = False
    remat: str = "none"  # per-layer rematerialisation in backward passes (`REMAT_POLICIES`)
    layers_path: tuple[str, ...] = ("model", "layers")  # attributes down to the decoder layers

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Final normalised hidden states [batch, seq, hidden].

        With a `cache` (from `init_cache`), the tokens are written to it at slots
        [cache.index, cache.index + seq), attend to everything cached before them, and the
        result is (hidden, updated cache).
        """
        raise NotImplementedError

    def output_embedding(self) -> Array:
        """The LM head matrix [vocab, hidden] (the token embedding when tied)."""
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty KV cache of `max_len` slots per row (default dtype: the compute dtype).

        Pass it as `hidden_states(..., cache=cache)`, which then returns (hidden, new cache).
        """
        cfg = self.config
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype or self.dtype) for _ in range(cfg.num_hidden_layers))
        return KVCache(
            zeros, zeros, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32)
        )

    def logits(self, hidden: Array) -> Array:
        """Logits [..., vocab] for hidden states [..., hidden] (any subset of positions).

        Applies final-logit soft-capping where the config has it.
        """
        logits = precision.linear(
            hidden,
            self.output_embedding(),
            transposed=True,
            dtype=self.dtype,
            out_dtype=jnp.float32,
        )  # [..., vocab] fp32
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def logits_at(self, hidden: Array, index: Array) -> Array:
        """Logits [batch, k, vocab] at chosen positions `index` [batch, k] only."""
        picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [batch, k, hidden]
        return self.logits(picked)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None
    ) -> CausalLMOutput:
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        return CausalLMOutput(hidden=hidden, logits=self.logits(hidden))


class EmbedHeadLM(CausalLM):
    """Families with `model.embed_tokens` and an `lm_head` that is absent when tied."""

    def _init_head(
        self, config: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: Any
    ) -> None:
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

    def output_embedding(self) -> Array:
        """The LM head matrix [vocab, hidden] (the token embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight[...]
        return self.lm_head.weight[...]


def pick(flag: bool | Array, if_true: Any, if_false: Any) -> Any:
    """`if_true if flag else if_false` for a Python bool or a traced scalar (pytrees too)."""
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


LayerStep = Callable[[nnx.Module, Array, Any], Array]

# Per-layer rematerialisation (`CausalLM.remat`, the train config's `train.remat`): what a
# backward pass keeps of a decoder layer's forward activations.
#   none    keep what autodiff keeps (fastest, most memory)
#   layer   keep only each layer's input; recompute the whole layer in the backward pass
#   dots    keep the outputs of matmuls without batch dimensions (the projections and MLP);
#           recompute the rest (attention products, norms, activations)
REMAT_POLICIES = ("none", "layer", "dots")


def check_remat(remat: str, *, scan_layers: bool | None = None) -> str:
    """``remat`` if it names a policy of :data:`REMAT_POLICIES`.

    With ``scan_layers=False`` on CPU a policy other than ``none`` logs a warning: XLA:CPU
    then keeps every layer's activations anyway (SmolLM2 at 8 x 512 rows: 9.9 GiB of step
    temporaries unrolled with ``layer``, 10.7 GiB with ``none``, 1.95 GiB scanned).

    Raises:
        ValueError: If ``remat`` names no policy.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    if remat != "none" and scan_layers is False and jax.default_backend() == "cpu":
        logging.warning(
            "remat=%s saves little memory on CPU with unscanned layers (XLA keeps every "
            "layer's activations anyway); set --config.model.scan_layers=True",
            remat,
        )
    return remat


def remat_step(step: LayerStep, remat: str) -> LayerStep:
    """``step(layer, x, flag)`` under ``jax.checkpoint`` with the policy ``remat`` names.

    The layer's state is passed to the checkpointed function as an argument (NNX modules are
    not pytrees), so its parameters get gradients as before; the numbers are unchanged, only
    what the backward pass stores and recomputes.
    """
    if check_remat(remat) == "none":
        return step
    policy = (
        jax.checkpoint_policies.nothing_saveable
        if remat == "layer"
        else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )

    def wrapped(layer: nnx.Module, x: Array, flag: Any) -> Array:
        graphdef, state = nnx.split(layer)
        # scanned flags are arrays; Python values stay static
        traced = any(isinstance(f, jax.Array) for f in jax.tree.leaves(flag))

        def pure(state: nnx.State, h: Array, flag_: Any) -> Array:
            return step(nnx.merge(graphdef, state), h, flag_ if traced else flag)

        return jax.checkpoint(pure, policy=policy)(state, x, flag if traced else None)

    return wrapped


def run_layers(
    layers: Sequence[nnx.Module] | StackedLayers,
    x: Array,
    step: LayerStep,
    *,
    local: Sequence[Any],
    scan: bool = False,
    remat: str = "none",
) -> Array:
    """Applies decoder layers in order: `x = step(layer, x, local[i])`.

    `local[i]` is layer i's flag: a bool or a tuple of bools (the same structure for every
    layer). Layers stored stacked (:class:`~resofilter_jax.models.stacking.StackedLayers`)
    always run as one `lax.scan` over the stored [layers, ...] parameters. A list runs one
    layer after another, or with `scan=True` is stacked on the fly (inside the traced
    function: a copy of every layer weight per call) and scanned. Scanning keeps compile
    time from growing with depth (same numbers; the flags then arrive traced, which `pick`
    handles). Keep it off where gradients must stop below a layer: a scan's backward pass
    runs through every layer. `remat` wraps every layer in :func:`remat_step`.
    """
    step = remat_step(step, remat)
    if isinstance(layers, StackedLayers):
        graphdef, stacked = nnx.split(layers.template)  # stored [layers, ...]
    elif not scan or len(layers) < 2:
        for i, layer in enumerate(layers):
            x = step(layer, x, jax.tree.map(bool, local[i]))
        return x
    else:
        splits = [nnx.split(layer) for layer in layers]
        graphdef = splits[0][0]
        if any(g != graphdef for g, _ in splits):
            raise ValueError("scan_layers needs structurally identical layers")
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in splits])  # [layers, ...]
    flags = jax.tree.map(lambda *f: jnp.asarray(f, dtype=bool), *local)  # [layers] per leaf

    def body(h: Array, inputs: tuple[nnx.State, Any]) -> tuple[Array, None]:
        state, flag = inputs
        return step(nnx.merge(graphdef, state), h, flag), None

    x, _ = jax.lax.scan(body, x, (stacked, flags))
    return x

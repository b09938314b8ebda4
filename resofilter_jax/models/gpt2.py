"""GPT-2 causal LM with Hugging Face parameter names (`transformer.h.0.attn.c_attn.weight`, ...).

Linear maps are GPT-2 `Conv1D`s ([in, out] weights). The LM head is tied to `transformer.wte`
unless the config unties it, in which case an `lm_head` parameter exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resofilter_jax.models.attention import attend, layer_masks
from resofilter_jax.models.base import (
    CausalLM,
    KVCache,
    close_cache,
    default_positions,
    open_cache,
    run_layers,
)
from resofilter_jax.models.config import ModelConfig
from resofilter_jax.models.layers import (
    Conv1D,
    Embedding,
    KVSlot,
    LayerNorm,
    Linear,
    activation,
    cache_attention_mask,
)

Array = jax.Array

# Checkpoint keys that are not parameters, matched as suffixes by `load_state_dict(ignore=...)`:
# the tied LM head alias and the causal-mask buffers of older GPT-2 checkpoints.
GPT2_IGNORED_KEYS: tuple[str, ...] = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")

# HF GPT2Config options that change the computation in ways this module does not reproduce.
_UNSUPPORTED_OPTIONS = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")


class GPT2Attention(nnx.Module):
    """Causal multi-head self-attention with a fused q/k/v projection (`c_attn`)."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = cfg.hidden_size
        self.c_attn = Conv1D(h, 3 * h, **kw)
        self.c_proj = Conv1D(h, h, **kw)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        scale_weights = bool(cfg.hf_config.get("scale_attn_weights", True))
        self.scale = float(cfg.head_dim) ** -0.5 if scale_weights else 1.0

    def __call__(self, x: Array, mask: Array, slot: KVSlot | None = None) -> Array:
        """x [batch, seq, hidden], mask bool [batch, 1, seq, keys] (or `attention.Rows`) ->
        [batch, seq, hidden].

        With a `slot`, the new keys/values go to the cache and the keys are the whole cache.
        """
        b, s, _ = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 x [b, s, hidden]
        shape = (b, s, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)  # [b, s, heads, head_dim]
        if slot is not None:
            k, v = slot.update(k, v)  # [b, max_len, heads, head_dim] each
        out = attend(q, k, v, mask, scale=self.scale, softcap=None)  # [b, s, heads, head_dim]
        return self.c_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class GPT2MLP(nnx.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = cfg.hidden_act

    def __call__(self, x: Array) -> Array:
        h = activation(self.act, self.c_fc(x).astype(jnp.float32))  # fp32 [b, s, intermediate]
        return self.c_proj(h.astype(x.dtype))  # [b, s, hidden]


class GPT2Block(nnx.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.attn = GPT2Attention(cfg, rngs=rngs, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.mlp = GPT2MLP(cfg, rngs=rngs, **kw)

    def __call__(self, x: Array, mask: Array, slot: KVSlot | None = None) -> Array:
        x = x + self.attn(self.ln_1(x), mask, slot)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nnx.Module):
    """Token and learned position embeddings, blocks, final LayerNorm (HF prefix `transformer.`)."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs, **kw)
        self.h = nnx.List([GPT2Block(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 causal LM; the output embedding is `transformer.wte` when tied (the HF default)."""

    attention: str = "reference"  # non-cached attention backend (models/attention.py)
    layers_path = ("transformer", "h")  # the decoder blocks (stored stacked by scan_layers)

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        """Builds the module tree.

        Raises:
            NotImplementedError: the HF config enables an attention variant not implemented here.
        """
        for option in _UNSUPPORTED_OPTIONS:
            if config.hf_config.get(option, False):
                raise NotImplementedError(
                    f"GPT-2 config sets {option}=True, which resofilter_jax does not implement"
                )
        self.config = config
        self.dtype = dtype
        self.transformer = GPT2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
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
        """The LM head matrix [vocab, hidden]."""
        if self.config.tie_word_embeddings:
            return self.transformer.wte.weight[...]
        return self.lm_head.weight[...]

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Final LayerNorm output [batch, seq, hidden] for `input_ids` [batch, seq].

        With a `cache` (see `init_cache`), returns (hidden, updated cache).
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = default_positions(input_ids)
        # [b, s, hidden]
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        if cache is not None:
            key_mask, slots = open_cache(cache, attention_mask)
            s = input_ids.shape[1]
            mask = cache_attention_mask(key_mask, cache.index, s)  # [b, 1, s, T]
            for block, slot in zip(self.transformer.h, slots, strict=True):
                x = block(x, mask, slot)
            return self.transformer.ln_f(x), close_cache(key_mask, slots, s)
        mask, _ = layer_masks(attention_mask, None, self.attention)  # [b, 1, s, s] or Rows
        x = run_layers(
            self.transformer.h,
            x,
            lambda block, h, _: block(h, mask),
            local=[False] * len(self.transformer.h),
            scan=self.scan_layers,
            remat=self.remat,
        )
        return self.transformer.ln_f(x)

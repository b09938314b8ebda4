"""Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2) with HF parameter names.

State paths equal HF state-dict keys, e.g. `model.layers.3.mlp.up_proj.weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resofilter_jax.models.attention import attend, layer_masks
from resofilter_jax.models.base import (
    EmbedHeadLM,
    KVCache,
    close_cache,
    default_positions,
    open_cache,
    pick,
    run_layers,
)
from resofilter_jax.models.config import ModelConfig
from resofilter_jax.models.layers import (
    Embedding,
    KVSlot,
    Linear,
    RMSNorm,
    activation,
    apply_rope,
    cache_attention_mask,
    rope_cos_sin,
    rope_inv_freq,
)

Array = jax.Array


class LlamaAttention(nnx.Module):
    """Multi-head / grouped-query self-attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.num_attention_heads * d, h, bias=cfg.o_proj_bias, **kw)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = d
        self.scale = cfg.attention_scale()

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, slot: KVSlot | None = None
    ) -> Array:
        """x [b, s, hidden]; mask [b, 1, s, keys] or `attention.Rows`; with a `slot`, keys are
        the whole cache."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slot is not None:
            k, v = slot.update(k, v)  # [b, max_len, kv, head_dim] each
        out = attend(q, k, v, mask, scale=self.scale, softcap=None)  # [b, s, heads, head_dim]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), shared by Llama and Gemma."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs | None):
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = cfg.hidden_act

    def __call__(self, x: Array) -> Array:
        gate = self.gate_proj(x).astype(jnp.float32)  # [b, s, intermediate]
        up = self.up_proj(x).astype(jnp.float32)
        # activation and product in fp32, one rounding to the compute dtype (precision.py)
        return self.down_proj((activation(self.act, gate) * up).astype(x.dtype))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, rngs=rngs, **kw)
        self.mlp = GatedMLP(cfg, rngs=rngs, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, gemma=False, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.norm_eps, gemma=False, **kw
        )

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, slot: KVSlot | None = None
    ) -> Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    """Embedding, decoder layers and final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, gemma=False, **kw)


class LlamaForCausalLM(EmbedHeadLM):
    """Llama-family causal LM; `lm_head` is absent when embeddings are tied."""

    attention: str = "reference"  # non-cached attention backend (models/attention.py)

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._init_head(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Final hidden states [b, s, hidden]; with a `cache`, also the updated cache."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = default_positions(input_ids)
        x = self.model.embed_tokens(input_ids)  # [b, s, hidden]
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.rope, cfg.head_dim), self.dtype)
        if cache is not None:
            key_mask, slots = open_cache(cache, attention_mask)
            s = input_ids.shape[1]
            for i, layer in enumerate(self.model.layers):
                window = cfg.sliding_window if cfg.is_sliding(i) else None
                mask = cache_attention_mask(key_mask, cache.index, s, window)  # [b, 1, s, T]
                x = layer(x, cos, sin, mask, slots[i])
            return self.model.norm(x), close_cache(key_mask, slots, s)
        local = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
        window = cfg.sliding_window if any(local) else None
        full_mask, slide_mask = layer_masks(attention_mask, window, self.attention)
        x = run_layers(
            self.model.layers,
            x,
            lambda layer, h, slide: layer(h, cos, sin, pick(slide, slide_mask, full_mask)),
            local=local,
            scan=self.scan_layers,
            remat=self.remat,
        )
        return self.model.norm(x)

"""Gemma 2 and Gemma 3 (text) causal LMs with Hugging Face parameter names.

State paths equal HF state-dict keys, e.g. `model.layers.3.self_attn.q_norm.weight`. Both
families use "sandwich" norms (Gemma RMSNorm with `1 + w`, in fp32) around attention and MLP, a
token embedding scaled by sqrt(hidden_size), and alternate sliding-window and global layers.
Gemma 2 soft-caps attention logits; Gemma 3 instead normalises q and k per head and uses a
separate rope table for its sliding layers.
"""

from __future__ import annotations

import math

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
from resofilter_jax.models.config import ModelConfig, RopeConfig
from resofilter_jax.models.layers import (
    Embedding,
    KVSlot,
    Linear,
    RMSNorm,
    apply_rope,
    cache_attention_mask,
    rope_cos_sin,
    rope_inv_freq,
)
from resofilter_jax.models.llama import GatedMLP

Array = jax.Array


def _gemma_norm(dim: int, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype) -> RMSNorm:
    """Gemma-style RMSNorm (`1 + w`, fp32) over the last axis of size `dim`."""
    return RMSNorm(dim, eps=cfg.norm_eps, gemma=True, dtype=dtype, param_dtype=param_dtype)


class GemmaAttention(nnx.Module):
    """Grouped-query attention; optional logit soft-capping (Gemma 2) or q/k norms (Gemma 3)."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.num_attention_heads * d, h, bias=cfg.o_proj_bias, **kw)
        if cfg.arch == "gemma3":
            self.q_norm = _gemma_norm(d, cfg, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = _gemma_norm(d, cfg, dtype=dtype, param_dtype=param_dtype)
        self.qk_norm = cfg.arch == "gemma3"
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = d
        self.scale = cfg.attention_scale()
        # HF's Gemma 3 attention never passes `attn_logit_softcapping` on; only Gemma 2 caps.
        self.softcap = cfg.attn_logit_softcapping if cfg.arch == "gemma2" else None

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, slot: KVSlot | None = None
    ) -> Array:
        """x [batch, seq, hidden]; cos/sin [batch, seq, head_dim]; mask [batch, 1, seq, keys]
        (or `attention.Rows` for a non-reference backend).

        With a `slot`, the new keys/values are written to the cache and the keys are the
        whole cache.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)  # [b, s, heads, hd]
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)  # [b, s, kv, hd]
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)  # [b, s, kv, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slot is not None:
            k, v = slot.update(k, v)  # [b, max_len, kv, hd] each
        out = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)  # [b, s, heads, hd]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))  # [b, s, hidden]


class GemmaDecoderLayer(nnx.Module):
    """x + post_attn_norm(attn(input_norm(x))); x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = GemmaAttention(cfg, rngs=rngs, **kw)
        self.mlp = GatedMLP(cfg, rngs=rngs, **kw)
        self.input_layernorm = _gemma_norm(cfg.hidden_size, cfg, **kw)
        self.post_attention_layernorm = _gemma_norm(cfg.hidden_size, cfg, **kw)
        self.pre_feedforward_layernorm = _gemma_norm(cfg.hidden_size, cfg, **kw)
        self.post_feedforward_layernorm = _gemma_norm(cfg.hidden_size, cfg, **kw)

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, slot: KVSlot | None = None
    ) -> Array:
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, mask, slot)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nnx.Module):
    """Scaled token embedding, decoder layers and final norm (HF prefix `model.`)."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [GemmaDecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = _gemma_norm(cfg.hidden_size, cfg, **kw)


class GemmaForCausalLM(EmbedHeadLM):
    """Gemma 2 / Gemma 3 text causal LM; `lm_head` is absent when embeddings are tied."""

    attention: str = "reference"  # non-cached attention backend (models/attention.py)

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
            ValueError: `config.arch` is not gemma2 or gemma3.
            NotImplementedError: the config asks for bidirectional attention (EmbeddingGemma).
        """
        if config.arch not in ("gemma2", "gemma3"):
            raise ValueError(f"GemmaForCausalLM needs arch gemma2 or gemma3, got {config.arch!r}")
        if config.hf_config.get("use_bidirectional_attention"):
            raise NotImplementedError("bidirectional Gemma attention is not implemented")
        self.config = config
        self.dtype = dtype
        self.model = GemmaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._init_head(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _local_rope(self) -> RopeConfig:
        """Rope of the sliding layers: Gemma 3 has its own table, Gemma 2 shares the global one."""
        cfg = self.config
        if cfg.arch == "gemma3" and cfg.rope_local is not None:
            return cfg.rope_local
        return cfg.rope

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Final normalised hidden states [batch, seq, hidden] for `input_ids` [batch, seq].

        With a `cache` (see `init_cache`), returns (hidden, updated cache).
        """
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = default_positions(input_ids)
        # HF multiplies by sqrt(hidden) rounded to the embedding dtype.
        scale = jnp.asarray(math.sqrt(cfg.hidden_size), dtype=self.dtype)
        x = self.model.embed_tokens(input_ids) * scale  # [b, s, hidden]
        sliding = any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
        # [b, 1, s, s] boolean masks (reference) or `attention.Rows`
        full_mask, slide_mask = layer_masks(
            attention_mask, cfg.sliding_window if sliding else None, self.attention
        )
        # The rope table follows the layer type even when no window is set (as in HF).
        full_rope = rope_cos_sin(positions, rope_inv_freq(cfg.rope, cfg.head_dim), self.dtype)
        local_rope = (
            rope_cos_sin(positions, rope_inv_freq(self._local_rope(), cfg.head_dim), self.dtype)
            if self._local_rope() != cfg.rope
            else full_rope
        )
        # Per layer: (uses the local rope table, uses the sliding-window mask).
        kinds = [
            (bool(cfg.layer_types) and cfg.layer_types[i] == "sliding_attention", cfg.is_sliding(i))
            for i in range(cfg.num_hidden_layers)
        ]
        if cache is not None:
            key_mask, slots = open_cache(cache, attention_mask)
            s = input_ids.shape[1]
            for i, layer in enumerate(self.model.layers):
                cos, sin = local_rope if kinds[i][0] else full_rope  # [b, s, head_dim] each
                window = cfg.sliding_window if kinds[i][1] else None
                mask = cache_attention_mask(key_mask, cache.index, s, window)  # [b, 1, s, T]
                x = layer(x, cos, sin, mask, slots[i])
            return self.model.norm(x), close_cache(key_mask, slots, s)

        def step(layer: nnx.Module, h: Array, kind: tuple[bool | Array, bool | Array]) -> Array:
            cos, sin = pick(kind[0], local_rope, full_rope)  # [b, s, head_dim] each
            return layer(h, cos, sin, pick(kind[1], slide_mask, full_mask))

        x = run_layers(
            self.model.layers,
            x,
            step,
            local=kinds,
            scan=self.scan_layers,
            remat=self.remat,
        )
        return self.model.norm(x)

"""Parameter layout: abstract 7B-class models and HF state-dict key sets of tiny models."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import pytest
import transformers
from flax import nnx

from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.registry import abstract_model, build_model, named_params

# config.json contents of public checkpoints, and their published parameter counts.
LLAMA2_7B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
MISTRAL_7B = dict(
    model_type="mistral",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    sliding_window=4096,
    tie_word_embeddings=False,
)
GEMMA2_9B = dict(
    model_type="gemma2",
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
)
GEMMA3_1B = dict(
    model_type="gemma3_text",
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    sliding_window_pattern=6,
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
)
GPT2_SMALL = dict(
    model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12
)


class Big(NamedTuple):
    """A published config, its parameter count, whether it ties embeddings, some shapes."""

    hf: dict[str, Any]
    n_params: int
    tied: bool
    shapes: dict[str, tuple[int, ...]]


BIG: dict[str, Big] = {
    "llama2_7b": Big(
        LLAMA2_7B,
        6_738_415_616,
        False,
        {
            "model.embed_tokens.weight": (32000, 4096),
            "lm_head.weight": (32000, 4096),
            "model.layers.31.self_attn.k_proj.weight": (4096, 4096),
            "model.layers.31.mlp.gate_proj.weight": (11008, 4096),
            "model.layers.31.mlp.down_proj.weight": (4096, 11008),
            "model.norm.weight": (4096,),
        },
    ),
    "mistral_7b": Big(
        MISTRAL_7B,
        7_241_732_096,
        False,
        {
            "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
            "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
            "model.layers.0.self_attn.v_proj.weight": (1024, 4096),
        },
    ),
    "gemma2_9b": Big(
        GEMMA2_9B,
        9_241_705_984,
        True,
        {
            "model.embed_tokens.weight": (256000, 3584),
            "model.layers.41.self_attn.q_proj.weight": (4096, 3584),
            "model.layers.41.self_attn.k_proj.weight": (2048, 3584),
            "model.layers.41.self_attn.o_proj.weight": (3584, 4096),
            "model.layers.41.pre_feedforward_layernorm.weight": (3584,),
            "model.layers.41.post_feedforward_layernorm.weight": (3584,),
        },
    ),
    "gemma3_1b": Big(
        GEMMA3_1B,
        999_885_952,
        True,
        {
            "model.layers.25.self_attn.q_proj.weight": (1024, 1152),
            "model.layers.25.self_attn.k_proj.weight": (256, 1152),
            "model.layers.25.self_attn.q_norm.weight": (256,),
            "model.layers.25.self_attn.k_norm.weight": (256,),
        },
    ),
    "gpt2_small": Big(
        GPT2_SMALL,
        124_439_808,
        True,
        {
            "transformer.wte.weight": (50257, 768),
            "transformer.wpe.weight": (1024, 768),
            "transformer.h.11.attn.c_attn.weight": (768, 2304),
            "transformer.h.11.attn.c_attn.bias": (2304,),
            "transformer.h.11.mlp.c_fc.weight": (768, 3072),
        },
    ),
}


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(BIG))
def test_abstract_model_shapes_without_allocation(name: str, param_dtype: Any) -> None:
    big = BIG[name]
    config = config_from_hf(big.hf)
    before = _live_bytes()
    model = abstract_model(config, dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert _live_bytes() - before < 1 << 20  # nothing close to a real weight was allocated
    flat = {
        ".".join(map(str, path)): var.get_value()
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
    assert all(v.dtype == param_dtype for v in flat.values())
    n_params = sum(math.prod(v.shape) for v in flat.values())
    assert abs(n_params - big.n_params) <= 0.01 * big.n_params
    assert n_params == big.n_params  # the layout is exact, not just close
    assert config.tie_word_embeddings == big.tied
    assert ("lm_head.weight" in flat) == (not big.tied)
    for key, shape in big.shapes.items():
        assert flat[key].shape == shape, key


_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_GEMMA = dict(_TINY, head_dim=16, sliding_window=8)

TINY: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=3, n_head=4, bos_token_id=1
    ),
    "gpt2_untied": lambda: transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False
    ),
    "llama": lambda: transformers.LlamaConfig(**_TINY),
    "llama_tied": lambda: transformers.LlamaConfig(**_TINY, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_TINY, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**_TINY),
    "gemma2": lambda: transformers.Gemma2Config(**_GEMMA),
    "gemma2_untied": lambda: transformers.Gemma2Config(**_GEMMA, tie_word_embeddings=False),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_GEMMA, sliding_window_pattern=2),
}


@pytest.mark.parametrize("name", list(TINY))
def test_named_params_equal_hf_state_dict(name: str) -> None:
    hf_config = TINY[name]()
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    config = config_from_hf(hf_config.to_dict())
    # Tied models list the alias `lm_head.weight` in their state dict; nothing else is dropped.
    ignored = ("lm_head.weight",) if config.tie_word_embeddings else ()
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.endswith(ignored)}
    ours = {k: tuple(v.shape) for k, v in named_params(build_model(config, seed=None)).items()}
    assert ours == want
    assert ("lm_head.weight" in ours) == (not config.tie_word_embeddings)


def test_random_init_is_usable() -> None:
    """`build_model(seed=...)` gives finite, non-degenerate logits for every layout."""
    for name in ("gpt2", "gemma3"):
        model = build_model(config_from_hf(TINY[name]().to_dict()), seed=0)
        ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)  # [batch, seq]
        logits = nnx.jit(lambda m, x: m(x).logits)(model, ids)  # [batch, seq, vocab]
        assert logits.shape == (2, 6, 96)
        assert bool(jnp.isfinite(logits).all()) and float(jnp.std(logits)) > 0

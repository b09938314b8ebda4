"""The tiny random Hugging Face parity models (fp32, eager attention) of every model family.

``reference(name)`` builds the transformers model of case ``name`` once and runs it on a
right-padded batch; ``loaded(name)`` is the NNX model with the same weights and its output.
``save_tiny_model`` saves such a model, with the vocabulary of a tokenizer, as a HF directory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.config import ModelConfig, config_from_hf
from resofilter_jax.models.gpt2 import GPT2_IGNORED_KEYS
from resofilter_jax.models.registry import build_model, load_state_dict

VOCAB, SEQ, WINDOW = 128, 24, 8
LENGTHS = (SEQ, 17, 11)  # rows 1 and 2 are right-padded
INIT_STD = 0.15  # large enough that logits are O(1..10), not trivially tiny

TINY_KWARGS = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=INIT_STD,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA_KWARGS = dict(TINY_KWARGS, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW)
GPT2_KWARGS = dict(
    vocab_size=VOCAB,
    n_positions=64,
    n_embd=64,
    n_layer=2,
    n_head=4,
    initializer_range=INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> HF config factory. Every case has a sequence longer than any sliding window.
HF_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": lambda: transformers.GPT2Config(**GPT2_KWARGS),
    "gpt2_unscaled": lambda: transformers.GPT2Config(**GPT2_KWARGS, scale_attn_weights=False),
    "llama": lambda: transformers.LlamaConfig(**TINY_KWARGS),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **TINY_KWARGS,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,  # wavelengths hit all three branches
        },
    ),
    "llama_tied": lambda: transformers.LlamaConfig(**TINY_KWARGS, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY_KWARGS, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**TINY_KWARGS),
    "qwen2_sliding": lambda: transformers.Qwen2Config(
        **TINY_KWARGS, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **GEMMA_KWARGS, attn_logit_softcapping=5.0, final_logit_softcapping=8.0
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **dict(GEMMA_KWARGS, num_hidden_layers=4),
        sliding_window_pattern=2,  # sliding, full, sliding, full
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
}


class Case(NamedTuple):
    """A tiny HF model's weights, inputs and reference outputs."""

    config: ModelConfig
    state_dict: dict[str, np.ndarray]
    ignore: tuple[str, ...]
    input_ids: np.ndarray  # [batch, seq]
    attention_mask: np.ndarray  # [batch, seq]
    logits: np.ndarray  # [batch, seq, vocab]
    hidden: np.ndarray  # [batch, seq, hidden]
    hf: Any  # the transformers model


def _inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(len(LENGTHS), SEQ))
    mask = (np.arange(SEQ)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.where(mask > 0, ids, 0), mask


def _ignored(config: ModelConfig) -> tuple[str, ...]:
    if config.arch == "gpt2":
        return GPT2_IGNORED_KEYS
    return ("lm_head.weight",) if config.tie_word_embeddings else ()


@functools.cache
def reference(name: str) -> Case:
    """Builds the HF model of case `name` once and runs it on a padded batch."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        HF_CONFIGS[name](), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():  # non-trivial norm weights and biases (HF initialises them to 0/1)
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    ids, mask = _inputs(seed=len(name))
    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        logits = hf(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
        hidden = hf.base_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
    config = config_from_hf(hf.config.to_dict())
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    return Case(config, state, _ignored(config), ids, mask, logits, hidden, hf)


@functools.cache
def loaded(name: str, dtype: Any = jnp.float32) -> tuple[CausalLM, Any]:
    """The NNX model of case `name` with the HF weights, and its output on the batch."""
    case = reference(name)
    model = build_model(case.config, dtype=dtype, param_dtype=dtype, seed=None)
    load_state_dict(model, case.state_dict, ignore=case.ignore, strict=True)
    out = model(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask))
    return model, out


def save_tiny_model(name: str, tokenizer: Any, path: Any, seed: int = 0, positions: int = 0) -> Any:
    """Saves a tiny random HF model of parity case ``name`` (vocab fitted to ``tokenizer``).

    Built like :func:`reference` (fp32, eager, perturbed 1-D params), with the vocabulary and
    special ids of ``tokenizer``; model and tokenizer go to ``path``. ``positions`` > 0 sets
    ``max_position_embeddings`` (RoPE models: no new weights). Returns the torch model.
    """
    config = HF_CONFIGS[name]()
    if positions:
        config.max_position_embeddings = positions
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return hf

"""One architecture description for every supported causal LM, parsed from Hugging Face configs."""

from __future__ import annotations

import dataclasses
from typing import Any

# Hugging Face `model_type` -> our architecture family.
ARCH_OF_MODEL_TYPE: dict[str, str] = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

HF_ARCHITECTURE_NAME: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not one resofilter_jax implements."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / legacy `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM; field names follow Hugging Face where one exists.

    `arch` is the family that decides the module layout (gpt2, llama, gemma2, gemma3);
    `model_type` is the Hugging Face name used on export (llama, mistral, qwen2, ...).
    """

    arch: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False  # q/k/v(/o) bias (Qwen2 has q/k/v only)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # Gemma 3 sliding layers
    layer_types: tuple[str, ...] = ()  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale = this ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def num_params_estimate(self) -> int:
        """Rough parameter count (embeddings included once)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        attn = h * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = (2 if self.arch == "gpt2" else 3) * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * (attn + mlp) + emb

    def attention_scale(self) -> float:
        """Softmax scale applied to q.k."""
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        if self.sliding_window is None or not self.layer_types:
            return False
        return self.layer_types[layer] == "sliding_attention"


def _rope_from_dict(d: dict[str, Any] | None, default_theta: float) -> RopeConfig:
    d = dict(d or {})
    rope_type = d.get("rope_type", d.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} is not supported (supported: default, linear, llama3)"
        )
    return RopeConfig(
        theta=float(d.get("rope_theta", default_theta)),
        rope_type=rope_type,
        factor=float(d.get("factor", 1.0)),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
    )


def _rope_configs(hf: dict[str, Any], default_theta: float) -> tuple[RopeConfig, RopeConfig | None]:
    """Reads HF rope settings in both the v5 (`rope_parameters`) and legacy formats."""
    params = hf.get("rope_parameters")
    theta = float(hf.get("rope_theta", default_theta))
    local_theta = hf.get("rope_local_base_freq")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = _rope_from_dict(params.get("full_attention"), theta)
        local = params.get("sliding_attention")
        return full, (_rope_from_dict(local, float(local_theta or 10000.0)) if local else None)
    legacy = dict(hf.get("rope_scaling") or {})
    legacy.setdefault("rope_theta", theta)
    full = _rope_from_dict(params if isinstance(params, dict) else legacy, theta)
    local = RopeConfig(theta=float(local_theta)) if local_theta is not None else None
    return full, local


def _layer_types(hf: dict[str, Any], arch: str, n_layers: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types:
        return tuple(types)
    if arch == "gemma2":  # even layers slide, odd layers are global
        return tuple(
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
        )
    if arch == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        return tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(n_layers)
        )
    if hf.get("model_type") == "qwen2" and hf.get("use_sliding_window", False):
        first = int(hf.get("max_window_layers", 28))
        return tuple(
            "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)
        )
    if hf.get("model_type") == "mistral" and _sliding_window(hf) is not None:
        return ("sliding_attention",) * n_layers
    return ("full_attention",) * n_layers


def _token_ids(value: Any) -> int | tuple[int, ...] | None:
    """HF token-id fields may be an int or a list; keep them hashable."""
    return tuple(value) if isinstance(value, list) else value


def _sliding_window(hf: dict[str, Any]) -> int | None:
    """The window as HF applies it (Mistral defaults to 4096 when the key is absent)."""
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    default = (
        4096 if hf.get("model_type") in ("mistral", "qwen2", "gemma2", "gemma3_text") else None
    )
    window = hf.get("sliding_window", default)
    return int(window) if window is not None else None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face `config.json` dict.

    Raises:
        UnsupportedArchitectureError: the model type is not implemented.
    """
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: use the text model
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in ARCH_OF_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} (architectures={hf.get('architectures')}) is not "
            f"supported; supported: {sorted(ARCH_OF_MODEL_TYPE)}"
        )
    arch = ARCH_OF_MODEL_TYPE[model_type]
    if arch == "gpt2":
        n_embd, n_head = int(hf["n_embd"]), int(hf["n_head"])
        return ModelConfig(
            arch=arch,
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=n_embd,
            intermediate_size=int(hf.get("n_inner") or 4 * n_embd),
            num_hidden_layers=int(hf["n_layer"]),
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            head_dim=n_embd // n_head,
            max_position_embeddings=int(hf.get("n_positions", 1024)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            hidden_act=hf.get("activation_function", "gelu_new"),
            attention_bias=True,
            o_proj_bias=True,
            mlp_bias=True,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_token_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=hf,
        )
    n_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    n_layers = int(hf["num_hidden_layers"])
    gemma = arch in ("gemma2", "gemma3")
    # HF class defaults where a Gemma key is absent (Gemma 3's global rope theta is 1e6).
    rope, rope_local = _rope_configs(hf, 1_000_000.0 if arch == "gemma3" else 10000.0)
    if arch == "gemma3" and rope_local is None:
        rope_local = RopeConfig(theta=10000.0)
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    act = act or ("gelu_pytorch_tanh" if gemma else "silu")
    gemma2 = arch == "gemma2"
    return ModelConfig(
        arch=arch,
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or (256 if gemma else hidden // n_heads)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=act,
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_proj_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        rope=rope,
        rope_local=rope_local,
        layer_types=_layer_types(hf, arch, n_layers),
        sliding_window=_sliding_window(hf),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else None,
        attn_logit_softcapping=(
            hf.get("attn_logit_softcapping", 50.0 if gemma2 else None) if gemma else None
        ),
        final_logit_softcapping=(
            hf.get("final_logit_softcapping", 30.0 if gemma2 else None) if gemma else None
        ),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        hf_config=hf,
    )

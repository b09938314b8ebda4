"""Tiny random transformers models written to GGUF files the way llama.cpp's
``convert_hf_to_gguf.py`` does (metadata keys, tensor names, q/k rows permuted for Llama, Gemma
norms stored as ``1 + w``, GPT-2 Conv1D weights stored [out, in], F32 or Q8_0)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import transformers
from gguf import GGMLQuantizationType as QType

VOCAB, SEQ, WINDOW, BATCH = 128, 12, 4, 2
INIT_STD = 0.15
BOS, EOS, PAD = 1, 2, 0

_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=INIT_STD,
    rms_norm_eps=1e-5,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
# transformers' GGUF loader does not read Gemma's query_pre_attn_scalar (defaults to 256) nor the
# soft-caps (default 50/30), so the cases it is compared on use exactly those values.
_GEMMA = dict(_TINY, head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW)
_GPT2 = dict(
    vocab_size=VOCAB,
    n_positions=1024,
    n_embd=64,
    n_layer=2,
    n_head=4,
    layer_norm_epsilon=1e-4,
    initializer_range=INIT_STD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny architecture and how its GGUF file is written."""

    arch: str  # GGUF `general.architecture`
    hf_config: Callable[[], transformers.PretrainedConfig]
    quant: QType = QType.F32  # of 2-D weights but `output` (1-D ones stay F32, as in llama.cpp)
    write_vocab_size: bool = True  # else the vocab size comes from the tokenizer tokens
    write_key_length: bool = True  # else head_dim comes from `rope.dimension_count` (llama)
    vs_transformers: bool = True  # compare with transformers' GGUF loader (else: the original)


CASES: dict[str, Case] = {
    # head_dim 32 != hidden / heads; like older llama.cpp files only `rope.dimension_count`.
    "llama_gqa": Case(
        "llama",
        lambda: transformers.LlamaConfig(**dict(_TINY, head_dim=32), rope_theta=50000.0),
        write_key_length=False,
    ),
    # Llama 3 rope scaling reaches llama.cpp files only as the `rope_freqs` tensor, which
    # transformers' GGUF loader ignores: compared with the original model only.
    "llama3_rope": Case(
        "llama",
        lambda: transformers.LlamaConfig(
            **dict(_TINY, head_dim=32),
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,  # wavelengths hit all three branches
            },
        ),
        vs_transformers=False,
    ),
    "llama_tied_q8_0": Case(
        "llama",
        lambda: transformers.LlamaConfig(**_TINY, tie_word_embeddings=True),
        quant=QType.Q8_0,
        write_vocab_size=False,
    ),
    "qwen2": Case("qwen2", lambda: transformers.Qwen2Config(**_TINY, rope_theta=1e6)),
    "gemma2": Case(
        "gemma2",
        lambda: transformers.Gemma2Config(
            **_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
        ),
    ),
    # transformers' GGUF loader drops the soft-caps and query_pre_attn_scalar stored in the file
    # (it falls back to 50 / 30 / 256), so this case is compared with the original model only.
    "gemma2_softcaps": Case(
        "gemma2",
        lambda: transformers.Gemma2Config(
            **dict(_GEMMA, head_dim=16, query_pre_attn_scalar=16),
            attn_logit_softcapping=5.0,
            final_logit_softcapping=8.0,
        ),
        vs_transformers=False,
    ),
    # 6 layers: llama.cpp's fixed pattern makes layers 0-4 sliding and layer 5 global.
    "gemma3": Case(
        "gemma3",
        lambda: transformers.Gemma3TextConfig(
            **dict(_GEMMA, num_hidden_layers=6), sliding_window_pattern=6
        ),
    ),
    # transformers' GGUF loader reads neither n_positions nor n_inner: keep their defaults.
    "gpt2": Case("gpt2", lambda: transformers.GPT2Config(**_GPT2)),
    # Quantized, llama.cpp's extra copy of GPT-2's head (kept F32 here) differs from the
    # embedding: the head must come from `output.weight`, as in llama.cpp and transformers.
    "gpt2_q8_0": Case("gpt2", lambda: transformers.GPT2Config(**_GPT2), quant=QType.Q8_0),
}


# --------------------------------------------------------------------------- GGUF writing


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF half-split rotary -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(case: Case, hf: Any) -> dict[str, np.ndarray]:
    """The state dict of `hf` under llama.cpp's names and conventions (float32)."""
    cfg = hf.config
    name_map = gguf.get_tensor_name_map(
        {
            "llama": gguf.MODEL_ARCH.LLAMA,
            "qwen2": gguf.MODEL_ARCH.QWEN2,
            "gemma2": gguf.MODEL_ARCH.GEMMA2,
            "gemma3": gguf.MODEL_ARCH.GEMMA3,
            "gpt2": gguf.MODEL_ARCH.GPT2,
        }[case.arch],
        cfg.num_hidden_layers,
    )
    out: dict[str, np.ndarray] = {}
    for hf_name, t in hf.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings and case.arch != "gpt2":
            continue
        w = t.detach().numpy().astype(np.float32)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if case.arch == "llama" and ".attn_q." in name:
            w = permute(w, cfg.num_attention_heads)
        if case.arch == "llama" and ".attn_k." in name:
            w = permute(w, cfg.num_key_value_heads)
        if case.arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1.0
        if case.arch == "gpt2" and w.ndim == 2 and name.startswith("blk."):
            w = w.T  # Conv1D [in, out] -> [out, in]
        out[name] = np.ascontiguousarray(w)
        if case.arch == "gpt2" and name == "token_embd.weight":
            out["output.weight"] = out[name].copy()  # llama.cpp writes GPT-2's tied head twice
    if cfg.model_type == "llama" and cfg.rope_parameters["rope_type"] == "llama3":
        out["rope_freqs.weight"] = _llama3_rope_freqs(cfg)
    return out


def _llama3_rope_freqs(cfg: Any) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor: the divisor of each rotary frequency (Llama 3)."""
    rope = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    old_len, lo, hi = (
        rope["original_max_position_embeddings"],
        rope["low_freq_factor"],
        rope["high_freq_factor"],
    )
    divisors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_len / hi:
            divisors.append(1.0)
        elif wavelen > old_len / lo:
            divisors.append(rope["factor"])
        else:
            smooth = (old_len / wavelen - lo) / (hi - lo)
            divisors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    divisors = np.asarray(divisors, np.float32)
    assert 1.0 in divisors and rope["factor"] in divisors and len(set(divisors)) > 3
    return divisors


def write_metadata(w: gguf.GGUFWriter, case: Case, cfg: Any) -> None:
    """llama.cpp's hyperparameter keys and a small GPT-2-style tokenizer."""
    a = case.arch
    if a == "gpt2":
        w.add_uint32(f"{a}.block_count", cfg.n_layer)
        w.add_uint32(f"{a}.context_length", cfg.n_positions)
        w.add_uint32(f"{a}.embedding_length", cfg.n_embd)
        w.add_uint32(f"{a}.feed_forward_length", cfg.n_inner or 4 * cfg.n_embd)
        w.add_uint32(f"{a}.attention.head_count", cfg.n_head)
        w.add_float32(f"{a}.attention.layer_norm_epsilon", cfg.layer_norm_epsilon)
    else:
        w.add_uint32(f"{a}.block_count", cfg.num_hidden_layers)
        w.add_uint32(f"{a}.context_length", cfg.max_position_embeddings)
        w.add_uint32(f"{a}.embedding_length", cfg.hidden_size)
        w.add_uint32(f"{a}.feed_forward_length", cfg.intermediate_size)
        w.add_uint32(f"{a}.attention.head_count", cfg.num_attention_heads)
        w.add_uint32(f"{a}.attention.head_count_kv", cfg.num_key_value_heads)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if a == "llama":
            w.add_uint32(f"{a}.rope.dimension_count", head_dim)
        if case.write_key_length:
            w.add_uint32(f"{a}.attention.key_length", head_dim)
            w.add_uint32(f"{a}.attention.value_length", head_dim)
        if a != "gemma2":  # llama.cpp writes no rope base for Gemma 2 (HF's default 10000)
            theta = cfg.rope_parameters
            theta = theta.get("full_attention", theta)["rope_theta"]
            w.add_float32(f"{a}.rope.freq_base", theta)
        if a.startswith("gemma"):
            w.add_uint32(f"{a}.attention.sliding_window", cfg.sliding_window)
        if a == "gemma2":
            w.add_float32(f"{a}.attn_logit_softcapping", cfg.attn_logit_softcapping)
            w.add_float32(f"{a}.final_logit_softcapping", cfg.final_logit_softcapping)
    if case.write_vocab_size:
        w.add_uint32(f"{a}.vocab_size", cfg.vocab_size)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])
    w.add_array("tokenizer.ggml.token_type", [3 if i < 3 else 1 for i in range(cfg.vocab_size)])
    w.add_array("tokenizer.ggml.merges", ["t 1", "t 2"])
    w.add_uint32("tokenizer.ggml.bos_token_id", BOS)
    w.add_uint32("tokenizer.ggml.eos_token_id", EOS)
    if a != "gpt2":
        w.add_uint32("tokenizer.ggml.padding_token_id", PAD)


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    metadata: Callable[[gguf.GGUFWriter], None] = lambda w: None,
    quant: QType = QType.F32,
) -> Path:
    """Writes `tensors` (float32) to a GGUF file, 2-D ones but `output` quantized to `quant`."""
    w = gguf.GGUFWriter(str(path), arch)
    metadata(w)
    for name, t in tensors.items():
        if quant != QType.F32 and t.ndim == 2 and name != "output.weight":
            w.add_tensor(name, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""GGUF files -> Hugging Face config dict and HF-named float32 tensors.

Dequantization is done by the `gguf` package. Tensor names are mapped from llama.cpp's
naming (`blk.3.ffn_up.weight`) to Hugging Face's (`model.layers.3.mlp.up_proj.weight`), undoing
the conversions llama.cpp applies on export (rotary permutation of q/k for Llama-family models,
`1 + w` for Gemma norms, the [out, in] layout of GPT-2's Conv1D weights).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.models.config import UnsupportedArchitectureError

# GGUF `general.architecture` -> HF model_type.
MODEL_TYPE_OF_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "gpt2": "gpt2",
}

_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_BLOCK = {
    **_LLAMA_BLOCK,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFFile:
    """A GGUF checkpoint: metadata, HF-style config and dequantized HF-named tensors."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self._reader = gguf.GGUFReader(str(self.path))
        self.arch = str(self.field("general.architecture"))
        if self.arch not in MODEL_TYPE_OF_GGUF_ARCH:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {self.arch!r} in {self.path.name} is not supported; "
                f"supported: {sorted(MODEL_TYPE_OF_GGUF_ARCH)}"
            )
        self.model_type = MODEL_TYPE_OF_GGUF_ARCH[self.arch]
        self._tensor_names = {t.name for t in self._reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (scalars and strings decoded), or `default`."""
        f = self._reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def _a(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict built from the GGUF metadata."""
        n_vocab = self._a("vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        common = {
            "model_type": self.model_type,
            "vocab_size": int(n_vocab),
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
            "tie_word_embeddings": "output.weight" not in self._tensor_names,
        }
        if self.arch == "gpt2":
            return {
                **common,
                "n_embd": int(self._a("embedding_length")),
                "n_layer": int(self._a("block_count")),
                "n_head": int(self._a("attention.head_count")),
                "n_positions": int(self._a("context_length")),
                "n_inner": int(self._a("feed_forward_length")),
                "layer_norm_epsilon": float(self._a("attention.layer_norm_epsilon", 1e-5)),
                "activation_function": "gelu_new",
                "tie_word_embeddings": True,
            }
        n_heads = int(self._a("attention.head_count"))
        hidden = int(self._a("embedding_length"))
        cfg = {
            **common,
            "hidden_size": hidden,
            "intermediate_size": int(self._a("feed_forward_length")),
            "num_hidden_layers": int(self._a("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._a("attention.head_count_kv", n_heads)),
            "head_dim": int(self._a("attention.key_length", hidden // n_heads)),
            "max_position_embeddings": int(self._a("context_length", 2048)),
            "rms_norm_eps": float(self._a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._a("rope.freq_base", 10000.0)),
        }
        scaling = self._a("rope.scaling.type")
        if scaling == "linear":
            cfg["rope_scaling"] = {
                "rope_type": "linear",
                "factor": float(self._a("rope.scaling.factor")),
            }
        if self.arch in ("gemma2", "gemma3"):
            cfg["hidden_activation"] = "gelu_pytorch_tanh"
            cfg["sliding_window"] = self._a("attention.sliding_window")
            cfg["query_pre_attn_scalar"] = cfg["head_dim"]
            if self.arch == "gemma2":
                cfg["attn_logit_softcapping"] = self._a("attn_logit_softcapping")
                cfg["final_logit_softcapping"] = self._a("final_logit_softcapping")
            else:
                cfg["rope_local_base_freq"] = 10000.0
        elif self.arch == "mistral":
            cfg["sliding_window"] = self._a("attention.sliding_window")
        return cfg

    def hf_name(self, gguf_name: str) -> str:
        """llama.cpp tensor name -> HF state-dict key."""
        top = "transformer." if self.arch == "gpt2" else "model."
        fixed = {
            "token_embd.weight": "transformer.wte.weight"
            if self.arch == "gpt2"
            else "model.embed_tokens.weight",
            "position_embd.weight": "transformer.wpe.weight",
            "output_norm.weight": "transformer.ln_f.weight"
            if self.arch == "gpt2"
            else "model.norm.weight",
            "output_norm.bias": "transformer.ln_f.bias",
            "output.weight": "lm_head.weight",
        }
        if gguf_name in fixed:
            return fixed[gguf_name]
        m = _BLOCK_RE.match(gguf_name)
        block = {"gpt2": _GPT2_BLOCK, "gemma2": _GEMMA_BLOCK, "gemma3": _GEMMA_BLOCK}.get(
            self.arch, _LLAMA_BLOCK
        )
        if not m or m.group(2) not in block:
            raise UnsupportedArchitectureError(
                f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart for {self.arch}"
            )
        layer_prefix = "h" if self.arch == "gpt2" else "layers"
        return f"{top}{layer_prefix}.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"

    def _fix(self, gguf_name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
        """Undoes llama.cpp's export transforms on one dequantized tensor."""
        if self.arch in ("llama", "mistral") and re.search(
            r"\.attn_[qk]\.(weight|bias)$", gguf_name
        ):
            heads = (
                cfg["num_attention_heads"]
                if ".attn_q." in gguf_name
                else cfg["num_key_value_heads"]
            )
            half = w.shape[0] // heads // 2
            # llama.cpp interleaves the rotary halves per head; restore HF's half-split order.
            w = w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if self.arch in ("gemma2", "gemma3") and gguf_name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w)
        if self.arch == "gpt2" and w.ndim == 2 and gguf_name.startswith("blk."):
            w = w.T  # Conv1D keeps [in, out]
        return np.ascontiguousarray(w, dtype=np.float32)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (HF name, float32 array in HF layout) for every tensor, one at a time."""
        import gguf

        cfg = self.hf_config()
        for t in self._reader.tensors:
            w = gguf.dequantize(t.data, t.tensor_type)
            # GGUF lists dims fastest-first; numpy data is already row-major [.., out, in].
            w = np.asarray(w).reshape(tuple(int(d) for d in reversed(t.shape)))
            yield self.hf_name(t.name), self._fix(t.name, w, cfg)

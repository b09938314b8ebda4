"""GGUF files -> Hugging Face config dict and HF-named float32 tensors.

The header is parsed here, lazily: metadata arrays (a tokenizer's tens of thousands of tokens
and merges) are only skipped over, and decoded when `field()` asks for them. Dequantization is
done by the `gguf` package. Tensor names are mapped from llama.cpp's naming (`blk.3.ffn_up.weight`)
to Hugging Face's (`model.layers.3.mlp.up_proj.weight`), undoing the conversions llama.cpp applies
on export (rotary permutation of q/k for Llama-family models, `1 + w` for Gemma norms, the
[out, in] layout of GPT-2's Conv1D weights, Llama 3 rope scaling baked into `rope_freqs`).
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from resofilter_jax.models.config import UnsupportedArchitectureError

# GGUF `general.architecture` -> HF model_type.
MODEL_TYPE_OF_GGUF_ARCH = {a: a for a in ("llama", "mistral", "qwen2", "gemma2", "gpt2")}
MODEL_TYPE_OF_GGUF_ARCH["gemma3"] = "gemma3_text"


def _table(pairs: str) -> dict[str, str]:
    """'gguf=hf gguf2=hf2' -> {gguf: hf, ...}."""
    return dict(pair.split("=") for pair in pairs.split())


# llama.cpp block tensor -> HF module under `model.layers.N.` / `transformer.h.N.`.
_LLAMA_BLOCK = _table(
    "attn_norm=input_layernorm ffn_norm=post_attention_layernorm attn_q=self_attn.q_proj "
    "attn_k=self_attn.k_proj attn_v=self_attn.v_proj attn_output=self_attn.o_proj "
    "ffn_gate=mlp.gate_proj ffn_up=mlp.up_proj ffn_down=mlp.down_proj"
)
_GEMMA_BLOCK = _LLAMA_BLOCK | _table(
    "ffn_norm=pre_feedforward_layernorm post_attention_norm=post_attention_layernorm "
    "post_ffw_norm=post_feedforward_layernorm attn_q_norm=self_attn.q_norm "
    "attn_k_norm=self_attn.k_norm"
)
_GPT2_BLOCK = _table(
    "attn_norm=ln_1 attn_qkv=attn.c_attn attn_output=attn.c_proj ffn_norm=ln_2 "
    "ffn_up=mlp.c_fc ffn_down=mlp.c_proj"
)
# Tensors outside the blocks, for (GPT-2, the others).
_TOP = {
    "token_embd": ("transformer.wte", "model.embed_tokens"),
    "position_embd": ("transformer.wpe", None),
    "output_norm": ("transformer.ln_f", "model.norm"),
    "output": ("lm_head", "lm_head"),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3 rope-scaling divisors, not a parameter

# GGUF metadata value types (little-endian numpy dtypes); 8 is a string, 9 an array.
_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_SCALARS |= {10: "<u8", 11: "<i8", 12: "<f8"}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class _Array(NamedTuple):  # a metadata array not decoded yet
    offset: int  # of its first item
    count: int
    item_type: int


class GGUFFile:
    """A GGUF checkpoint: metadata, HF-style config and dequantized HF-named tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            head = f.read(8).ljust(8, b"\0")
            if head[:4] != b"GGUF" or head[4:] not in (b"\2\0\0\0", b"\3\0\0\0"):
                raise ValueError(f"{self.path} is not a little-endian GGUF v2/v3 file")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n_tensors, n_fields = struct.unpack_from("<QQ", self._buf, 8)
        off = 24
        self._fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key, off = self._string(off)
            self._fields[key], off = self._value(off + 4, _U32.unpack_from(self._buf, off)[0])
        self._infos: dict[str, tuple[tuple[int, ...], int, int]] = {}  # name -> dims, type, offset
        for _ in range(n_tensors):
            name, off = self._string(off)
            n_dims = _U32.unpack_from(self._buf, off)[0]
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, off + 4)
            ggml_type, t_off = struct.unpack_from("<IQ", self._buf, off + 4 + 8 * n_dims)
            self._infos[name] = (dims, ggml_type, t_off)
            off += 16 + 8 * n_dims
        align = int(self.field("general.alignment", 32))
        self._data_start = off + (-off) % align
        self.arch = str(self.field("general.architecture"))
        if self.arch not in MODEL_TYPE_OF_GGUF_ARCH:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {self.arch!r} in {self.path.name} is not supported; "
                f"supported: {sorted(MODEL_TYPE_OF_GGUF_ARCH)}"
            )
        self.model_type = MODEL_TYPE_OF_GGUF_ARCH[self.arch]
        self._config: dict[str, Any] | None = None

    def _string(self, off: int) -> tuple[str, int]:
        n = _U64.unpack_from(self._buf, off)[0]
        return self._buf[off + 8 : off + 8 + n].decode("utf-8", errors="replace"), off + 8 + n

    def _value(self, off: int, vtype: int) -> tuple[Any, int]:
        """(value, offset after it); arrays come back as an undecoded `_Array`."""
        if vtype == 8:
            return self._string(off)
        if vtype == 9:
            item_type, count = struct.unpack_from("<IQ", self._buf, off)
            start = end = off + 12
            if item_type in _SCALARS:
                end += count * np.dtype(_SCALARS[item_type]).itemsize
            elif item_type == 8:  # skip strings without decoding them
                for _ in range(count):
                    end += 8 + _U64.unpack_from(self._buf, end)[0]
            else:
                for _ in range(count):
                    end = self._value(end, item_type)[1]
            return _Array(start, count, item_type), end
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {off}")
        dtype = np.dtype(_SCALARS[vtype])
        return np.frombuffer(self._buf, dtype, 1, off)[0].item(), off + dtype.itemsize

    def _decode(self, value: Any) -> Any:
        if not isinstance(value, _Array):
            return value
        if dtype := _SCALARS.get(value.item_type):
            return np.frombuffer(self._buf, dtype, value.count, value.offset).tolist()
        items, off = [], value.offset
        for _ in range(value.count):
            item, off = self._value(off, value.item_type)
            items.append(self._decode(item))
        return items

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (scalar, string, or list for arrays), or `default`."""
        if key not in self._fields:
            return default
        self._fields[key] = self._decode(self._fields[key])
        return self._fields[key]

    def _a(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def _vocab_size(self) -> int:
        if emb := self._infos.get("token_embd.weight"):  # ggml dims: [hidden, vocab]
            return int(emb[0][-1])
        tokens = self._fields.get("tokenizer.ggml.tokens")
        n_tokens = tokens.count if isinstance(tokens, _Array) else len(tokens or ())
        return int(self._a("vocab_size") or n_tokens)

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict built from the GGUF metadata."""
        self._config = self._config or self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict[str, Any]:
        common = {
            "model_type": self.model_type,
            "vocab_size": self._vocab_size(),
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
            # llama.cpp writes GPT-2's tied head twice; like llama.cpp, use `output` when present.
            "tie_word_embeddings": "output.weight" not in self._infos,
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
            }
        n_heads = int(self._a("attention.head_count"))
        hidden = int(self._a("embedding_length"))
        n_layers = int(self._a("block_count"))
        head_dim = self._a("attention.key_length") or self._a("rope.dimension_count")
        cfg = {
            **common,
            "hidden_size": hidden,
            "intermediate_size": int(self._a("feed_forward_length")),
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._a("attention.head_count_kv", n_heads)),
            "head_dim": int(head_dim or hidden // n_heads),
            "max_position_embeddings": int(self._a("context_length", 2048)),
            "rms_norm_eps": float(self._a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._a("rope.freq_base", 1e6 if self.arch == "gemma3" else 1e4)),
        }
        scaling = self._a("rope.scaling.type")
        if scaling not in (None, "none"):  # config_from_hf rejects types it cannot run
            factor = float(self._a("rope.scaling.factor", 1.0))
            cfg["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        if _ROPE_FREQS in self._infos:
            cfg["rope_scaling"] = self._llama3_rope(cfg["rope_theta"], cfg["head_dim"])
        if self.arch in ("gemma2", "gemma3"):
            cfg["hidden_activation"] = "gelu_pytorch_tanh"
            # llama.cpp's defaults when a key is absent: Gemma 2 slides over 4096 tokens and
            # soft-caps at 50 / 30; Gemma 3 without a window does not slide at all.
            window = self._a("attention.sliding_window", 4096 if self.arch == "gemma2" else 0)
            cfg["sliding_window"] = int(window) or None
            # llama.cpp scales by head_dim ** -0.5, except for the 27B models (by their layer
            # count), which use (hidden / heads) ** -0.5 as their HF query_pre_attn_scalar does.
            big = n_layers == (46 if self.arch == "gemma2" else 62)
            cfg["query_pre_attn_scalar"] = hidden // n_heads if big else cfg["head_dim"]
            if self.arch == "gemma2":
                cfg["attn_logit_softcapping"] = float(self._a("attn_logit_softcapping", 50.0))
                cfg["final_logit_softcapping"] = float(self._a("final_logit_softcapping", 30.0))
            else:
                cfg["final_logit_softcapping"] = self._a("final_logit_softcapping")
                cfg["rope_local_base_freq"] = float(self._a("rope.freq_base_swa", 10000.0))
        elif self.arch == "mistral":
            cfg["sliding_window"] = self._a("attention.sliding_window")
        return cfg

    def _llama3_rope(self, theta: float, head_dim: int) -> dict[str, Any]:
        """HF's llama3 `rope_scaling`, recovered from llama.cpp's per-frequency divisors."""
        divisors = self._array(_ROPE_FREQS).astype(np.float64)
        wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
        factor, ctx = float(divisors.max()), 8192
        mid = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
        lo, hi = 1.0, 4.0
        if mid.sum() >= 2 and factor > 1:  # smooth = (ctx / wavelen - lo) / (hi - lo)
            smooth = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit(ctx / wavelen[mid], smooth, 1)
            lo, hi = round(-intercept / slope, 4), round((1 - intercept) / slope, 4)
        smooth = np.clip((ctx / wavelen - lo) / (hi - lo), 0.0, 1.0)
        if not np.allclose(1 / ((1 - smooth) / factor + smooth), divisors, rtol=1e-5):
            raise UnsupportedArchitectureError(
                f"{self.path.name}: {_ROPE_FREQS} does not follow Llama 3 rope scaling"
            )
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"rope_type": "llama3", **dict(zip(keys, (factor, lo, hi, ctx), strict=True))}

    def hf_name(self, gguf_name: str) -> str:
        """llama.cpp tensor name -> HF state-dict key."""
        gpt2 = self.arch == "gpt2"
        stem, _, kind = gguf_name.rpartition(".")
        top = _TOP.get(stem, (None, None))[0 if gpt2 else 1]
        if top and kind in ("weight", "bias"):
            return f"{top}.{kind}"
        m = _BLOCK_RE.match(gguf_name)
        block = _GPT2_BLOCK if gpt2 else _GEMMA_BLOCK if "gemma" in self.arch else _LLAMA_BLOCK
        if not m or m.group(2) not in block:
            raise UnsupportedArchitectureError(
                f"GGUF tensor {gguf_name!r} in {self.path.name} has no Hugging Face counterpart "
                f"for architecture {self.arch!r}"
            )
        prefix = "transformer.h" if gpt2 else "model.layers"
        return f"{prefix}.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"

    def _fix(self, gguf_name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
        """Undoes llama.cpp's export transforms on one dequantized tensor."""
        qk = re.search(r"\.attn_([qk])\.(weight|bias)$", gguf_name)
        if self.arch in ("llama", "mistral") and qk:
            heads = cfg["num_attention_heads" if qk.group(1) == "q" else "num_key_value_heads"]
            # llama.cpp interleaves the rotary halves per head; restore HF's half-split order.
            w = w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if self.arch in ("gemma2", "gemma3") and gguf_name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w)
        if self.arch == "gpt2" and w.ndim == 2 and gguf_name.startswith("blk."):
            w = w.T  # Conv1D keeps [in, out]
        return np.require(w, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])  # never a file view

    def _array(self, name: str) -> np.ndarray:
        """Tensor `name` dequantized to float32, in numpy (row-major, [.., out, in]) order."""
        import gguf

        dims, ggml_type, t_off = self._infos[name]
        qtype = gguf.GGMLQuantizationType(ggml_type)  # ValueError names an unknown type
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims)) // block * type_size
        start = self._data_start + t_off
        if start + n_bytes > len(self._buf):
            raise ValueError(f"{self.path.name} is truncated: tensor {name!r} runs past its end")
        raw = np.frombuffer(self._buf, np.uint8, n_bytes, start)
        w = gguf.dequantize(raw.reshape(-1, dims[0] // block * type_size), qtype)
        return np.asarray(w, np.float32).reshape(dims[::-1])  # GGUF lists dims fastest-first

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (HF name, float32 array in HF layout) for every tensor, one at a time."""
        cfg = self.hf_config()
        names = {n: self.hf_name(n) for n in self._infos if n != _ROPE_FREQS}  # fail early
        for gguf_name, hf_name in names.items():
            yield hf_name, self._fix(gguf_name, self._array(gguf_name), cfg)

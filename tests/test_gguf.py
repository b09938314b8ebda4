"""GGUF loading vs transformers' own GGUF loader, on tiny random models written like llama.cpp.

Each case builds a tiny random transformers model (fp32, fixed seed), writes it to a GGUF file
the way llama.cpp's `convert_hf_to_gguf.py` does (its metadata keys and tensor names, q/k rows
permuted for Llama, Gemma norms stored as `1 + w`, GPT-2 Conv1D weights stored [out, in], F32 or
Q8_0), then loads the file with `load_model` and with
`transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and compares logits and
configs. F32 files are also compared with the original PyTorch model, which checks the writer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from resofilter_jax.models.config import ModelConfig, UnsupportedArchitectureError, config_from_hf
from resofilter_jax.models.gguf_io import GGUFFile
from resofilter_jax.models.loading import load_model

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


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF half-split rotary -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_tensors(case: Case, hf: Any) -> dict[str, np.ndarray]:
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
            w = _permute(w, cfg.num_attention_heads)
        if case.arch == "llama" and ".attn_k." in name:
            w = _permute(w, cfg.num_key_value_heads)
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


def _write_metadata(w: gguf.GGUFWriter, case: Case, cfg: Any) -> None:
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


# --------------------------------------------------------------------------- references


@dataclasses.dataclass
class Built:
    """A case's GGUF file, original HF model, and inputs."""

    path: Path
    hf: Any
    input_ids: np.ndarray  # [batch, seq]


def _logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()  # [batch, seq, vocab]


@functools.cache
def build(name: str, tmp_dir: Path) -> Built:
    """Builds case `name`'s random HF model and writes its GGUF file into `tmp_dir`."""
    case = CASES[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        case.hf_config(), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():  # norm weights and biases away from HF's 0 / 1 initialisation
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    path = write_gguf(
        tmp_dir / f"{name}.gguf",
        case.arch,
        _gguf_tensors(case, hf),
        lambda w: _write_metadata(w, case, hf.config),
        case.quant,
    )
    ids = np.random.default_rng(len(name)).integers(3, VOCAB, size=(BATCH, SEQ))
    return Built(path, hf, ids)


@functools.cache
def transformers_gguf(name: str, tmp_dir: Path) -> Any:
    """transformers' own GGUF load of case `name` (fp32, eager attention)."""
    b = build(name, tmp_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(
        b.path.parent, gguf_file=b.path.name, attn_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every case's GGUF file."""
    return tmp_path_factory.mktemp("gguf")


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(
        actual, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max())
    )


# --------------------------------------------------------------------------- config views


def _hf_view(cfg: Any) -> dict[str, Any]:
    """The architecture fields of a transformers config, in one vocabulary."""
    if cfg.model_type == "gpt2":
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "layers": cfg.n_layer,
            "heads": cfg.n_head,
            "kv_heads": cfg.n_head,
            "head_dim": cfg.n_embd // cfg.n_head,
            "intermediate_size": cfg.n_inner or 4 * cfg.n_embd,
            "max_positions": cfg.n_positions,
            "eps": cfg.layer_norm_epsilon,
            "tie": cfg.tie_word_embeddings,
        }
    rope = cfg.rope_parameters
    gemma = cfg.model_type.startswith("gemma")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or ("full_attention",) * cfg.num_hidden_layers
    window = cfg.sliding_window if "sliding_attention" in types else None
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_positions": cfg.max_position_embeddings,
        "eps": cfg.rms_norm_eps,
        "rope_theta": rope.get("full_attention", rope)["rope_theta"],
        "rope_theta_local": rope["sliding_attention"]["rope_theta"]
        if "sliding_attention" in rope
        else None,
        "attention_scale": (cfg.query_pre_attn_scalar if gemma else head_dim) ** -0.5,
        "layer_types": ",".join(types),
        "sliding_window": window,
        "attn_softcap": getattr(cfg, "attn_logit_softcapping", None),
        "final_softcap": getattr(cfg, "final_logit_softcapping", None),
        "tie": cfg.tie_word_embeddings,
    }


def _f32(view: dict[str, Any]) -> dict[str, Any]:
    """`view` with floats rounded to float32, the precision GGUF stores them in."""
    return {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in view.items()}


def _our_view(cfg: ModelConfig) -> dict[str, Any]:
    """The same fields of a ModelConfig."""
    view = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_positions": cfg.max_position_embeddings,
        "eps": cfg.norm_eps,
    }
    if cfg.arch == "gpt2":
        return {**view, "tie": cfg.tie_word_embeddings}
    return {
        **view,
        "rope_theta": cfg.rope.theta,
        "rope_theta_local": cfg.rope_local.theta if cfg.rope_local else None,
        "attention_scale": cfg.attention_scale(),
        "layer_types": ",".join(cfg.layer_types),
        "sliding_window": cfg.sliding_window
        if any(map(cfg.is_sliding, range(cfg.num_hidden_layers)))
        else None,
        "attn_softcap": cfg.attn_logit_softcapping,
        "final_softcap": cfg.final_logit_softcapping,
        "tie": cfg.tie_word_embeddings,
    }


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_gguf_loader(name: str, tmp_dir: Path) -> None:
    case, b = CASES[name], build(name, tmp_dir)
    loaded = load_model(b.path, tokenizer=False)
    assert loaded.tokenizer is None and loaded.config.model_type == b.hf.config.model_type
    ours = np.asarray(loaded.model(jnp.asarray(b.input_ids), jnp.ones_like(b.input_ids)).logits)
    original = _logits(b.hf, b.input_ids)
    assert np.abs(original).max() > 1.0, "reference logits are trivially small"
    if case.vs_transformers:
        theirs = _logits(transformers_gguf(name, tmp_dir), b.input_ids)
        _assert_close(ours, theirs)
    if case.quant == QType.F32:
        _assert_close(ours, original)  # also proves the file follows llama.cpp's conventions
    else:  # quantization really changed the weights, and both loaders dequantized alike
        assert np.abs(ours - original).max() > 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_config_matches_transformers(name: str, tmp_dir: Path) -> None:
    case, b = CASES[name], build(name, tmp_dir)
    g = GGUFFile(b.path)
    ours = _our_view(config_from_hf(g.hf_config()))
    original = _hf_view(b.hf.config)
    if case.arch == "gpt2":  # llama.cpp writes GPT-2's tied head again, as `output.weight`
        original["tie"] = False
    assert _f32(ours) == _f32(original), "the GGUF config differs from the original"
    if case.vs_transformers:
        theirs = _hf_view(transformers_gguf(name, tmp_dir).config)
        assert ours == theirs, "the GGUF config differs from transformers' reading of it"
    cfg = config_from_hf(g.hf_config())
    assert (cfg.bos_token_id, cfg.eos_token_id) == (BOS, EOS)
    if case.arch.startswith("gemma"):  # both layer kinds are exercised
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
        assert any(sliding) and not all(sliding) and cfg.sliding_window < SEQ
    if name == "llama3_rope":
        want = b.hf.config.rope_parameters
        assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == want["factor"]
        ratio = cfg.rope.original_max_position_embeddings / want["original_max_position_embeddings"]
        assert cfg.rope.low_freq_factor == pytest.approx(want["low_freq_factor"] * ratio)
        assert cfg.rope.high_freq_factor == pytest.approx(want["high_freq_factor"] * ratio)


# --------------------------------------------------------------------------- metadata and errors


def _hparams(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> Callable:
    """Writes the hyperparameters of a header-only file (no tensors)."""

    def write(w: gguf.GGUFWriter) -> None:
        w.add_uint32(f"{arch}.block_count", layers)
        w.add_uint32(f"{arch}.embedding_length", hidden)
        w.add_uint32(f"{arch}.feed_forward_length", 4 * hidden)
        w.add_uint32(f"{arch}.attention.head_count", heads)
        w.add_uint32(f"{arch}.attention.head_count_kv", heads // 2)
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
        w.add_uint32(f"{arch}.vocab_size", VOCAB)

    return write


@pytest.mark.parametrize(
    ("arch", "layers", "hidden", "heads", "head_dim", "scalar"),
    [
        ("gemma2", 26, 2304, 8, 256, 256),  # 2B: head_dim
        ("gemma2", 46, 4608, 32, 128, 144),  # 27B: hidden / heads, as HF's config says
        ("gemma3", 34, 2560, 8, 256, 256),  # 4B
        ("gemma3", 62, 5376, 32, 128, 168),  # 27B
    ],
)
def test_gemma_defaults_follow_llama_cpp(
    tmp_path: Path, arch: str, layers: int, hidden: int, heads: int, head_dim: int, scalar: int
) -> None:
    """Keys llama.cpp does not always write get llama.cpp's values (attention scale by size)."""
    path = write_gguf(
        tmp_path / "h.gguf", arch, {}, _hparams(arch, layers, hidden, heads, head_dim)
    )
    cfg = config_from_hf(GGUFFile(path).hf_config())
    assert cfg.attention_scale() == pytest.approx(scalar**-0.5)
    assert (cfg.vocab_size, cfg.head_dim, cfg.num_key_value_heads) == (VOCAB, head_dim, heads // 2)
    if arch == "gemma2":  # no keys: 4096-token window, soft-caps 50 / 30
        assert (cfg.sliding_window, cfg.attn_logit_softcapping) == (4096, 50.0)
        assert cfg.final_logit_softcapping == 30.0 and cfg.is_sliding(0)
    else:  # no window key: llama.cpp runs Gemma 3 without sliding attention
        assert cfg.sliding_window is None and not any(map(cfg.is_sliding, range(layers)))
        assert (cfg.rope.theta, cfg.rope_local.theta) == (1e6, 1e4)


def test_fields_match_gguf_reader(tmp_dir: Path) -> None:
    """The lazy header parser decodes every field and tensor as gguf.GGUFReader does."""
    path = tmp_dir / "fields.gguf"

    def metadata(w: gguf.GGUFWriter) -> None:
        _hparams("llama", 2, 64, 4, 16)(w)
        w.add_int8("x.int8", -3)
        w.add_bool("x.bool", True)
        w.add_float64("x.float64", 0.1)
        w.add_uint64("x.uint64", 2**40 + 1)
        w.add_string("x.unicode", "héllo ✓")
        w.add_array("x.floats", [0.5, -1.25])
        w.add_array("x.strings", ["a", "", "ü" * 300])
        w.add_custom_alignment(64)

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((VOCAB, 64), dtype=np.float32)}
    tensors["blk.0.attn_norm.weight"] = rng.standard_normal(64, dtype=np.float32)
    tensors["blk.0.attn_q.weight"] = rng.standard_normal((64, 64), dtype=np.float32)
    write_gguf(path, "llama", tensors, metadata, QType.Q8_0)
    reader, g = gguf.GGUFReader(str(path)), GGUFFile(path)
    for key, f in reader.fields.items():
        if not key.startswith("GGUF."):
            assert g.field(key) == f.contents(), key
    assert g.field("x.missing", "default") == "default"
    got = dict(g.tensors())
    for t in reader.tensors:
        want = gguf.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w = got[g.hf_name(t.name)]
        assert w.dtype == np.float32 and w.flags.writeable
        if t.name == "blk.0.attn_q.weight":  # back to llama.cpp's row order
            w = _permute(w, 4)
        np.testing.assert_array_equal(w, want)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    tensors = {"token_embd.weight": np.zeros((VOCAB, 8), np.float32)}
    path = write_gguf(tmp_path / "bert.gguf", "bert", tensors)
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        GGUFFile(path)
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        load_model(path, tokenizer=False)


def test_unknown_tensor_is_named(tmp_dir: Path) -> None:
    case, b = CASES["llama_gqa"], build("llama_gqa", tmp_dir)
    tensors = _gguf_tensors(case, b.hf)
    tensors["blk.1.attn_mystery.weight"] = np.zeros((4, 64), np.float32)
    path = write_gguf(
        tmp_dir / "mystery.gguf", "llama", tensors, lambda w: _write_metadata(w, case, b.hf.config)
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"blk\.1\.attn_mystery\.weight"):
        load_model(path, tokenizer=False)


def test_rope_freqs_that_are_not_llama3_are_rejected(tmp_path: Path) -> None:
    tensors = {"rope_freqs.weight": np.linspace(1.0, 3.0, 8, dtype=np.float32) ** 2}
    path = write_gguf(tmp_path / "r.gguf", "llama", tensors, _hparams("llama", 2, 64, 4, 16))
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        GGUFFile(path).hf_config()


def test_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model(tmp_path / "missing.gguf", tokenizer=False)
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        GGUFFile(tmp_path / "text.gguf")

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
from support.gguf_writer import (
    BATCH,
    BOS,
    CASES,
    EOS,
    SEQ,
    VOCAB,
    gguf_tensors,
    permute,
    write_gguf,
    write_metadata,
)

from resofilter_jax.models.config import ModelConfig, UnsupportedArchitectureError, config_from_hf
from resofilter_jax.models.gguf_io import GGUFFile
from resofilter_jax.models.loading import load_model

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
        gguf_tensors(case, hf),
        lambda w: write_metadata(w, case, hf.config),
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
            w = permute(w, 4)
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
    tensors = gguf_tensors(case, b.hf)
    tensors["blk.1.attn_mystery.weight"] = np.zeros((4, 64), np.float32)
    path = write_gguf(
        tmp_dir / "mystery.gguf", "llama", tensors, lambda w: write_metadata(w, case, b.hf.config)
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

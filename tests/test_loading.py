"""Loading from HF directories (single and sharded safetensors), export round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support.models import HF_CONFIGS, reference

from resofilter_jax.models.config import UnsupportedArchitectureError
from resofilter_jax.models.export import export_hf
from resofilter_jax.models.loading import load_model
from resofilter_jax.models.registry import CheckpointMismatchError

ROUND_TRIP = ["gpt2", "llama", "llama_tied", "mistral", "qwen2", "gemma2", "gemma3"]


def _assert_logits(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> None:
    valid = mask > 0
    np.testing.assert_allclose(
        np.asarray(actual, np.float32)[valid],
        expected[valid],
        rtol=1e-5,
        atol=1e-5 * float(np.abs(expected[valid]).max()),
    )


def _torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_hf_directory_load_and_export_round_trip(name: str, tmp_path: Path) -> None:
    case = reference(name)
    src = tmp_path / "hf"
    case.hf.save_pretrained(src, safe_serialization=True)

    loaded = load_model(src, tokenizer=False)
    out = loaded.model(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask))
    _assert_logits(np.asarray(out.logits), case.logits, case.attention_mask)

    dst = export_hf(loaded.model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        dst, attn_implementation="eager"
    ).eval()
    assert type(back) is type(case.hf)
    _assert_logits(
        _torch_logits(back, case.input_ids, case.attention_mask), case.logits, case.attention_mask
    )
    want = {k for k in case.hf.state_dict() if not k.endswith(case.ignore)}
    assert want <= set(back.state_dict())


def test_sharded_export_loads_in_both_directions(tmp_path: Path) -> None:
    case = reference("llama")
    loaded = load_model(_saved(case, tmp_path / "hf"), tokenizer=False)
    dst = export_hf(loaded.model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((dst / s).is_file() for s in shards)
    again = load_model(dst, tokenizer=False)
    out = again.model(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask))
    _assert_logits(np.asarray(out.logits), case.logits, case.attention_mask)
    back = transformers.AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager")
    _assert_logits(
        _torch_logits(back.eval(), case.input_ids, case.attention_mask),
        case.logits,
        case.attention_mask,
    )


def test_bfloat16_export_keeps_dtype(tmp_path: Path) -> None:
    case = reference("llama")
    loaded = load_model(_saved(case, tmp_path / "hf"), tokenizer=False)
    dst = export_hf(loaded.model, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype="auto")
    assert back.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    again = load_model(dst, dtype="bfloat16", param_dtype="bfloat16", tokenizer=False)
    assert again.model.model.layers[0].mlp.up_proj.weight[...].dtype == jnp.bfloat16


def _saved(case, path: Path) -> Path:
    case.hf.save_pretrained(path, safe_serialization=True)
    return path


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere", tokenizer=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, tokenizer=False)


def test_missing_weights_and_missing_shard_are_named(tmp_path: Path) -> None:
    case = reference("llama")
    src = _saved(case, tmp_path / "hf")
    for f in src.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(src, tokenizer=False)
    loaded = load_model(_saved(case, tmp_path / "hf2"), tokenizer=False)
    dst = export_hf(loaded.model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(dst, tokenizer=False)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        load_model(tmp_path, tokenizer=False)


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    case = reference("llama")
    src = _saved(case, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight"):
        load_model(src, tokenizer=False)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    case = reference("llama")
    src = _saved(case, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors \['model\.layers\.1"):
        load_model(src, tokenizer=False)


def test_hub_id_without_network_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local path"):
        load_model("no-such-org/no-such-model", tokenizer=False)


def test_hf_directory_tokenizer_is_loaded(tmp_path: Path, smollm2_hf_dir: Path) -> None:
    loaded = load_model(smollm2_hf_dir)
    assert loaded.tokenizer("Hello world").input_ids == [19556, 905]


def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path: Path) -> None:
    text = HF_CONFIGS["gemma3"]()
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=5,
        boi_token_index=6,
        eoi_token_index=7,
    )
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "mm", safe_serialization=True)
    case = reference("gemma3")  # same text config: same batch layout
    with torch.no_grad():
        want = hf(
            input_ids=torch.from_numpy(case.input_ids),
            attention_mask=torch.from_numpy(case.attention_mask),
        ).logits.numpy()
    loaded = load_model(tmp_path / "mm", tokenizer=False)
    assert loaded.config.model_type == "gemma3_text"
    out = loaded.model(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask))
    _assert_logits(np.asarray(out.logits), want, case.attention_mask)


def test_gguf_tokenizer_is_cached_and_identical(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converted GGUF tokenizer is saved once and the cached copy tokenizes identically."""
    from resofilter_jax.models import loading

    monkeypatch.setenv("RESOFILTER_CACHE", str(tmp_path / "cache"))
    cached = loading.gguf_tokenizer_cache(smollm2_gguf)
    assert not cached.exists()
    fresh = loading.load_tokenizer(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert (cached / "tokenizer_config.json").is_file()
    again = loading.load_tokenizer(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    texts = [
        "Hello world",
        "  leading spaces\n\ttabs and a newline\n",
        "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
        "Ünïcödé — emoji 🙂 and 中文",
        "",
    ]
    for text in texts:
        assert again.encode(text) == fresh.encode(text), text
        assert again(text).input_ids == fresh(text).input_ids, text
    assert again.eos_token == fresh.eos_token and again.bos_token == fresh.bos_token
    assert again.pad_token == fresh.pad_token
    assert len(again) == len(fresh)
    assert again.chat_template == fresh.chat_template

"""Test configuration: 8 virtual CPU devices (set before jax is imported) and shared fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _asset(name: str) -> Path:
    """The cached path of an embedded asset; skips (or fails in CI) when it was not fetched."""
    from resofilter_jax import assets

    asset = assets.ASSETS[name]
    path = assets.cache_dir() / asset.name / asset.filename
    if not path.is_file():
        msg = f"asset {name!r} not fetched: run `python -m resofilter_jax.assets fetch`"
        if os.environ.get("RESOFILTER_REQUIRE_ASSETS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return assets.fetch(name)  # verifies the checksum stamp


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    return _asset("smollm2")


@pytest.fixture(scope="session")
def sharegpt_path() -> Path:
    """The shipped (truncated) ShareGPT V3 JSON file."""
    return _asset("sharegpt")


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    """The GSM8K test JSONL."""
    return _asset("gsm8k")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path):
    """SmolLM2 loaded from the GGUF file (fp32) with its tokenizer."""
    from resofilter_jax.models.loading import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf: Path):
    """transformers' PyTorch SmolLM2 built from the same GGUF file (fp32, eager)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 exported to a Hugging Face directory (safetensors + tokenizer)."""
    from resofilter_jax.models.export import export_hf

    return export_hf(
        smollm2.model, tmp_path_factory.mktemp("smollm2_hf"), tokenizer=smollm2.tokenizer
    )

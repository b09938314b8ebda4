"""Test configuration: 8 virtual CPU devices and one persistent compilation cache for the
whole session (both set before jax is imported), and shared fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One cache for the session, inherited by every subprocess the tests start (commands,
    # multi-process jobs, kill-and-resume runs): a program compiled once is read back.
    _CACHE = tempfile.mkdtemp(prefix="resofilter_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

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


# Fixtures that load the real SmolLM2 weights or read the shipped datasets: a test that uses
# one is a real-weight test and belongs to the slow tier (`pytest -m "not slow"` skips it).
REAL_WEIGHT_FIXTURES = frozenset(
    {"smollm2_gguf", "smollm2", "smollm2_torch", "smollm2_hf_dir", "sharegpt_path", "gsm8k_path"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test that uses a real-weight fixture ``slow``."""
    for item in items:
        if REAL_WEIGHT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

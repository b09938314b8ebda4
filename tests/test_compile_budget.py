"""The compile budget: a scoring run builds one executable per batch shape, no more.

``RunStats.compilations`` counts the executables JAX lowers during the loop (from its
monitoring events); a jitted function rebuilt per shard or per call would multiply it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.data import build_tokenizer, write_jsonl
from support.models import save_tiny_model
from support.scoring import alpaca_rows
from support.scoring import make_config as reso_config

from resofilter_jax.configuration import load_config
from resofilter_jax.scoring import pipeline as score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(195, seed=4))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)  # 200 rows


def assert_within_budget(loop: dict[str, Any]) -> None:
    shapes = len(loop["shapes"])
    assert loop["batches"] > 2 * shapes  # shapes repeat across the run's 7 shards
    assert 1 <= loop["compilations"] <= shapes + 1, (loop["compilations"], loop["shapes"])
    assert loop["backend_compilations"] <= loop["compilations"]


def test_a_200_row_ifd_run_compiles_once_per_shape(data: Path, tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), model)
    over = {"model.path": str(model), "data.path": str(data), "output_dir": str(tmp_path / "o")}
    over |= {"max_length": 48, "min_bucket": 16, "token_budget": 256, "shard_size": 32}
    over |= {"progress": False, "compilation_cache_dir": "", "host.encoded_cache_dir": ""}
    summary = score.run(load_config(ROOT / "configs/ifd_gpt2_alpaca.py", over))
    assert summary["rows"] == 200
    assert_within_budget(summary["loop"])


def test_a_resonance_run_compiles_once_per_shape_and_slot_count(data: Path, tmp_path: Path) -> None:
    model = tmp_path / "llama"
    save_tiny_model("llama", build_tokenizer("bos"), model)
    over = {"host.encoded_cache_dir": "", "shard_size": 32}
    summary = score.run(reso_config(model, data, tmp_path / "o", **over))
    loop = summary["loop"]
    assert all(len(s) == 3 for s in loop["shapes"])  # (rows, length, segment slots)
    assert_within_budget(loop)


def test_auto_token_budget_is_chosen_by_platform(data: Path, tmp_path: Path) -> None:
    """``token_budget=0`` (the IFD recipes' default): 2048 padded tokens per batch on CPU,
    16384 on accelerators; a run on CPU plans its batches with 2048."""
    from resofilter_jax.scoring.shard_loop import resolve_token_budget

    assert resolve_token_budget(0, "cpu") == 2048
    assert resolve_token_budget(0, "gpu") == resolve_token_budget(0, "tpu") == 16384
    assert resolve_token_budget(512, "cpu") == resolve_token_budget(512, "tpu") == 512
    with pytest.raises(ValueError, match="token_budget"):
        resolve_token_budget(-1, "cpu")
    model = tmp_path / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), model)
    config = load_config(ROOT / "configs/ifd_gpt2_alpaca.py")
    assert config.token_budget == 0
    over = {"model.path": str(model), "data.path": str(data), "output_dir": str(tmp_path / "o")}
    over |= {"max_length": 48, "min_bucket": 16, "shard_size": 100, "progress": False}
    over |= {"compilation_cache_dir": "", "host.encoded_cache_dir": ""}
    summary = score.run(load_config(ROOT / "configs/ifd_gpt2_alpaca.py", over))
    padded = [rows * length for rows, length in summary["loop"]["shapes"]]
    assert max(padded) <= 2048 < 2 * max(padded), summary["loop"]["shapes"]

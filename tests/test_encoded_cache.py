"""The encoded-shard cache: what is read back equals what was encoded, keys separate what
must not be shared, and a second scoring run tokenizes nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.data import build_tokenizer, write_jsonl
from support.models import save_tiny_model
from support.scoring import alpaca_rows, records_of

from resofilter_jax.configuration import load_config
from resofilter_jax.data import encode_ifd_pairs, encode_sft_examples
from resofilter_jax.data.encoded_cache import EncodedCache
from resofilter_jax.scoring import pipeline, runner

ROOT = Path(__file__).resolve().parents[1]


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name, value in vars(x).items():
            other = getattr(y, name)
            if isinstance(value, np.ndarray):
                assert other.dtype == np.int32 and value.tolist() == other.tolist(), name
            else:
                assert value == other, name


def _cache(root: Path, tok: Any, kind: str = "ifd", **data: Any) -> EncodedCache:
    return EncodedCache(
        root, kind=kind, tokenizer=tok, template="none", settings={"max_length": 32},
        data={"path": "rows.jsonl", **data},
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["ifd", "sft"])
def test_round_trip_and_hits(tmp_path: Path, kind: str) -> None:
    tok = build_tokenizer("bos")
    records = records_of(alpaca_rows(30, seed=4))
    records[3] = dataclasses.replace(records[3], status="error:bad_json")  # kept as a status
    enc = encode_ifd_pairs if kind == "ifd" else encode_sft_examples
    want = enc(records, tok, max_length=32, template="none")
    cache = _cache(tmp_path, tok, kind)
    n = len(records)
    _same(cache.get_or_encode(0, n, n, lambda: want), want)
    got = _cache(tmp_path, tok, kind).get_or_encode(0, n, n, lambda: pytest.fail("re-encoded"))
    _same(got, want)
    key = json.loads(next(tmp_path.glob(f"{kind}-*/key.json")).read_text())
    assert key["kind"] == kind and key["settings"] == {"max_length": 32}
    assert len(key["tokenizer_sha256"]) == 64 and len(key["code_sha256"]) == 64


def test_keys_separate_tokenizers_data_and_ranges(tmp_path: Path) -> None:
    a, b = build_tokenizer("none"), build_tokenizer("bos")
    dirs = {
        _cache(tmp_path, a).dir,
        _cache(tmp_path, b).dir,  # another tokenizer (its post-processor differs)
        _cache(tmp_path, a, mtime_ns=1).dir,  # another data stamp
        _cache(tmp_path, a, kind="sft").dir,
    }
    assert len(dirs) == 4
    cache = _cache(tmp_path, a)
    calls = []
    cache.get_or_encode(0, 2, 0, lambda: calls.append(1) or [])
    cache.get_or_encode(2, 4, 0, lambda: calls.append(1) or [])  # another range: encoded
    cache.get_or_encode(0, 2, 0, lambda: calls.append(1) or [])  # hit
    assert len(calls) == 2 and (cache.hits, cache.misses) == (1, 2)


def test_unreadable_or_short_files_are_recomputed(tmp_path: Path) -> None:
    tok = build_tokenizer("none")
    records = records_of(alpaca_rows(6, seed=2))
    pairs = encode_ifd_pairs(records, tok, max_length=32)
    cache = _cache(tmp_path, tok)
    cache.get_or_encode(0, 6, 6, lambda: pairs)
    path = next(cache.dir.glob("rows-*.parquet"))
    path.write_bytes(b"not parquet")
    _same(cache.get_or_encode(0, 6, 6, lambda: pairs), pairs)
    assert cache.misses == 2
    assert cache.get_or_encode(0, 6, 5, lambda: pairs[:5]) == pairs[:5]  # count differs


def test_second_run_tokenizes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), model_dir)
    rows = alpaca_rows(20, seed=7)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    shards = -(-len(rows) // 8)
    calls = []
    real = runner.encode_ifd_pairs
    monkeypatch.setattr(
        runner, "encode_ifd_pairs", lambda *a, **k: calls.append(1) or real(*a, **k)
    )

    def run(out: str, **over: Any) -> list[dict]:
        config = load_config(
            ROOT / "configs/ifd_gpt2_alpaca.py",
            {
                "model.path": str(model_dir), "data.path": str(data),
                "output_dir": str(tmp_path / out),
                "max_length": 48, "min_bucket": 16, "token_budget": 256, "shard_size": 8,
                "progress": False, "compilation_cache_dir": "",
                "host.encoded_cache_dir": str(tmp_path / "encoded"), **over,
            },
        )  # fmt: skip
        pipeline.run(config)
        return [json.loads(x) for x in (tmp_path / out / "scores.jsonl").read_text().splitlines()]

    first = run("a")
    assert len(calls) == shards  # every shard tokenized once
    second = run("b", **{"model.dtype": "float32", "host.prefetch": 0})  # another run
    assert len(calls) == shards and second == first
    run("c", **{"max_length": 40})  # another encoding: tokenized again
    assert len(calls) == 2 * shards


def test_resonance_rerun_reads_its_examples_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resonance (duplicates left out of the encoding) scores the same from cached examples."""
    from support.scoring import data_rows, make_config

    from resofilter_jax.scoring import reso_runner

    model_dir = tmp_path / "llama"
    save_tiny_model("llama", build_tokenizer("bos"), model_dir)
    data = write_jsonl(tmp_path / "rows.jsonl", data_rows())
    calls = []
    real = reso_runner.encode_sft_examples
    monkeypatch.setattr(
        reso_runner, "encode_sft_examples", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    cache = {"host.encoded_cache_dir": str(tmp_path / "encoded")}
    pipeline.run(make_config(model_dir, data, tmp_path / "a", **cache))
    first_calls = len(calls)
    pipeline.run(make_config(model_dir, data, tmp_path / "b", **cache, **{"host.prefetch": 0}))
    assert first_calls > 0 and len(calls) == first_calls
    a, b = ((tmp_path / d / "scores.jsonl").read_text() for d in "ab")
    assert a == b

"""Reverse IFD (r-IFD, Selective Reflection-Tuning) against a batch-of-one PyTorch loop, and the
`rifd` method end to end (columns, statuses, token losses, fingerprint, resume).

Tiny random Llama models (fp32, 256 positions: the reverse prompt alone is ~64 tokens of the
small test tokenizer) with a GPT-2-like and a BOS tokenizer, under the `none` and `alpaca`
templates, at lengths where long responses leave no instruction token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer, write_jsonl
from support.models import save_tiny_model
from support.scoring import alpaca_rows, records_of
from torch_reference import rifd_reference

from resofilter_jax.configuration import load_config
from resofilter_jax.data import IFDPair, Record, encode_rifd_pairs
from resofilter_jax.models.loading import load_model
from resofilter_jax.scoring import outputs
from resofilter_jax.scoring import pipeline as score
from resofilter_jax.scoring.ifd import RIFD, ifd_sequences, pair_scores
from resofilter_jax.scoring.runner import score_records

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss_direct", "loss_condition", "ppl_direct", "ppl_condition", "rifd", "rifd_loss_ratio")


def test_rifd_host_columns() -> None:
    """r-IFD's columns and statuses from per-sequence sums (the instruction is the target)."""
    ids = np.arange(5, dtype=np.int32)
    pairs = [IFDPair(0, ids, 0, ids, 2, "ok"), IFDPair(1, ids, 0, ids, 2, "ok")]
    seq = ifd_sequences(pairs)
    cols = pair_scores(
        pairs, seq.owner, np.array([2.0, 3.0, 1.0, 0.0]), np.array([4, 3, 2, 0]), RIFD
    )
    assert list(cols) == ["status", *RIFD.columns()] and "rifd_loss_ratio" in cols
    assert cols["status"] == ["ok", "no_instruction_tokens"]
    assert cols["rifd"][0] == pytest.approx(math.exp(0.5)) and cols["rifd_loss_ratio"][0] == 2.0
    assert math.isnan(cols["rifd"][1]) and cols["n_tokens_condition"].tolist() == [3, 0]


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """layout -> (model dir, torch model) of a tiny Llama with 256 positions."""
    root = tmp_path_factory.mktemp("rifd_models")
    out = {}
    for layout in ("none", "bos"):
        path = root / f"llama-{layout}"
        hf = save_tiny_model("llama", build_tokenizer(layout), path, positions=256)
        out[layout] = (path, hf)
    return out


@pytest.mark.parametrize(
    ("layout", "template", "max_length"), [("none", "alpaca", 192), ("bos", "none", 96)]
)
def test_tiny_models_match_torch_loop(
    layout: str, template: str, max_length: int, tiny_llamas: dict[str, tuple[Path, Any]]
) -> None:
    path, hf = tiny_llamas[layout]
    lm = load_model(path)
    # + an input that repeats the instruction: scoring starts at its last occurrence
    rows = [
        *alpaca_rows(),
        {"instruction": "the model", "input": "score the model", "output": "a b"},
    ]
    records = [*records_of(rows), Record(len(rows), "bad", status="error:bad_json")]
    cols, stats = score_records(
        lm.model,
        lm.tokenizer,
        records,
        method="rifd",
        max_length=max_length,
        template=template,
        token_budget=8 * max_length,  # one bucket, few shapes: little to compile
        min_bucket=max_length,
        shard_size=16,
        progress=False,
    )
    ref = rifd_reference(lm.tokenizer, hf, rows, max_length, template)
    n_ok = 0
    for i, want in enumerate(ref):
        status = cols["status"][i]
        if want is None:
            assert status == "empty_output", (i, status)
        elif math.isnan(want["loss_direct"]) or math.isnan(want["loss_condition"]):
            assert status == "no_instruction_tokens", (i, status, want)
            assert all(math.isnan(cols[k][i]) for k in KEYS)
        else:
            assert status == "ok", (i, status, want)
            n_ok += 1
            for k in KEYS:
                np.testing.assert_allclose(cols[k][i], want[k], rtol=1e-5, err_msg=f"row {i} {k}")
    assert cols["status"][-1] == "error:bad_json" and math.isnan(cols["rifd"][-1])
    assert n_ok >= 18 and stats.sequences == 2 * n_ok
    assert sum(s == "no_instruction_tokens" for s in cols["status"]) >= 2
    # The reverse prompt fills max_length for some rows; others keep a truncated instruction.
    pairs = encode_rifd_pairs(records, lm.tokenizer, max_length=max_length, template=template)
    assert any(len(p.cond_ids) == max_length and p.status == "ok" for p in pairs)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows: list[Any] = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(20, seed=5))]
    rows.insert(4, '{"instruction": "cut off", "output": ')  # bad_json
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def test_rifd_scoring_job_columns_statuses_and_resume(
    tiny_llamas: dict[str, tuple[Path, Any]], data_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = load_config(
        ROOT / "configs/rifd_smollm2_sharegpt.py",
        {
            "model.path": str(tiny_llamas["bos"][0]), "data.path": str(data_path),
            "data.format": "alpaca", "output_dir": str(out), "template": "none",
            "max_length": 96, "min_bucket": 96, "token_budget": 768, "shard_size": 8,
            "ifd.token_losses": True, "progress": False, "compilation_cache_dir": "",
            "host.encoded_cache_dir": str(tmp_path / "encoded"),
        },
    )  # fmt: skip
    summary = score.run(config)
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == [
        "index", "id", "status", *KEYS, "n_tokens_direct", "n_tokens_condition",
        "token_losses_direct", "token_losses_condition",
    ]  # fmt: skip
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    statuses = {r["status"] for r in rows}
    assert {"ok", "empty_output", "no_instruction_tokens", "error:bad_json"} <= statuses
    for r in rows:
        if r["status"] != "ok":
            assert r["rifd"] is None and r["token_losses_direct"] is None
            continue
        d, c = r["token_losses_direct"], r["token_losses_condition"]
        assert (len(d), len(c)) == (r["n_tokens_direct"], r["n_tokens_condition"])
        assert math.isclose(np.mean(c), r["loss_condition"], rel_tol=1e-12)
        assert math.isclose(r["rifd"], math.exp(np.mean(c) - np.mean(d)), rel_tol=1e-9)
        assert math.isclose(r["rifd_loss_ratio"], np.mean(c) / np.mean(d), rel_tol=1e-12)
    fp = json.loads((out / "run_config.json").read_text())
    assert fp["method"] == "rifd" and fp["ifd"] == {"token_losses": True}
    assert summary["statuses"]["ok"] >= 10
    # Resume: a lost shard is recomputed alone, to the same bytes.
    before = (out / "scores.jsonl").read_bytes()
    outputs.shard_path(out, 1).unlink()
    again = score.run(config)
    assert again["shards"]["computed"] == 1 and again["shards"]["reused"] == 3
    assert (out / "scores.jsonl").read_bytes() == before
    # The encoded-shard cache keeps r-IFD pairs under their own key.
    (key,) = (tmp_path / "encoded").glob("ifd-*/key.json")
    assert json.loads(key.read_text())["settings"]["encoding"] == "rifd"

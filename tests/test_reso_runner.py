"""The resonance scoring job end to end on a tiny Llama: statuses, engine parity, resume."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_fixtures import build_tokenizer, write_jsonl
from test_ifd import alpaca_rows
from torch_reference import save_tiny_model

from resofilter_jax import score
from resofilter_jax.data import collate, encode_sft_examples, plan_batches
from resofilter_jax.models.loading import load_model
from resofilter_jax.parallel import make_mesh, shard_batch
from resofilter_jax.scoring.outputs import shard_path
from resofilter_jax.scoring.reso_runner import reso_schema, spec_from_config
from resofilter_jax.scoring.resonance import feature_names, make_resonance_fn, to_columns
from resofilter_jax.scoring.runner import _buckets

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS = 4  # 26 rows in shards of 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama") / "llama"
    save_tiny_model("llama", build_tokenizer("bos"), path)
    return path


def data_rows() -> list[Any]:
    """Alpaca rows + a duplicate query (row 21 repeats row 2), a bad row (row 7)."""
    rows: list[Any] = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(20, seed=3))]
    rows = rows[:20]
    rows.insert(7, '{"instruction": "cut off", ')  # bad_json
    rows.append(dict(rows[2], output="another answer", id="dup"))  # same query as row 2
    rows.append({"instruction": "empty", "input": "", "output": "", "id": "empty"})
    rows.append({"instruction": " ".join(["the"] * 60), "input": "", "output": "x", "id": "long"})
    rows += [dict(r, id=f"t{i}") for i, r in enumerate(alpaca_rows(2, seed=9))]
    return rows


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", data_rows())


def make_config(model_dir: Path, data_path: Path, out: Path, **over: Any) -> Any:
    """The SmolLM2 / GSM8K resonance config, shrunk for a tiny model and Alpaca rows."""
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs/reso_smollm2_gsm8k.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.path = str(model_dir)
    c.data.path = str(data_path)
    c.data.format = "alpaca"
    c.output_dir = str(out)
    c.max_length = 48
    c.min_bucket = 16
    c.token_budget = 256
    c.shard_size = 8
    c.progress = False
    c.compilation_cache_dir = ""
    c.resonance.last_k = 2
    for key, value in over.items():
        node = c
        *head, last = key.split(".")
        for h in head:
            node = node[h]
        node[last] = value
    return c


def test_rows_statuses_and_parity_with_the_engine(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    cfg = make_config(model_dir, data_path, tmp_path / "out")
    summary = score.run(cfg)
    rows = data_rows()
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    lm = load_model(str(model_dir))
    spec = spec_from_config(cfg, lm.model)
    assert spec.params == tuple(f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1))
    assert table.column_names == ["index", "id", "status", *feature_names(spec)]
    assert table.schema.equals(reso_schema(spec).remove(2))  # no `turn`
    assert table.column("index").to_pylist() == list(range(len(rows)))
    status = table.column("status").to_pylist()
    assert status[7] == "error:bad_json"
    assert status[21] == "duplicate_of:2"
    assert status[23] == "no_response_tokens"
    assert status[22] == "ok"  # an empty output still has template + EOS labels
    assert summary["rows"] == len(rows) and summary["shards"]["computed"] == N_SHARDS
    score_col = table.column("score").to_numpy()
    ok = np.asarray([s == "ok" for s in status])
    assert np.isfinite(score_col[ok]).all() and np.isnan(score_col[~ok]).all()
    n_tok = table.column("n_tokens").to_numpy()
    assert (n_tok[ok] > 0).all() and (n_tok[~ok] == 0).all()
    lines = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(len(rows)))
    assert lines[21]["score"] is None and lines[0]["score"] == score_col[0]
    fp = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert fp["resonance"]["last_k"] == 2 and fp["method"] == "resonance"
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model_config"]["model_type"] == "llama"

    # Direct engine call on the same examples, batched the same way (per shard of 8 rows).
    records, _ = score.read_records(cfg, str(data_path))
    fn = make_resonance_fn(lm.model, spec, data_shards=8)
    mesh = make_mesh()
    for lo in range(0, len(rows), 8):
        want_rows = [i for i in range(lo, min(lo + 8, len(rows))) if status[i] == "ok"]
        examples = encode_sft_examples(
            [records[i] for i in want_rows], lm.tokenizer, max_length=48, template="chatml"
        )
        seqs, labels = [e.ids for e in examples], [e.labels for e in examples]
        got = {n: np.full(len(seqs), np.nan) for n in feature_names(spec)}
        lengths = [len(x) for x in seqs]
        for plan in plan_batches(
            lengths,
            buckets=_buckets(lengths, 48, 16),
            token_budget=256,
            batch_multiple=8,
            pow2_tail=True,
        ):
            batch = collate(plan, seqs, labels, lm.tokenizer.pad_token_id)
            arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            cols = to_columns(fn(shard_batch(arrays, mesh)), spec)
            real = plan.rows >= 0
            for n in got:
                got[n][plan.rows[real]] = cols[n][real]
        for n in feature_names(spec):
            have = table.column(n).to_numpy()[want_rows].astype(np.float64)
            np.testing.assert_allclose(have, got[n], rtol=1e-6, err_msg=n)


def test_resume_recomputes_only_the_deleted_shard(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    score.run(make_config(model_dir, data_path, out))
    before = pq.read_table(out / "scores.parquet")
    stamps = {k: shard_path(out, k).stat().st_mtime_ns for k in range(N_SHARDS)}
    shard_path(out, 1).unlink()
    time.sleep(0.01)
    summary = score.run(make_config(model_dir, data_path, out))
    assert summary["shards"] == {"total": N_SHARDS, "computed": 1, "reused": N_SHARDS - 1}
    assert summary["loop"]["rows"] == 8
    after = {k: shard_path(out, k).stat().st_mtime_ns for k in range(N_SHARDS)}
    assert [k for k in range(N_SHARDS) if after[k] != stamps.get(k)] == [1]
    got = pq.read_table(out / "scores.parquet")
    assert got.column_names == before.column_names
    for n in before.column_names:
        np.testing.assert_array_equal(
            np.asarray(got.column(n).to_pylist()), np.asarray(before.column(n).to_pylist())
        )


def test_required_paths_and_changed_settings(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location(
        "gemma_cfg", ROOT / "configs/reso_gemma2_metamath.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.output_dir = str(tmp_path / "g")
    with pytest.raises(ValueError, match=r"model\.path"):
        score.run(c)
    c.model.path = str(model_dir)
    with pytest.raises(ValueError, match=r"data\.path"):
        score.run(c)
    out = tmp_path / "out"
    score.run(make_config(model_dir, data_path, out, limit=4))
    with pytest.raises(score.outputs.FingerprintMismatchError, match=r"resonance\.lr"):
        score.run(make_config(model_dir, data_path, out, limit=4, **{"resonance.lr": 2e-5}))

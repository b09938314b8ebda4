"""The resonance scoring job end to end on a tiny Llama: statuses, engine parity, resume.

Also: gradient projections in the job, 1 vs 8 devices, and a subprocess that is SIGKILLed
after its first shard and then re-run to completion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer, write_jsonl
from support.models import save_tiny_model
from support.scoring import data_rows, make_config

from resofilter_jax.data import collate, encode_sft_examples, plan_batches
from resofilter_jax.data.sealed import seal_path
from resofilter_jax.data.sources import read_records
from resofilter_jax.models.loading import load_model
from resofilter_jax.parallel import make_mesh, shard_batch
from resofilter_jax.scoring import outputs, projection
from resofilter_jax.scoring import pipeline as score
from resofilter_jax.scoring.outputs import shard_path, shard_ranges
from resofilter_jax.scoring.reso_runner import reso_schema, spec_from_config
from resofilter_jax.scoring.resonance import feature_names, make_resonance_fn, to_columns
from resofilter_jax.scoring.shard_loop import length_buckets

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS = 4  # 31 rows in shards of 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama") / "llama"
    save_tiny_model("llama", build_tokenizer("bos"), path)
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", data_rows())


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
    records, _ = read_records(cfg, str(data_path))
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
            buckets=length_buckets(lengths, 48, 16),
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
    score.run(make_config(model_dir, data_path, out, **{"data.limit": 4}))
    with pytest.raises(outputs.FingerprintMismatchError, match=r"resonance\.lr"):
        score.run(make_config(model_dir, data_path, out, **{"data.limit": 4, "resonance.lr": 2e-5}))


# Projections on; one example per device per step (other vmapped sizes round the fp32
# gradients differently, and near |g| ~ eps AdamW's update amplifies that past 1e-6 relative:
# see test_resonance), so 1 and 8 devices run the same per-example program.
PROJ = {"features.projection_dim": 16, "features.projection_seed": 3, "resonance.micro": 1}
SIZES4 = [hi - lo for lo, hi in shard_ranges(len(data_rows()), 4)]  # rows per shard of 4


@pytest.fixture(scope="module")
def run8(model_dir: Path, data_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rows scored with projections on 8 devices, in shards of 4 rows."""
    out = tmp_path_factory.mktemp("run8") / "out"
    score.run(make_config(model_dir, data_path, out, shard_size=4, **PROJ))
    return out


def assert_same_table(got: Any, want: Any) -> None:
    """Same columns and values, bitwise (NaN == NaN)."""
    assert got.column_names == want.column_names
    for key in want.column_names:
        a, b = got.column(key).to_pylist(), want.column(key).to_pylist()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)


@pytest.mark.slow  # device-count invariance
def test_one_vs_eight_devices_same_rows_scores_and_projections(
    model_dir: Path, data_path: Path, run8: Path, tmp_path: Path
) -> None:
    # One device and one example per row (pack=False) against 8 devices with packed rows.
    cfg = make_config(
        model_dir, data_path, tmp_path / "on1", shard_size=4, num_devices=1, pack=False, **PROJ
    )
    on1 = score.run(cfg)
    r8 = json.loads((run8 / "run.json").read_text())
    r1 = json.loads((tmp_path / "on1" / "run.json").read_text())
    assert len(r8["devices"]) == 8 and len(r1["devices"]) == 1
    # 8 devices pad batches to multiples of 8: other batches, other neighbours, other rows.
    assert {tuple(x) for x in r8["loop"]["shapes"]} != {tuple(x) for x in on1["loop"]["shapes"]}
    a = pq.read_table(run8 / "scores.parquet")
    b = pq.read_table(tmp_path / "on1" / "scores.parquet")
    assert a.column_names == b.column_names
    for n in ("index", "id", "status", "n_tokens"):
        assert a.column(n).to_pylist() == b.column(n).to_pylist(), n
    ok = np.asarray([s == "ok" for s in a.column("status").to_pylist()])
    assert ok.sum() == 23
    for n in ("score", "loss", "ppl", *(c for c in a.column_names if c.endswith("/mean_abs"))):
        x, y = a.column(n).to_numpy(), b.column(n).to_numpy()
        np.testing.assert_array_equal(np.isnan(x), ~ok, err_msg=n)
        np.testing.assert_allclose(y[ok], x[ok], rtol=1e-6, err_msg=n)
    p8, p1 = projection.load_projections(run8), projection.load_projections(tmp_path / "on1")
    assert p8.shape == (len(ok), 16) and p8.dtype == np.float16
    np.testing.assert_array_equal(np.isnan(p8).all(1), ~ok)  # NaN rows: no gradient
    assert np.isfinite(p8[ok]).all() and (np.abs(p8[ok]).max(1) > 0).all()
    # Same fp32 gradients up to rounding; float16 storage rounds to 2**-11 relative.
    x, y = p8[ok].astype(np.float64), p1[ok].astype(np.float64)
    assert (np.abs(x - y) <= 2.0**-10 * np.abs(x).max(1, keepdims=True)).all()
    i8, i1 = projection.read_index(run8), projection.read_index(tmp_path / "on1")
    projection.check_compatible(i8, i1)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)]
    assert [p["name"] for p in i8["params"]] == names
    assert i8["model"]["dtype"] == "float32" and i8["rows"] == len(ok)


def test_projection_files_follow_the_score_shards(
    model_dir: Path, data_path: Path, run8: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(run8, out)
    before = np.array(projection.load_projections(out))
    fp = json.loads((out / "run_config.json").read_text())
    assert fp["resonance"]["projection"] == {"dim": 16, "seed": 3, "kind": "rademacher"}
    # A lost projection file makes its shard be recomputed; the others are kept.
    projection.projection_path(out, 2).unlink()
    stamp = shard_path(out, 1).stat().st_mtime_ns
    with pytest.warns(UserWarning, match=r"shards \[2\] have scores but no valid projection"):
        summary = score.run(make_config(model_dir, data_path, out, shard_size=4, **PROJ))
    assert summary["loop"]["shards_computed"] == 1
    assert shard_path(out, 1).stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(projection.load_projections(out), before)
    # Turning the projection off or changing it is another run.
    with pytest.raises(outputs.FingerprintMismatchError, match="resonance.projection"):
        score.run(make_config(model_dir, data_path, out, shard_size=4))
    changed = {**PROJ, "shard_size": 4, "features.projection_seed": 4}
    with pytest.raises(outputs.FingerprintMismatchError, match=r"projection\.seed"):
        score.run(make_config(model_dir, data_path, out, **changed))
    # An overwrite without projections removes the stale ones.
    score.run(make_config(model_dir, data_path, out, overwrite=True, **{"data.limit": 1}))
    assert not (out / "projections").exists()


def score_args(model_dir: Path, data: Path, out: Path, cache: Path) -> list[str]:
    """The command line of ``make_config(..., shard_size=4, **PROJ)`` (the ``run8`` run)."""
    over = {
        "model.path": model_dir,
        "data.path": data,
        "data.format": "alpaca",
        "output_dir": out,
        "max_length": 48,
        "min_bucket": 16,
        "token_budget": 256,
        "shard_size": 4,
        "resonance.last_k": 2,
        **PROJ,
        "progress": False,
        "compilation_cache_dir": cache,
    }
    args = [sys.executable, "-m", "resofilter_jax.score"]
    args.append(f"--config={ROOT / 'configs/reso_smollm2_gsm8k.py'}")
    return args + [f"--config.{k}={v}" for k, v in over.items()]


@pytest.mark.slow  # a killed subprocess
def test_killed_run_resumes_to_identical_output(
    model_dir: Path, data_path: Path, run8: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    args = score_args(model_dir, data_path, out, tmp_path / "jax_cache")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not seal_path(shard_path(out, 0)).exists():  # sealed last: a finished shard
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    # Finished shards: sealed (a file the kill caught before its seal is recomputed).
    written = sorted(f for f in (out / "shards").glob("shard-*.parquet") if seal_path(f).exists())
    assert 1 <= len(written) < len(SIZES4) and not (out / "scores.parquet").exists()
    assert not (out / "projections" / "index.json").exists()
    for f in written:  # a score shard never exists without its projection
        k = int(f.stem.split("-")[1])
        assert projection.shard_matches(out, k, SIZES4[k], 16), k
    stamps = {f.name: f.stat().st_mtime_ns for f in written}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    run = json.loads((out / "run.json").read_text())
    redo = [k for k in range(len(SIZES4)) if f"shard-{k:05d}.parquet" not in stamps]
    assert run["shards"] == {"total": len(SIZES4), "computed": len(redo), "reused": len(written)}
    assert run["loop"]["shards_computed"] == len(redo)
    assert run["loop"]["rows"] == sum(SIZES4[k] for k in redo)
    assert {f.name: f.stat().st_mtime_ns for f in written} == stamps  # not rewritten

    # The uninterrupted run of the same configuration (in-process): bitwise the same.
    got = pq.read_table(out / "scores.parquet")
    assert got.num_rows == sum(SIZES4)
    assert_same_table(got, pq.read_table(run8 / "scores.parquet"))
    assert (out / "scores.jsonl").read_text() == (run8 / "scores.jsonl").read_text()
    p_got, p_ref = projection.load_projections(out), projection.load_projections(run8)
    assert p_got.shape == (sum(SIZES4), 16)
    assert p_got.tobytes() == p_ref.tobytes()  # NaN rows included
    drop = ("dir",)  # the index differs only in where it lives
    ia, ib = projection.read_index(out), projection.read_index(run8)
    assert {k: v for k, v in ia.items() if k not in drop} == {
        k: v for k, v in ib.items() if k not in drop
    }

"""The scoring job end to end on a tiny GPT-2: output files, bad rows, fingerprints, resume.

Includes a subprocess that is SIGKILLed after its first shard and then re-run to completion.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer, write_json, write_jsonl
from support.models import save_tiny_model
from support.scoring import alpaca_rows

from resofilter_jax.configuration import load_config
from resofilter_jax.data.sealed import seal_path
from resofilter_jax.scoring import pipeline as score
from resofilter_jax.scoring.outputs import FingerprintMismatchError, shard_path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "index",
    "id",
    "status",
    "loss_direct",
    "loss_condition",
    "ppl_direct",
    "ppl_condition",
    "ifd",
    "ifd_loss_ratio",
    "n_tokens_direct",
    "n_tokens_condition",
]
BAD_LINES = [
    '{"instruction": "cut off", "output": ',  # bad_json
    "[1, 2]",  # not_an_object
    {"instruction": 5, "output": "wrong type"},
    {"instruction": "no output field"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows: list[Any] = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(20, seed=5))]
    for k, bad in enumerate(BAD_LINES):
        rows.insert(3 + 5 * k, bad)
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def make_config(model_dir: Path, data_path: Path, out: Path, **over: Any):
    """The GPT-2 / Alpaca config, shrunk for a tiny model."""
    return load_config(
        ROOT / "configs/ifd_gpt2_alpaca.py",
        {
            "model.path": str(model_dir),
            "data.path": str(data_path),
            "output_dir": str(out),
            "max_length": 48,
            "min_bucket": 16,
            "token_budget": 256,
            "shard_size": 8,
            "progress": False,
            "compilation_cache_dir": "",
            **over,
        },
    )


def assert_same_table(got: Any, want: Any) -> None:
    """Same columns and values (NaN == NaN)."""
    assert got.column_names == want.column_names
    for key in want.column_names:
        a, b = got.column(key).to_pylist(), want.column(key).to_pylist()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_one_row_per_input_row(model_dir: Path, data_path: Path, tmp_path: Path) -> None:
    summary = score.run(make_config(model_dir, data_path, tmp_path / "out"))
    out = tmp_path / "out"
    n_rows = len(data_path.read_text().splitlines())
    assert n_rows == 25 + len(BAD_LINES)
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == COLUMNS  # no `turn` outside sharegpt_turns=all
    assert table.column("index").to_pylist() == list(range(n_rows))
    rows = read_jsonl(out / "scores.jsonl")
    assert [r["index"] for r in rows] == list(range(n_rows)) and list(rows[0]) == COLUMNS
    status = {r["index"]: r["status"] for r in rows}
    assert status[3] == "error:bad_json" and status[8] == "error:not_an_object"
    assert status[13] == "error:wrong_type:instruction"
    assert status[18] == "error:missing_field:output"
    assert {"ok", "empty_output", "no_response_tokens"} <= set(status.values())
    ifd = table.column("ifd").to_numpy()
    assert np.isnan(ifd).sum() == sum(s != "ok" for s in status.values())  # NaN in Parquet
    for r in rows:  # NaN -> null in JSONL; ok rows have finite scores
        assert (r["ifd"] is None) == (r["status"] != "ok")
        if r["status"] == "ok":
            assert math.isclose(r["ifd"], r["ppl_condition"] / r["ppl_direct"], rel_tol=1e-12)
    assert summary["rows"] == n_rows and summary["shards"]["computed"] == math.ceil(n_rows / 8)
    run = json.loads((out / "run.json").read_text())
    assert {"config", "model_config", "versions", "devices", "seconds", "read_report"} <= set(run)
    assert {"jax", "flax", "transformers", "numpy"} <= set(run["versions"])
    assert run["model_config"]["model_type"] == "gpt2" and len(run["devices"]) == 8
    fp = json.loads((out / "run_config.json").read_text())
    assert fp["max_length"] == 48 and "token_budget" not in json.dumps(fp)


def test_fingerprint_mismatch_and_overwrite(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    score.run(make_config(model_dir, data_path, out))
    # batching knobs are not part of the fingerprint
    again = score.run(make_config(model_dir, data_path, out, token_budget=512))
    assert again["shards"]["computed"] == 0
    with pytest.raises(FingerprintMismatchError, match=r"max_length.*overwrite=True"):
        score.run(make_config(model_dir, data_path, out, max_length=40))
    with pytest.raises(FingerprintMismatchError, match=r"template"):
        score.run(make_config(model_dir, data_path, out, template="alpaca"))
    assert json.loads((out / "run_config.json").read_text())["model"]["matmul_precision"] == (
        "highest"  # the recipe's
    )
    with pytest.raises(FingerprintMismatchError, match=r"matmul_precision"):
        score.run(make_config(model_dir, data_path, out, **{"model.matmul_precision": "high"}))
    redo = score.run(make_config(model_dir, data_path, out, max_length=40, overwrite=True))
    assert redo["shards"]["computed"] == redo["shards"]["total"]
    assert json.loads((out / "run_config.json").read_text())["max_length"] == 40


def test_resume_recomputes_only_missing_shards(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    score.run(make_config(model_dir, data_path, out))
    before = pq.read_table(out / "scores.parquet")
    stamps = {k: shard_path(out, k).stat().st_mtime_ns for k in range(4)}
    shard_path(out, 2).unlink()
    time.sleep(0.01)
    summary = score.run(make_config(model_dir, data_path, out))
    assert summary["shards"] == {"total": 4, "computed": 1, "reused": 3}
    assert summary["loop"]["rows"] == 8  # 29 rows: shards of 8, 8, 8, 5
    after = {k: shard_path(out, k).stat().st_mtime_ns for k in range(4)}
    assert [k for k in range(4) if after[k] != stamps.get(k)] == [2]
    assert_same_table(pq.read_table(out / "scores.parquet"), before)


def test_method_and_required_model_path(model_dir: Path, data_path: Path, tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="resonance"):
        score.run(make_config(model_dir, data_path, tmp_path / "a", method="resonance"))
    with pytest.raises(ValueError, match="method"):
        score.run(make_config(model_dir, data_path, tmp_path / "b", method="perplexity"))
    with pytest.raises(ValueError, match=r"model\.path"):
        score.run(make_config("", data_path, tmp_path / "c"))


def test_sharegpt_all_turns_have_turn_column(model_dir: Path, tmp_path: Path) -> None:
    conv = [
        {"from": "human", "value": "hi there"},
        {"from": "gpt", "value": "hello data model"},
        {"from": "human", "value": "score this"},
        {"from": "gpt", "value": "the answer is 42"},
    ]
    data = write_json(
        tmp_path / "sg.json",
        [{"id": "a", "conversations": conv}, {"id": "b", "conversations": conv[1:]}],
    )
    cfg = make_config(model_dir, data, tmp_path / "out", **{"data.format": "sharegpt"})
    cfg.data.sharegpt_turns = "all"
    score.run(cfg)
    rows = read_jsonl(tmp_path / "out" / "scores.jsonl")
    assert [(r["index"], r["turn"], r["id"]) for r in rows] == [
        (0, 0, "a"),
        (0, 1, "a"),
        (1, 0, "b"),
    ]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]


@pytest.mark.slow  # a killed subprocess
def test_run_killed_with_a_full_prefetch_queue_resumes_to_identical_output(
    model_dir: Path, tmp_path: Path
) -> None:
    rows = alpaca_rows(600, seed=11)
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "resofilter_jax.score",
        f"--config={ROOT / 'configs/ifd_gpt2_alpaca.py'}",
        f"--config.model.path={model_dir}",
        f"--config.data.path={data}",
        f"--config.output_dir={out}",
        "--config.max_length=48",
        "--config.min_bucket=16",
        "--config.token_budget=256",
        "--config.shard_size=4",
        # 4-row shards tokenize in milliseconds while the first batch compiles for seconds:
        # the background thread has 3 shards prepared and waiting when the kill comes.
        "--config.host.prefetch=3",
        "--config.progress=False",
        f"--config.compilation_cache_dir={tmp_path / 'jax_cache'}",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not seal_path(shard_path(out, 0)).exists():  # sealed last: a finished shard
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    n_shards = math.ceil(len(rows) / 4)
    written = sorted(f for f in (out / "shards").glob("shard-*.parquet") if seal_path(f).exists())
    assert 1 <= len(written) < n_shards and not (out / "scores.parquet").exists()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["shards"]["reused"] >= len(written) and run["shards"]["computed"] < n_shards

    ref_cfg = make_config(model_dir, data, tmp_path / "ref", shard_size=4)
    score.run(ref_cfg)
    got = pq.read_table(out / "scores.parquet")
    assert got.num_rows == len(rows)
    assert_same_table(got, pq.read_table(tmp_path / "ref" / "scores.parquet"))
    assert (out / "scores.jsonl").read_text() == (tmp_path / "ref" / "scores.jsonl").read_text()

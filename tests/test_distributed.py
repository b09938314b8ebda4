"""Multi-process scoring: 2 local processes x 4 CPU devices (jax.distributed, gloo) vs one process.

The jobs run through ``launch/local_multiprocess.sh`` (a free port, one subprocess per
process, the whole group killed on a timeout so a hang fails instead of blocking). The merged
output must equal the single-process output of the same config on 8 devices (identical rows
and statuses, scores within 1e-6 relative, fp32), also after one process was SIGKILLed
mid-run (``RESOFILTER_TEST_KILL_AFTER_SHARDS``) and the job restarted. IFD runs on real
ShareGPT rows, resonance on real GSM8K rows (tiny random models for speed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer
from support.models import save_tiny_model

from resofilter_jax import configuration
from resofilter_jax.data import bucket_lengths, plan_batches
from resofilter_jax.scoring import outputs, projection
from resofilter_jax.scoring import pipeline as score
from resofilter_jax.scoring.distributed_plan import plan_global_batches

pytestmark = pytest.mark.slow  # multi-process jax.distributed jobs

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
JOB_TIMEOUT_S = 240  # per launched job; the process group is killed after it
RTOL = 1e-6
KEY_COLUMNS = ("index", "id", "turn", "status")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama") / "llama"
    save_tiny_model("llama", build_tokenizer("bos"), path, positions=256)  # max_length 192
    return path


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def ifd_ref(
    gpt2_dir: Path, sharegpt_path: Path, jax_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The single-process (8 devices) IFD output of :func:`ifd_settings`."""
    out = tmp_path_factory.mktemp("ifd_ref") / "out"
    score.run(recipe("ifd_gpt2_alpaca", ifd_settings(gpt2_dir, sharegpt_path, jax_cache), out))
    return out


def ifd_settings(model: Path, data: Path, cache: Path) -> dict[str, Any]:
    """40 real ShareGPT rows (first turns) under a tiny GPT-2, shards of 8 rows."""
    return {
        "model.path": str(model),
        "data.path": str(data),
        "data.format": "sharegpt",
        "data.allow_truncated": True,
        "data.limit": 40,
        "max_length": 64,  # the tiny GPT-2 has 64 positions
        "min_bucket": 16,
        "token_budget": 512,
        "shard_size": 8,
        "progress": False,
        "compilation_cache_dir": str(cache),
    }


def reso_settings(model: Path, data: Path, cache: Path) -> dict[str, Any]:
    """21 real GSM8K rows under a tiny Llama, shards of 8 rows, 8-dim gradient projections."""
    return {
        "model.path": str(model),
        "data.path": str(data),
        "data.limit": 21,
        "max_length": 192,
        "min_bucket": 32,
        "token_budget": 1024,
        "shard_size": 8,
        "resonance.last_k": 2,
        "features.projection_dim": 8,
        "progress": False,
        "compilation_cache_dir": str(cache),
    }


def recipe(name: str, settings: dict[str, Any], out: Path) -> Any:
    """``configs/<name>.py`` with ``settings`` applied (the in-process single-process run)."""
    return configuration.load_config(
        ROOT / "configs" / f"{name}.py", {**settings, "output_dir": str(out)}
    )


def launch(
    name: str, settings: dict[str, Any], out: Path, logs: Path, **env_extra: str
) -> subprocess.CompletedProcess:
    """Runs the scorer as 2 processes x 4 CPU devices; the group is killed on a timeout."""
    args = [f"--config={ROOT / 'configs' / f'{name}.py'}", f"--config.output_dir={out}"]
    args += [f"--config.{k}={v}" for k, v in settings.items()]
    args.append("--config.distributed.heartbeat_timeout_s=5")  # a dead peer fails the job fast
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env_extra)
    cmd = ["bash", str(LAUNCH), "-n", "2", "-d", "4", "-l", str(logs), "--", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the 2-process job hung (> {JOB_TIMEOUT_S}s); logs in {logs}\n" + tails(logs))
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout.decode(errors="replace"))


def tails(logs: Path) -> str:
    """The last lines of every process log."""
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
        for p in sorted(logs.glob("process-*.log"))
    )


def assert_same_scores(got_dir: Path, want_dir: Path) -> None:
    """Same columns, rows and statuses; numbers within RTOL (NaN where NaN); same JSONL rows."""
    got = pq.read_table(got_dir / "scores.parquet")
    want = pq.read_table(want_dir / "scores.parquet")
    assert got.column_names == want.column_names and got.num_rows == want.num_rows
    for key in want.column_names:
        a, b = got.column(key).to_pylist(), want.column(key).to_pylist()
        if key in KEY_COLUMNS:
            assert a == b, key
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=key)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=0, equal_nan=True, err_msg=key)
    lines = (got_dir / "scores.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == got.column("index").to_pylist()


def test_global_plan_one_process_is_plan_batches() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=37)
    buckets = bucket_lengths(200, 16)
    want = plan_batches(
        lengths, buckets=buckets, token_budget=512, batch_multiple=8, pow2_tail=True
    )
    got = plan_global_batches([lengths], buckets=buckets, token_budget=512, devices_per_process=8)
    assert [(g.length, g.rows[0].tolist()) for g in got] == [
        (p.length, p.rows.tolist()) for p in want
    ]


def test_global_plan_every_item_once_equal_shares() -> None:
    rng = np.random.default_rng(1)
    lengths = [rng.integers(1, 130, size=n) for n in (23, 5, 0)]  # uneven, one process empty
    plans = plan_global_batches(
        lengths, buckets=bucket_lengths(128, 16), token_budget=256, devices_per_process=2
    )
    for p, lens in enumerate(lengths):
        items = np.concatenate([g.rows[p] for g in plans])
        assert sorted(items[items >= 0].tolist()) == list(range(lens.size))
        for g in plans:
            real = g.rows[p][g.rows[p] >= 0]
            assert (lens[real] <= g.length).all()
    for g in plans:
        assert g.rows.shape[0] == 3 and g.rows.shape[1] % 2 == 0  # same share, whole devices


def test_shard_files_prefer_single_then_complete_parts(tmp_path: Path) -> None:
    d = tmp_path / outputs.SHARD_DIR
    d.mkdir()
    for name in [
        "shard-00000.parquet",
        "shard-00000.p0of2.parquet",
        "shard-00001.p0of2.parquet",  # incomplete: missing
        "shard-00002.p1of2.parquet",
        "shard-00002.p0of2.parquet",
        "shard-00002.p0of3.parquet",
    ]:
        (d / name).write_bytes(b"")
    done = outputs.shard_files(tmp_path, 3)
    assert sorted(done) == [0, 2] and outputs.missing_shards(tmp_path, 3) == [1]
    assert [p.name for p in done[0]] == ["shard-00000.parquet"]
    assert [p.name for p in done[2]] == ["shard-00002.p0of2.parquet", "shard-00002.p1of2.parquet"]


def test_ifd_two_processes_equal_one_process(
    gpt2_dir: Path, sharegpt_path: Path, jax_cache: Path, ifd_ref: Path, tmp_path: Path
) -> None:
    settings = ifd_settings(gpt2_dir, sharegpt_path, jax_cache)
    out = tmp_path / "two"
    job = launch("ifd_gpt2_alpaca", settings, out, tmp_path / "logs")
    assert job.returncode == 0, job.stdout[-3000:] + tails(tmp_path / "logs")
    assert_same_scores(out, ifd_ref)
    statuses = set(pq.read_table(out / "scores.parquet").column("status").to_pylist())
    assert "ok" in statuses and len(statuses) > 1  # real rows: scored ones and bad ones
    parts = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert parts == [f"shard-{k:05d}.p{p}of2.parquet" for k in range(5) for p in range(2)]
    run = json.loads((out / "run.json").read_text())
    assert run["distributed"]["process_count"] == 2 and len(run["devices"]) == 8
    assert run["shards"] == {"total": 5, "computed": 5, "reused": 0}

    # The distributed settings are not in the fingerprint: one process resumes the job.
    (out / "shards" / "shard-00003.p1of2.parquet").unlink()
    (out / "scores.parquet").unlink()
    again = score.run(recipe("ifd_gpt2_alpaca", settings, out))
    assert again["shards"] == {"total": 5, "computed": 1, "reused": 4}
    assert (out / "shards" / "shard-00003.parquet").is_file()
    assert_same_scores(out, ifd_ref)


def test_ifd_killed_process_then_restart_equals_one_process(
    gpt2_dir: Path, sharegpt_path: Path, jax_cache: Path, ifd_ref: Path, tmp_path: Path
) -> None:
    settings = ifd_settings(gpt2_dir, sharegpt_path, jax_cache)
    out, logs = tmp_path / "killed", tmp_path / "logs"
    job = launch("ifd_gpt2_alpaca", settings, out, logs, RESOFILTER_TEST_KILL_AFTER_SHARDS="1:2")
    assert job.returncode != 0, "process 1 should have been killed"
    assert not (out / "scores.parquet").exists()
    left = outputs.missing_shards(out, 5)
    assert 0 < len(left) < 5, left  # some shards finished before the crash, not all
    job = launch("ifd_gpt2_alpaca", settings, out, tmp_path / "logs2")
    assert job.returncode == 0, job.stdout[-3000:] + tails(tmp_path / "logs2")
    run = json.loads((out / "run.json").read_text())
    assert run["shards"]["computed"] == len(left) and run["shards"]["reused"] == 5 - len(left)
    assert_same_scores(out, ifd_ref)


def test_resonance_killed_process_then_restart_equals_one_process(
    llama_dir: Path, gsm8k_path: Path, jax_cache: Path, tmp_path: Path
) -> None:
    """Process 0 (the coordinator) dies after its first shard; the restarted job finishes.

    Every shard of the merged result is computed by a 2-process job (one before the crash,
    the others after the restart), projections included.
    """
    settings = reso_settings(llama_dir, gsm8k_path, jax_cache)
    ref = tmp_path / "ref"
    score.run(recipe("reso_smollm2_gsm8k", settings, ref))
    out = tmp_path / "killed"
    job = launch(
        "reso_smollm2_gsm8k", settings, out, tmp_path / "logs",
        RESOFILTER_TEST_KILL_AFTER_SHARDS="0:1",
    )  # fmt: skip
    assert job.returncode != 0 and not (out / "scores.parquet").exists()
    left = outputs.missing_shards(out, 3)
    assert 0 < len(left) < 3, left
    job = launch("reso_smollm2_gsm8k", settings, out, tmp_path / "logs2")
    assert job.returncode == 0, job.stdout[-3000:] + tails(tmp_path / "logs2")
    run = json.loads((out / "run.json").read_text())
    assert run["distributed"]["process_count"] == 2 and run["shards"]["computed"] == len(left)
    assert_same_scores(out, ref)
    assert "ok" in pq.read_table(out / "scores.parquet").column("status").to_pylist()
    want = projection.load_projections(ref)
    np.testing.assert_allclose(projection.load_projections(out), want, rtol=1e-3, equal_nan=True)
    assert not (out / projection.PROJ_DIR / "parts").exists()  # merged by process 0


def test_resonance_duplicates_are_the_same_rows_on_two_processes(
    llama_dir: Path, gsm8k_path: Path, jax_cache: Path, tmp_path: Path
) -> None:
    """Repeated queries across shards and across the processes' halves of a shard, a bad
    line, and a repeat of a repeat: both jobs mark the same ``duplicate_of:<i>`` rows."""
    rows = [json.loads(x) for x in gsm8k_path.read_text().splitlines()[:10]]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, json.dumps({**rows[0], "answer": "another answer #### 1"}))
    lines.insert(3, "{not json")  # an error row never matches
    lines += [json.dumps(rows[3]), json.dumps(rows[0]), json.dumps(rows[9])]
    data = tmp_path / "dups.jsonl"
    data.write_text("\n".join(lines) + "\n")
    settings = {
        **reso_settings(llama_dir, gsm8k_path, jax_cache),
        "data.path": str(data),
        "data.limit": 0,
        "features.projection_dim": 0,
    }
    ref = tmp_path / "ref"
    score.run(recipe("reso_smollm2_gsm8k", settings, ref))
    status = pq.read_table(ref / "scores.parquet").column("status").to_pylist()
    # Shards of 8 rows: p0 holds rows 0-3 and 8-11, p1 rows 4-7 and 12-14.
    want = {6: "duplicate_of:0", 12: "duplicate_of:4", 13: "duplicate_of:0", 14: "duplicate_of:11"}
    assert {i: s for i, s in enumerate(status) if s.startswith("duplicate_of")} == want
    assert status[3].startswith("error:") and status[11] == "ok"
    out = tmp_path / "two"
    job = launch("reso_smollm2_gsm8k", settings, out, tmp_path / "logs")
    assert job.returncode == 0, job.stdout[-3000:] + tails(tmp_path / "logs")
    assert_same_scores(out, ref)


def test_sigterm_on_one_process_stops_the_job_at_one_shard_boundary(
    gpt2_dir: Path, sharegpt_path: Path, jax_cache: Path, ifd_ref: Path, tmp_path: Path
) -> None:
    """Process 1 alone gets SIGTERM after its second shard: both processes finish the shard
    in flight and stop at the same boundary (no shard has one part only), exit 143 with a
    resume hint, and the re-launched job completes to the one-process output."""
    settings = ifd_settings(gpt2_dir, sharegpt_path, jax_cache)
    out, logs = tmp_path / "stopped", tmp_path / "logs"
    job = launch("ifd_gpt2_alpaca", settings, out, logs, RESOFILTER_TEST_TERM_AFTER_SHARDS="1:2")
    assert job.returncode != 0 and not (out / "scores.parquet").exists()
    texts = [p.read_text(errors="replace") for p in sorted(logs.glob("process-*.log"))]
    assert "stopped by SIGTERM" in texts[1] and "stopped by a signal on another process" in texts[0]
    names = {p.name for p in (out / "shards").glob("*.parquet")}
    done = {k for k in range(5) if f"shard-{k:05d}.p0of2.parquet" in names}
    assert done == {k for k in range(5) if f"shard-{k:05d}.p1of2.parquet" in names}
    assert 2 <= len(done) < 5, done
    job = launch("ifd_gpt2_alpaca", settings, out, tmp_path / "logs2")
    assert job.returncode == 0, job.stdout[-3000:] + tails(tmp_path / "logs2")
    assert json.loads((out / "run.json").read_text())["shards"]["reused"] == len(done)
    assert_same_scores(out, ifd_ref)

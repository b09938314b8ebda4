"""Run control: one live run per output directory, and graceful stops on SIGTERM / SIGINT.

A scorer subprocess holds its output directory's lock while it runs; a second run is
refused with a message naming it; SIGTERM stops it after the shard in flight (exit 143,
a resume hint, only whole sealed shards, the lock released) and the re-run completes to
the uninterrupted output. A lock left by a dead process, or by another host whose heartbeat
stopped, is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer, write_jsonl
from support.models import save_tiny_model
from support.scoring import alpaca_rows

from resofilter_jax.configuration import load_config
from resofilter_jax.data.sealed import seal_path
from resofilter_jax.run_lock import LOCK_NAME, RunLock, RunLockedError
from resofilter_jax.scoring import outputs
from resofilter_jax.scoring import pipeline as score
from resofilter_jax.stop_signals import StopSignals

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "max_length": 48,
    "min_bucket": 16,
    "token_budget": 256,
    "shard_size": 4,
    "progress": False,
    "host.encoded_cache_dir": "",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(595, seed=13))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)  # 600 rows


def config(model_dir: Path, data: Path, out: Path, cache: Path) -> Any:
    over = {"model.path": str(model_dir), "data.path": str(data), "output_dir": str(out)}
    over["compilation_cache_dir"] = str(cache)
    return load_config(ROOT / "configs/ifd_gpt2_alpaca.py", {**over, **SETTINGS})


def start_scorer(
    model_dir: Path, data: Path, out: Path, cache: Path, **over: Any
) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "resofilter_jax.score",
        f"--config={ROOT / 'configs/ifd_gpt2_alpaca.py'}",
        f"--config.model.path={model_dir}",
        f"--config.data.path={data}",
        f"--config.output_dir={out}",
        f"--config.compilation_cache_dir={cache}",
        *(f"--config.{k}={v}" for k, v in {**SETTINGS, **over}.items()),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def assert_same_scores(got: Path, want: Path) -> None:
    assert (got / "scores.jsonl").read_bytes() == (want / "scores.jsonl").read_bytes()
    a, b = pq.read_table(got / "scores.parquet"), pq.read_table(want / "scores.parquet")
    for key in b.column_names:  # NaN == NaN
        np.testing.assert_array_equal(
            np.asarray(a.column(key).to_pylist()), np.asarray(b.column(key).to_pylist()), key
        )


@pytest.mark.slow  # a scorer subprocess
def test_a_live_run_holds_the_directory_and_sigterm_stops_it_at_a_shard_boundary(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "jax_cache"
    ref = tmp_path / "ref"
    score.run(config(model_dir, data_path, ref, cache))
    out = tmp_path / "out"
    proc = start_scorer(model_dir, data_path, out, cache)
    try:
        wait_for(proc, outputs.shard_path(out, 0))
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"in use by another run: .*pid {proc.pid}"):
            score.run(config(model_dir, data_path, out, cache))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "Run the same command again to resume" in err
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists() and not (out / "scores.parquet").exists()
    n = 150
    ranges = outputs.shard_ranges(600, 4)
    missing, problems = outputs.verify_shards(out, ranges, outputs.run_hash(out), remove=False)
    assert problems == [] and not list(out.rglob("*.tmp"))  # only whole, sealed shards
    assert 0 < n - len(missing) < n  # it stopped part-way
    summary = score.run(config(model_dir, data_path, out, cache))
    assert summary["shards"]["reused"] == n - len(missing)
    assert_same_scores(out, ref)


@pytest.mark.slow  # a scorer subprocess
def test_a_second_signal_stops_at_once_leaving_only_whole_files(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    """Shards of 150 rows: the second SIGINT comes (once the first is logged) while the
    shard in flight still runs, and stops the scorer there."""
    out, cache = tmp_path / "out", tmp_path / "jax_cache"
    proc = start_scorer(model_dir, data_path, out, cache, shard_size=150)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_for(proc, seal_path(outputs.shard_path(out, 0)))
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while not any("SIGINT received: stopping once" in x for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode != 0, err[-3000:]
    assert "SIGINT received again: stopping now" in err, err[-3000:]
    ranges = outputs.shard_ranges(600, 150)
    missing, problems = outputs.verify_shards(out, ranges, outputs.run_hash(out), remove=False)
    assert problems == [] and not list(out.rglob("*.tmp"))
    assert 0 in set(range(4)) - set(missing)  # shard 0 stayed, whole and sealed


def test_a_lock_of_a_live_process_is_refused_and_of_a_dead_one_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = RunLock(tmp_path, "sleeper")
        holder._holder = lambda: {  # type: ignore[method-assign]
            "host": socket.gethostname(),
            "pid": sleeper.pid,
            "pid_start": None,
            "command": "python -m resofilter_jax.score --config=x",
            "started": "2026-12-04 10:00:00 UTC",
            "token": "t",
        }
        holder.acquire()
        holder._stop.set()  # no heartbeat thread needed
        with pytest.raises(RunLockedError) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {sleeper.pid}" in msg and "started 2026-12-04 10:00:00 UTC" in msg
        assert socket.gethostname() in msg and "resofilter_jax.score" in msg
    finally:
        sleeper.kill()
        sleeper.wait()
    with caplog.at_level(logging.WARNING), RunLock(tmp_path) as mine:
        assert f"pid {sleeper.pid} no longer runs" in caplog.text
        assert json.loads(mine.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_another_hosts_lock_counts_until_its_heartbeat_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "then"}))
    with pytest.raises(RunLockedError, match="host node-17, pid 4242"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, stale_after_s=60):
        assert "heartbeat stopped" in caplog.text


def test_the_heartbeat_refreshes_the_lock_while_the_run_lives(tmp_path: Path) -> None:
    with RunLock(tmp_path, heartbeat_s=0.05) as lock:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 60


def test_one_signal_sets_the_flag_and_a_second_raises() -> None:
    with StopSignals("testing") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(SystemExit) as err:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert err.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

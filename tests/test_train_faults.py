"""Faults of training runs (issue 18): a full disk, a second run on a live WORKDIR, SIGTERM /
SIGINT, a kill inside an asynchronous checkpoint save, a signal to one process of a job.

Every scenario that resumes ends with the uninterrupted run's weights (the exported
safetensors, 1e-6 relative; in practice bitwise). The model is the tiny random Llama of
``test_train.py`` (1 layer, character tokenizer), fp32, packed rows of 64 tokens, 8 rows per
step on one device. Full-disk tests mount a small tmpfs as WORKDIR (root on Linux, as in CI;
elsewhere they are skipped); subprocess tests are ``slow``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.faults import PAGE, pages, resize, small_filesystem
from support.training import char_tokenizer, sft_config, tiny_hf

from resofilter_jax.data.atomic import DiskFullError
from resofilter_jax.run_lock import LOCK_NAME, RunLockedError
from resofilter_jax.training import pipeline as train_main
from resofilter_jax.training.checkpoints import KILL_IN_SAVE_ENV, TMP_SUFFIX
from resofilter_jax.training.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60  # ~2 s of training here: long enough to signal a live run


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf("llama", seed=5, layers=1).save_pretrained(out, safe_serialization=True)
    char_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def alpaca_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    with path.open("w") as f:
        for _ in range(40):
            a, b = (int(x) for x in rng.integers(0, 50, size=2))
            row = {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"}
            f.write(json.dumps(row) + "\n")
    return path


def settings(tiny_dir: Path, data: Path, workdir: Path, **over: Any) -> dict[str, Any]:
    """The run of every test; checkpoint settings vary (they do not change the weights)."""
    return {
        "model.path": str(tiny_dir),
        "model.dtype": "float32",
        "data.path": str(data),
        "data.packing": True,
        "template": "none",
        "max_length": 64,
        "min_bucket": 64,
        "train.batch_size": 8,
        "train.max_steps": STEPS,
        "optim.lr": 3e-3,
        "optim.weight_decay": 0.1,
        "optim.warmup_steps": 1,
        "mesh.data": 1,
        "ce_chunk": 32,
        "checkpoint.every": 0,
        "progress": False,
        "tensorboard": False,
        "compilation_cache_dir": "",  # the session's (JAX_COMPILATION_CACHE_DIR, conftest.py)
        "workdir": str(workdir),
        **over,
    }


def train(overrides: dict[str, Any]) -> dict[str, Any]:
    return train_main.run(sft_config(overrides))


def exported(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "hf" / "model.safetensors"))


def assert_same_weights(got: Path, want: Path) -> None:
    g, w = exported(got), exported(want)
    assert sorted(g) == sorted(w)
    for k in w:
        np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=0, err_msg=k)


def metric_steps(workdir: Path) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def saved_steps(workdir: Path) -> list[int]:
    """Complete checkpoints (orbax's finalized directories)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def unfinished(workdir: Path) -> list[str]:
    return [p.name for p in (workdir / "checkpoints").iterdir() if TMP_SUFFIX in p.name]


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, alpaca_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (its final checkpoint is the only one)."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train(settings(tiny_dir, alpaca_path, workdir))
    assert summary["steps"]["done"] == STEPS and saved_steps(workdir) == [STEPS]
    return workdir


# ---- a full disk ------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_stops_clearly_and_resumes(
    tiny_dir: Path, alpaca_path: Path, reference: Path, tmp_path: Path
) -> None:
    """Asynchronous saves every 2 steps, keep 2: the disk holds two checkpoints and a half, so
    the third save (step 6, in the background) fails; the error surfaces at the next save,
    names checkpoint 6 and its bytes, leaves only complete checkpoints 2 and 4 (the half-written
    one is deleted), and a re-run with space resumes from 4 to the uninterrupted weights."""
    checkpoint = pages(reference / "checkpoints" / str(STEPS))
    over = {"checkpoint.every": 2, "checkpoint.keep": 2, "checkpoint.use_async": True}
    with small_filesystem(tmp_path / "mnt", int(2.5 * checkpoint) + 4 * PAGE) as mnt:
        workdir = mnt / "run"
        with pytest.raises(DiskFullError) as err:
            train(settings(tiny_dir, alpaca_path, workdir, **over))
        msg = str(err.value)
        assert f"no space left to write {workdir / 'checkpoints' / '6'}: it needs about" in msg
        assert "bytes" in msg and "resumes from checkpoint 4" in msg
        assert saved_steps(workdir) == [2, 4] and unfinished(workdir) == []
        assert not (workdir / "hf").exists() and not (workdir / LOCK_NAME).exists()
        resize(mnt, 16 << 20)
        summary = train(settings(tiny_dir, alpaca_path, workdir))  # no periodic saves
        assert (summary["steps"]["start"], summary["steps"]["done"]) == (4, STEPS)
        assert_same_weights(workdir, reference)
        assert metric_steps(workdir) == list(range(1, STEPS + 1))


def test_a_full_disk_during_the_export_leaves_no_partial_export(
    tiny_dir: Path, alpaca_path: Path, reference: Path, tmp_path: Path
) -> None:
    """The final checkpoint fits, the HF export does not: a DiskFullError names WORKDIR/hf,
    nothing of the export is left, and the re-run (no step left) writes it."""
    size = pages(reference / "checkpoints") + pages(reference / "metrics.jsonl") + 24 * PAGE
    assert size < pages(reference / "checkpoints") + pages(reference / "hf")
    with small_filesystem(tmp_path / "mnt", size) as mnt:
        workdir = mnt / "run"
        with pytest.raises(DiskFullError, match=rf"no space left to write {workdir / 'hf'}:"):
            train(settings(tiny_dir, alpaca_path, workdir))
        assert saved_steps(workdir) == [STEPS]
        assert not (workdir / "hf").exists() and not (workdir / "hf.tmp").exists()
        resize(mnt, 16 << 20)
        summary = train(settings(tiny_dir, alpaca_path, workdir))
        assert (summary["steps"]["start"], summary["steps"]["done"]) == (STEPS, STEPS)
        assert_same_weights(workdir, reference)


def test_a_full_disk_while_logging_metrics_is_a_clear_error(tmp_path: Path) -> None:
    """metrics.jsonl: an append that finds the disk full raises DiskFullError naming the file;
    the resumed logger drops what follows the checkpoint (and the cut line), and when even
    that rewrite does not fit, the file is left as it was."""
    with small_filesystem(tmp_path / "mnt", 2 * PAGE) as mnt:
        (mnt / "filler").write_bytes(b"x" * PAGE)
        logger = MetricsLogger(mnt, total_steps=100, progress=False, tensorboard=False)
        with pytest.raises(DiskFullError) as err:
            for step in range(1, 100):  # a page of records fits, the next line does not
                logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "tokens": 512})
        assert f"no space left to write {mnt / 'metrics.jsonl'}: it needs" in str(err.value)
        logger.close()
        before = (mnt / "metrics.jsonl").read_bytes()
        assert len(before) == PAGE  # the last line is cut
        with pytest.raises(DiskFullError, match="metrics.jsonl"):
            MetricsLogger(mnt, total_steps=100, start_step=4, progress=False, tensorboard=False)
        assert (mnt / "metrics.jsonl").read_bytes() == before
        (mnt / "filler").unlink()
        MetricsLogger(mnt, total_steps=100, start_step=4, progress=False, tensorboard=False).close()
        assert metric_steps(mnt) == [1, 2, 3, 4]


# ---- live runs, signals, kills (subprocesses) ---------------------------------------------------


def start_training(overrides: dict[str, Any], log: Path, **env: str) -> subprocess.Popen:
    """``python -m resofilter_jax.train`` with ``overrides``, stderr to ``log``."""
    args = [sys.executable, "-m", "resofilter_jax.train", "--config=configs/sft_smollm2.py"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    with log.open("w") as err:
        return subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err
        )


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, log: Path) -> None:
    """Waits until metrics.jsonl shows ``step`` (the run is in its training loop)."""
    deadline = time.monotonic() + 240
    while True:
        path = workdir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.005)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    return log.read_text()


@pytest.mark.slow  # a training subprocess
def test_a_live_run_holds_its_workdir_and_sigterm_stops_it_at_a_checkpoint(
    tiny_dir: Path, alpaca_path: Path, reference: Path, tmp_path: Path
) -> None:
    """A second run on the WORKDIR is refused naming the live one (and touches nothing);
    SIGTERM then stops the live run after the current step with a checkpoint of that step
    (not a checkpoint step: every 50), exit 143 and a resume hint; the re-run resumes there
    and ends with the uninterrupted weights."""
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    over = settings(tiny_dir, alpaca_path, workdir, **{"checkpoint.every": 50})
    proc = start_training(over, log)
    try:
        wait_for_step(proc, workdir, 3, log)
        with pytest.raises(RunLockedError, match=rf"in use by another run: .*pid {proc.pid}"):
            train(over)
        proc.send_signal(signal.SIGTERM)
    finally:
        err = finish(proc, log)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = saved_steps(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < 50, saved  # saved at the step it stopped
    assert f"stopped by SIGTERM after step {saved[0]} of {STEPS}" in err
    assert "Run the same command again to resume" in err and "Traceback" not in err
    assert not (workdir / LOCK_NAME).exists() and not (workdir / "hf").exists()
    assert metric_steps(workdir) == list(range(1, saved[0] + 1))
    summary = train(over)
    assert summary["steps"]["start"] == saved[0]
    assert_same_weights(workdir, reference)


@pytest.mark.slow  # a training subprocess
def test_the_command_refuses_a_held_workdir_in_one_line(
    tiny_dir: Path, alpaca_path: Path, tmp_path: Path
) -> None:
    """``python -m resofilter_jax.train`` on a WORKDIR whose lock names a live process exits
    1 with one ``error:`` line naming it, before touching anything in WORKDIR."""
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    workdir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "then"}
        (workdir / LOCK_NAME).write_text(json.dumps({**holder, "command": "another train"}))
        proc = start_training(settings(tiny_dir, alpaca_path, workdir), log)
        err = finish(proc, log)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    line = f"error: {workdir} is in use by another run: host {holder['host']}, pid {sleeper.pid}"
    assert line in err and "(command: another train)" in err
    assert sorted(p.name for p in workdir.iterdir()) == sorted(
        [LOCK_NAME, ".resofilter.lock.guard"]
    )


@pytest.mark.slow  # a training subprocess
def test_a_second_signal_stops_at_once_leaving_only_complete_checkpoints(
    tiny_dir: Path, alpaca_path: Path, reference: Path, tmp_path: Path
) -> None:
    """Two SIGINTs while a checkpoint is saved every step (asynchronously), the second once the
    first is handled: the run stops at once (exit 130), no unfinished checkpoint is taken for
    complete, and the re-run resumes from the newest complete one to the uninterrupted
    weights."""
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    over = {"checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.use_async": True}
    over = settings(tiny_dir, alpaca_path, workdir, **over)
    proc = start_training(over, log)
    try:
        wait_for_step(proc, workdir, 3, log)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30  # the first one handled (two at once would merge)
        while "SIGINT received: stopping once" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.0005)
        proc.send_signal(signal.SIGINT)  # while it finishes the step and its checkpoint
    finally:
        err = finish(proc, log)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT received again: stopping now" in err and "stopped at once" in err
    saved = saved_steps(workdir)
    assert saved and saved[-1] < STEPS, saved
    summary = train({**over, "checkpoint.every": 0})
    assert summary["steps"]["start"] == saved[-1]
    assert_same_weights(workdir, reference)


@pytest.mark.slow  # a killed training subprocess
def test_a_kill_inside_an_async_save_resumes_from_the_previous_checkpoint(
    tiny_dir: Path, alpaca_path: Path, reference: Path, tmp_path: Path, caplog: Any
) -> None:
    """Asynchronous saves every 2 steps, keep 1: the process is SIGKILLed from orbax's
    background thread when checkpoint 4 is written but not yet renamed. Checkpoint 2 is
    still there and complete; the re-run takes the dead run's lock over, ignores (and
    deletes) the unfinished directory, resumes from 2 and ends with the uninterrupted
    weights."""
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    over = {"checkpoint.every": 2, "checkpoint.keep": 1, "checkpoint.use_async": True}
    over = settings(tiny_dir, alpaca_path, workdir, **over)
    proc = start_training(over, log, **{KILL_IN_SAVE_ENV: "4"})
    err = finish(proc, log)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert saved_steps(workdir) == [2] and unfinished(workdir) == [f"4{TMP_SUFFIX}"]
    assert (workdir / LOCK_NAME).exists()  # the dead run's
    with caplog.at_level(logging.WARNING):
        summary = train({**over, "checkpoint.every": 0})
    assert "taking over the lock" in caplog.text and "no longer runs" in caplog.text
    assert (summary["steps"]["start"], summary["steps"]["done"]) == (2, STEPS)
    assert unfinished(workdir) == []
    assert_same_weights(workdir, reference)


def job_process(workdir: Path, index: int) -> int:
    """The pid of process ``index`` of the launched job training in ``workdir``."""
    want = [f"--config.workdir={workdir}", f"--config.distributed.process_id={index}"]
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if all(a in args for a in want):
            return int(proc.name)
    raise AssertionError(f"process {index} of the job is not running")


@pytest.mark.slow  # a 2-process jax.distributed job
def test_a_signal_to_one_process_stops_the_whole_job_at_one_step(
    tiny_dir: Path, alpaca_path: Path, tmp_path: Path
) -> None:
    """2 processes x 4 CPU devices: SIGTERM to process 1 only. Both processes stop after the
    same step (they agree through one small all-reduce per step), checkpoint it and exit 143;
    process 0 says it stopped for a signal on another process."""
    if sys.platform != "linux":
        pytest.skip("finds the job's processes through /proc")
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    over = settings(tiny_dir, alpaca_path, workdir, **{"mesh.data": -1, "checkpoint.every": 50})
    args = [f"--config.{k}={v}" for k, v in over.items()]
    args.append("--config.distributed.heartbeat_timeout_s=5")  # a lost peer fails fast
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    cmd = ["bash", str(ROOT / "launch/local_multiprocess.sh"), "-n", "2", "-d", "4"]
    cmd += ["-l", str(logs), "-m", "resofilter_jax.train", "--", "--config=configs/sft_smollm2.py"]
    job = subprocess.Popen(
        cmd + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_step(job, workdir, 3, logs / "process-0.log")
        os.kill(job_process(workdir, 1), signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    text = [(logs / f"process-{p}.log").read_text() for p in (0, 1)]
    assert job.returncode == 128 + signal.SIGTERM, "\n".join(t[-2000:] for t in text)
    saved = saved_steps(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < 50, saved
    assert f"stopped by SIGTERM after step {saved[0]} of {STEPS}" in text[1]
    assert f"stopped by a signal on another process after step {saved[0]} of" in text[0]
    assert metric_steps(workdir) == list(range(1, saved[0] + 1))

"""Faults of real runs: corrupt, foreign and unsealed shard files; a full disk.

Every scenario ends the same way: the re-run's merged output is identical to an
uninterrupted run's, and nothing broken is ever merged. The full-disk tests mount a small
tmpfs as the output directory (root on Linux, as in CI); elsewhere they are skipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.data import build_tokenizer, write_jsonl
from support.faults import resize, small_filesystem
from support.models import save_tiny_model
from support.scoring import alpaca_rows

from resofilter_jax.configuration import load_config
from resofilter_jax.data.atomic import DiskFullError, atomic_write_bytes
from resofilter_jax.data.sealed import check_sealed, seal_path, write_sealed
from resofilter_jax.scoring import outputs, projection, projection_parts
from resofilter_jax.scoring import pipeline as score

ROOT = Path(__file__).resolve().parents[1]
ROWS = 48  # alpaca_rows(n) gives n + 5 rows: 6 shards of 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(ROWS - 5, seed=21))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def config(model_dir: Path, data: Path, out: Path, **over: Any) -> Any:
    """The GPT-2 / Alpaca IFD recipe shrunk for the tiny model: shards of 8 rows."""
    return load_config(
        ROOT / "configs/ifd_gpt2_alpaca.py",
        {
            "model.path": str(model_dir),
            "data.path": str(data),
            "output_dir": str(out),
            "max_length": 48,
            "min_bucket": 16,
            "token_budget": 256,
            "shard_size": 8,
            "progress": False,
            "compilation_cache_dir": "",
            "host.encoded_cache_dir": "",
            **over,
        },
    )


@pytest.fixture(scope="module")
def reference(model_dir: Path, data_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    score.run(config(model_dir, data_path, out))
    return out


def assert_same_outputs(got: Path, want: Path) -> None:
    """Byte-identical ``scores.jsonl``, and ``scores.parquet`` with the same values."""
    import pyarrow.parquet as pq

    assert (got / "scores.jsonl").read_bytes() == (want / "scores.jsonl").read_bytes()
    a, b = pq.read_table(got / "scores.parquet"), pq.read_table(want / "scores.parquet")
    assert a.schema == b.schema
    for key in b.column_names:  # NaN == NaN
        np.testing.assert_array_equal(
            np.asarray(a.column(key).to_pylist()), np.asarray(b.column(key).to_pylist()), key
        )


# ---- sealed files -----------------------------------------------------------------------------


def test_a_sealed_file_reports_each_way_it_can_go_wrong(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    write_sealed(path, b"0123456789", {"shard": 3})
    assert check_sealed(path, {"shard": 3}) == ""
    assert check_sealed(path, {"shard": 4}).startswith("foreign: sealed with shard=3")
    path.write_bytes(b"01234")
    assert check_sealed(path, {}).startswith("truncated")
    path.write_bytes(b"0123456780")
    assert check_sealed(path, {}).startswith("corrupted")
    seal_path(path).unlink()
    assert check_sealed(path, {}).startswith("not sealed")
    path.unlink()
    assert check_sealed(path, {}) == "missing"


def test_rewriting_a_sealed_file_never_leaves_new_bytes_under_the_old_seal(
    tmp_path: Path,
) -> None:
    """A writer stopped between the data and the seal removes the data (an exception); a
    SIGKILL there would leave it unsealed; never new bytes under the old seal."""
    path = tmp_path / "f.bin"
    write_sealed(path, b"old", {})
    with pytest.raises(RuntimeError), _failing_second_write():
        write_sealed(path, b"new", {})
    assert check_sealed(path, {}) == "missing" and not seal_path(path).exists()
    write_sealed(path, b"old", {})
    with _failing_second_write(raise_at=1), pytest.raises(RuntimeError):
        write_sealed(path, b"new", {})  # the data write itself fails: the old seal is gone
    assert check_sealed(path, {}).startswith("not sealed")


@contextlib.contextmanager
def _failing_second_write(raise_at: int = 2) -> Iterator[None]:
    """Makes the ``raise_at``-th atomic write in the block raise (2: the seal)."""
    from resofilter_jax.data import sealed

    calls = [0]

    def write(path: Path, data: bytes) -> None:
        calls[0] += 1
        if calls[0] == raise_at:
            raise RuntimeError("stopped")
        atomic_write_bytes(path, data)

    old = sealed.atomic_write_bytes
    sealed.atomic_write_bytes = write
    try:
        yield
    finally:
        sealed.atomic_write_bytes = old


# ---- corrupt, foreign and unsealed shards ----------------------------------------------------


def test_bad_shards_are_reported_recomputed_and_never_merged(
    model_dir: Path,
    data_path: Path,
    reference: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "scores.parquet").unlink()
    (out / "scores.jsonl").unlink()
    shard = [outputs.shard_path(out, k) for k in range(6)]
    # 1: truncated; 2: one byte flipped; 3: never sealed; 4: shard 0's file and seal under
    # shard 4's name (foreign rows); 5: a shard of another run (other data) with its seal.
    shard[1].write_bytes(shard[1].read_bytes()[:-100])
    data = bytearray(shard[2].read_bytes())
    data[len(data) // 2] ^= 0x01
    shard[2].write_bytes(bytes(data))
    seal_path(shard[3]).unlink()
    shutil.copy(shard[0], shard[4])
    shutil.copy(seal_path(shard[0]), seal_path(shard[4]))
    other = tmp_path / "other"
    rows = [dict(r, id=f"o{i}") for i, r in enumerate(alpaca_rows(ROWS - 5, seed=99))]
    other_data = write_jsonl(tmp_path / "other.jsonl", rows)
    score.run(config(model_dir, other_data, other))
    shutil.copy(outputs.shard_path(other, 5), shard[5])
    shutil.copy(seal_path(outputs.shard_path(other, 5)), seal_path(shard[5]))

    with caplog.at_level(logging.WARNING):
        summary = score.run(config(model_dir, data_path, out))
    assert summary["shards"] == {"total": 6, "computed": 5, "reused": 1}
    report = caplog.text
    for name, why in [
        ("shard-00001", "truncated"),
        ("shard-00002", "corrupted"),
        ("shard-00003", "not sealed"),
        ("shard-00004", "foreign: sealed with shard=0, this run expects 4"),
        ("shard-00005", "foreign: sealed with fingerprint="),
    ]:
        assert f"{name}.parquet: {why}" in report, (name, report)
    assert_same_outputs(out, reference)


def test_the_merge_refuses_a_shard_corrupted_after_it_was_checked(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    path = outputs.shard_path(out, 2)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    ranges = outputs.shard_ranges(ROWS, 8)
    with pytest.raises(RuntimeError, match=r"shard-00002\.parquet is corrupted"):
        outputs.merge_shards(
            out, 6, with_id=True, with_turn=False, sealed_by=(outputs.run_hash(out), ranges)
        )
    assert not path.exists()  # the next run recomputes it
    assert (out / "scores.jsonl").read_bytes() == (reference / "scores.jsonl").read_bytes()


def test_bad_projection_files_and_parts_are_not_used(tmp_path: Path) -> None:
    ranges = [(0, 3), (3, 5)]
    run = "f" * 64
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    for k, (lo, hi) in enumerate(ranges):
        for p in range(2):
            meta = outputs.shard_meta(run, k, lo, hi, (p, 2))
            rows = meta["rows"]
            projection_parts.write_part(tmp_path, k, x[rows[0] : rows[1]], (p, 2), meta)
    part = projection.projection_path(projection_parts.part_root(tmp_path, (1, 2)), 1)
    data = bytearray(part.read_bytes())
    data[-1] ^= 0x01  # shard 1's second part is corrupted
    part.write_bytes(bytes(data))
    assert projection_parts.merge_parts(tmp_path, ranges, 3, run) == [0]
    assert projection.shard_matches(tmp_path, 0, 3, 3, outputs.shard_meta(run, 0, 0, 3))
    assert not projection.shard_matches(tmp_path, 1, 2, 3)
    merged = np.load(io.BytesIO(projection.projection_path(tmp_path, 0).read_bytes()))
    np.testing.assert_array_equal(merged, x[:3].astype(np.float16))
    # Another run's parts (other fingerprint) are not merged either.
    assert projection_parts.merge_parts(tmp_path, ranges, 3, "0" * 64) == []


# ---- a full disk ------------------------------------------------------------------------------


def leftovers(out: Path) -> list[str]:
    """Temporary files, and shard files that would be trusted but are not whole."""
    tmp = [p.name for p in out.rglob("*.tmp")]
    ranges = outputs.shard_ranges(ROWS, 8)
    _, problems = outputs.verify_shards(out, ranges, outputs.run_hash(out), remove=False)
    sealed_bad = [p for p in problems if "not sealed" not in p]  # unsealed is never trusted
    return tmp + sealed_bad


def test_a_full_disk_while_writing_shards_stops_clearly_and_resumes(
    model_dir: Path, data_path: Path, reference: Path, tmp_path: Path
) -> None:
    shard_bytes = outputs.shard_path(reference, 0).stat().st_size
    with small_filesystem(tmp_path / "mnt", 2 * 4096 + 3 * shard_bytes) as mnt:
        out = mnt / "out"
        with pytest.raises(DiskFullError) as err:
            score.run(config(model_dir, data_path, out))
        msg = str(err.value)
        assert str(out) in msg and "bytes" in msg and "run the same command again" in msg
        assert not (out / "scores.parquet").exists() and leftovers(out) == []
        done = 6 - len(outputs.missing_shards(out, 6))
        assert 0 < done < 6, done  # stopped part-way
        resize(mnt, 4 << 20)
        summary = score.run(config(model_dir, data_path, out))
        assert summary["shards"]["reused"] >= done - 1  # all whole shards but the last
        assert_same_outputs(out, reference)


def test_a_full_disk_while_merging_stops_clearly_and_resumes(
    model_dir: Path, data_path: Path, reference: Path, tmp_path: Path
) -> None:
    def pages(f: Path) -> int:  # tmpfs allocates whole 4 KiB pages
        return -(-f.stat().st_size // 4096)

    shard_files = list((reference / "shards").iterdir())
    scoring = sum(map(pages, shard_files)) + pages(reference / outputs.RUN_CONFIG)
    spare = max(map(pages, shard_files)) + 1  # a shard's temporary file, and a page more
    merge = pages(reference / "scores.parquet") + pages(reference / "scores.jsonl")
    assert merge > spare  # the shards fit, the merged files do not
    pages_total = scoring + spare
    with small_filesystem(tmp_path / "mnt", pages_total * 4096) as mnt:
        out = mnt / "out"
        with pytest.raises(DiskFullError, match=r"scores\.(parquet|jsonl)") as err:
            score.run(config(model_dir, data_path, out))
        assert "bytes" in str(err.value)
        assert outputs.missing_shards(out, 6) == [] and leftovers(out) == []
        assert not (out / "scores.parquet").exists() and not (out / "scores.jsonl").exists()
        resize(mnt, 4 << 20)
        summary = score.run(config(model_dir, data_path, out))
        assert summary["shards"] == {"total": 6, "computed": 0, "reused": 6}
        assert_same_outputs(out, reference)


def test_the_score_command_prints_the_full_disk_error_without_a_traceback(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "mnt", 3 * 4096) as mnt:
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "resofilter_jax.score",
                f"--config={ROOT / 'configs/ifd_gpt2_alpaca.py'}",
                f"--config.model.path={model_dir}",
                f"--config.data.path={data_path}",
                f"--config.output_dir={mnt / 'out'}",
                "--config.max_length=48",
                "--config.shard_size=8",
                "--config.progress=False",
                "--config.host.encoded_cache_dir=",
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert got.returncode != 0
    assert "error: no space left to write" in got.stderr and "Traceback" not in got.stderr

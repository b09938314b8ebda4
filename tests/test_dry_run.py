"""Dry run: target topologies, and AOT compilation of the scoring steps for pod-sized meshes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resofilter_jax.dry_run import GIB, parse_topology

pytestmark = pytest.mark.slow  # dry runs: compiles for pod topologies

REPO = Path(__file__).resolve().parents[1]

# gemma-2-2b's published config.json (architecture only; no weights are needed).
GEMMA2_2B = REPO / "tests/data/gemma-2-2b/config.json"

# A config file that is `base` with dry_run_compiler set: pins the compiler of a dry run
# whatever is installed (these tests check the virtual-CPU path; test_tpu_compile.py the
# TPU compiler).
PINNED_CONFIG = """
import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location("base_config", {base!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.dry_run_compiler = {compiler!r}
    return c
"""


def pinned_config(base: str, tmp_path: Path, compiler: str = "cpu") -> str:
    """A config file: ``configs/<base>`` with ``dry_run_compiler=compiler``."""
    path = tmp_path / f"{compiler}_{base}"
    path.write_text(PINNED_CONFIG.format(base=str(REPO / "configs" / base), compiler=compiler))
    return str(path)


@pytest.mark.parametrize(
    ("name", "hosts", "per_host", "chip"),
    [
        ("2x8xh100", 2, 8, "h100"),
        ("4x4xv5e", 4, 4, "v5e"),
        ("v5e-8", 1, 8, "v5e"),
        ("v5litepod-32", 8, 4, "v5e"),
        ("v4-32", 4, 4, "v4"),
        ("v5p-8", 1, 4, "v5p"),
        ("v6e-16", 4, 4, "v6e"),
    ],
)
def test_parse_topology(name: str, hosts: int, per_host: int, chip: str) -> None:
    t = parse_topology(name)
    assert (t.hosts, t.per_host, t.chip) == (hosts, per_host, chip)


@pytest.mark.parametrize("name", ["8xh100", "2x8xb9000", "v7-8", "tpu"])
def test_parse_topology_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ValueError, match="topology|chip"):
        parse_topology(name)


def _dry_run(args: list[str], command: str = "score") -> tuple[dict, str]:
    """(report, stdout) of ``python -m resofilter_jax.<command> ARGS --config.dry_run=True``."""
    cmd = [sys.executable, "-m", f"resofilter_jax.{command}", *args, "--config.dry_run=True"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per device:" in proc.stdout
    return json.loads(proc.stdout[proc.stdout.index("\n{") + 1 :]), proc.stdout


def test_ifd_dry_run_for_a_pod_slice(tmp_path: Path) -> None:
    """SmolLM2 IFD on a v5e-32 slice on virtual CPU devices: 32 devices, replicated fp32
    parameters per device; splash (auto's TPU pick) is compiled as the reference."""
    report, out = _dry_run(
        [
            "--config",
            pinned_config("ifd_smollm2_sharegpt.py", tmp_path),
            "--config.dry_run_topology=v5e-32",
        ]
    )
    assert report["compiler"]["used"] == "cpu" and "XLA:CPU" in out
    assert report["attention"]["backend"] == "splash"
    assert report["attention"]["compiled"] == "reference"
    assert "only the TPU compiler (libtpu) lowers it" in out
    assert report["topology"]["devices"] == 32 and report["topology"]["hosts"] == 8
    assert report["mesh"] == {"data": 32}
    rows, length = report["batch"]["global"]
    assert length == 1024 and rows % 32 == 0 and report["batch"]["per_process"] == [rows // 8, 1024]
    mem = report["per_device_bytes"]
    params = 4 * report["model"]["params"]  # fp32, replicated on every device
    assert mem["arguments"] >= 0.9 * params
    assert report["fits"] is True and mem["total"] < 16 * GIB


def test_resonance_dry_run_of_the_paper_setting() -> None:
    """gemma-2-2b resonance (last-3 up_proj, max_length 768) on 2 nodes x 8 H100: virtual
    CPU devices; auto finds no fused GPU kernel for packed rows with a soft-cap."""
    report, out = _dry_run(
        [
            "--config",
            str(REPO / "configs/reso_gemma2_metamath.py"),
            f"--config.model.path={GEMMA2_2B}",
            "--config.data.path=unused.json",
            "--config.dry_run_topology=2x8xh100",
        ]
    )
    assert report["topology"]["devices"] == 16
    assert report["compiler"]["used"] == "cpu" and "no h100 compiler" in out
    assert report["attention"]["backend"] == report["attention"]["compiled"] == "reference"
    assert report["estimate"]["step_s"] > 0 and "ESTIMATE" in out
    assert report["batch"]["global"][1] == 768
    assert report["model"]["params"] > 2.5e9
    assert report["per_device_bytes"]["arguments"] > 2.5e9 * 4 * 0.9
    assert report["fits"] is True


def test_train_dry_run_with_fsdp(tmp_path: Path) -> None:
    """SmolLM2 SFT on 4 hosts x 4 v5e (virtual CPU devices): params + AdamW state sharded
    over fsdp=4."""
    report, _ = _dry_run(
        [
            "--config",
            pinned_config("sft_smollm2.py", tmp_path),
            "--config.dry_run_topology=4x4xv5e",
            "--config.mesh.fsdp=4",
            "--config.train.batch_size=32",
            "--config.train.micro_batch_size=16",
            "--config.max_length=256",
        ],
        command="train",
    )
    assert report["compiler"]["used"] == "cpu"
    assert report["mesh"] == {"data": 4, "fsdp": 4}
    assert report["batch"]["global"] == [2, 16, 256]
    assert report["batch"]["per_process"] == [2, 4, 256]
    params = report["model"]["params"]
    args = report["per_device_bytes"]["arguments"]
    # fp32 params + two AdamW moments, matrices split 4 ways (norms replicated): ~12 N / 4.
    assert 0.8 * 12 * params / 4 < args < 1.2 * 12 * params / 4
    assert report["fits"] is True

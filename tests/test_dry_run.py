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
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


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


def _dry_run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "resofilter_jax.score", *args, "--config.dry_run=True"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per device:" in proc.stdout
    return json.loads(proc.stdout[proc.stdout.index("\n{") + 1 :])


def test_ifd_dry_run_for_a_pod_slice() -> None:
    """SmolLM2 IFD on a v5e-32 slice: 32 devices, replicated fp32 parameters per device."""
    report = _dry_run(
        [
            "--config",
            str(REPO / "configs/ifd_smollm2_sharegpt.py"),
            "--config.dry_run_topology=v5e-32",
        ]
    )
    assert report["topology"]["devices"] == 32 and report["topology"]["hosts"] == 8
    assert report["mesh"] == {"data": 32}
    rows, length = report["batch"]["global"]
    assert length == 1024 and rows % 32 == 0 and report["batch"]["per_process"] == [rows // 8, 1024]
    mem = report["per_device_bytes"]
    params = 4 * report["model"]["params"]  # fp32, replicated on every device
    assert mem["arguments"] >= 0.9 * params
    assert report["fits"] is True and mem["total"] < 16 * GIB


def test_resonance_dry_run_of_the_paper_setting(tmp_path: Path) -> None:
    """gemma-2-2b resonance (last-3 up_proj, max_length 768) on 2 nodes x 8 H100."""
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(GEMMA2_2B))
    report = _dry_run(
        [
            "--config",
            str(REPO / "configs/reso_gemma2_metamath.py"),
            f"--config.model.path={config_json}",
            "--config.data.path=unused.json",
            "--config.dry_run_topology=2x8xh100",
        ]
    )
    assert report["topology"]["devices"] == 16
    assert report["batch"]["global"][1] == 768
    assert report["model"]["params"] > 2.5e9
    assert report["per_device_bytes"]["arguments"] > 2.5e9 * 4 * 0.9
    assert report["fits"] is True


def test_train_dry_run_with_fsdp() -> None:
    """SmolLM2 SFT on 4 hosts x 4 v5e: params + AdamW state sharded over fsdp=4."""
    cmd = [
        sys.executable,
        "-m",
        "resofilter_jax.train",
        "--config",
        str(REPO / "configs/sft_smollm2.py"),
        "--config.dry_run=True",
        "--config.dry_run_topology=4x4xv5e",
        "--config.mesh.fsdp=4",
        "--config.train.batch_size=32",
        "--config.train.micro_batch_size=16",
        "--config.max_length=256",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("\n{") + 1 :])
    assert report["mesh"] == {"data": 4, "fsdp": 4}
    assert report["batch"]["global"] == [2, 16, 256]
    assert report["batch"]["per_process"] == [2, 4, 256]
    params = report["model"]["params"]
    args = report["per_device_bytes"]["arguments"]
    # fp32 params + two AdamW moments, matrices split 4 ways (norms replicated): ~12 N / 4.
    assert 0.8 * 12 * params / 4 < args < 1.2 * 12 * params / 4
    assert report["fits"] is True

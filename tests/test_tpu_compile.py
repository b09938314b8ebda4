"""TPU targets of the dry run: topology names, compiler choice, the step-time ESTIMATE, splash
under shard_map, and real XLA:TPU compiles of the SmolLM2 steps (libtpu, compile-only TPUs).

The compile tests need libtpu (in the ``test`` extra on Linux x86_64, the only platform with
libtpu wheels). Without it they are skipped with the reason, except in CI
(``RESOFILTER_REQUIRE_ASSETS=1``), where they fail.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resofilter_jax.dry_run_estimate import Step, estimate, mean_keys, peak_flops, step_ops
from resofilter_jax.dry_run_targets import (
    Target,
    chip_grid,
    choose_compiler,
    libtpu,
    parse_topology,
    tpu_topology_args,
)
from resofilter_jax.models.attention import self_attention
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.fused_attention import batch_axes

REPO = Path(__file__).resolve().parents[1]
FAKE_LIBTPU = {"path": "/opt/libtpu.so", "version": "0.0.0"}

# --------------------------------------------------------------------------- topologies


@pytest.mark.parametrize(
    ("name", "topology_name", "chip_config", "bounds", "slices", "hosts"),
    [
        ("v5e-4", "v5e:2x2", "default", (2, 2, 1), 1, 1),
        ("v5e-8", "v5e:2x4", "default", (2, 4, 1), 1, 1),
        ("v5e-32", "v5e:4x8", "default", (2, 2, 1), 1, 8),
        ("2xv5e-16", "v5e:4x4", "default", (2, 2, 1), 2, 8),
        ("4x4xv5e", "v5e:4x4", "default", (2, 2, 1), 1, 4),
        ("v4-8", "v4:2x2x1", "megacore", (2, 2, 1), 1, 1),
        ("v5p-64", "v5p:2x4x4", "megacore", (2, 2, 1), 1, 8),
        ("v5p:4x4x12", "v5p:4x4x12", "megacore", (2, 2, 1), 1, 48),
        ("v6e-256", "v6e:16x16", "default", (2, 2, 1), 1, 64),
    ],
)
def test_tpu_topology_args(
    name: str, topology_name: str, chip_config: str, bounds: tuple, slices: int, hosts: int
) -> None:
    topo = parse_topology(name)
    args = tpu_topology_args(topo)
    assert args["topology_name"] == topology_name
    assert args["chip_config_name"] == chip_config
    assert args["chips_per_host_bounds"] == bounds
    assert (args["num_slices"], topo.slices, topo.hosts) == (slices, slices, hosts)


@pytest.mark.parametrize(
    ("name", "wrap"),
    [
        ("v5p-64", (False, False, False)),
        ("v5p-128", (True, True, True)),
        ("v5e-128", (False, True, False)),
        ("v6e-256", (True, True, False)),
    ],
)
def test_full_torus_dimensions_wrap(name: str, wrap: tuple) -> None:
    assert tpu_topology_args(parse_topology(name))["wrap"] == wrap


def test_chip_grids_double_the_smallest_side() -> None:
    assert [chip_grid(n, 2) for n in (1, 2, 4, 8, 16, 32)] == [
        (1, 1),
        (1, 2),
        (2, 2),
        (2, 4),
        (4, 4),
        (4, 8),
    ]
    assert [chip_grid(n, 3) for n in (4, 8, 16, 32, 64, 128)] == [
        (2, 2, 1),
        (2, 2, 2),
        (2, 2, 4),
        (2, 4, 4),
        (4, 4, 4),
        (4, 4, 8),
    ]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("v5p-24", "power of two"),  # 12 chips: give the grid (v5p:2x2x3)
        ("v5e:2x3", "do not tile"),  # one host of 6 chips
        ("2x8xh100", "not a TPU"),
    ],
)
def test_tpu_topology_args_refuses(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tpu_topology_args(parse_topology(name))


def test_choose_compiler() -> None:
    v5e, h100 = parse_topology("v5e-4"), parse_topology("2x8xh100")
    assert choose_compiler(v5e, "auto", FAKE_LIBTPU)[0] == "tpu"
    compiler, why = choose_compiler(v5e, "auto", None)
    assert compiler == "cpu" and "libtpu is not installed" in why
    compiler, why = choose_compiler(h100, "auto", FAKE_LIBTPU)
    assert compiler == "cpu" and "no h100 compiler" in why
    assert choose_compiler(v5e, "cpu", FAKE_LIBTPU)[0] == "cpu"
    for topo, requested, installed in ((v5e, "tpu", None), (h100, "tpu", FAKE_LIBTPU)):
        with pytest.raises(ValueError, match="dry_run_compiler='tpu'"):
            choose_compiler(topo, requested, installed)
    with pytest.raises(ValueError, match="one of"):
        choose_compiler(v5e, "gpu", FAKE_LIBTPU)


def test_libtpu_is_found_from_tpu_library_path(tmp_path: Path, monkeypatch) -> None:
    lib = tmp_path / "libtpu.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(lib))
    assert libtpu()["path"] == str(lib)


def test_auto_attention_on_gpu_targets_is_compiled_as_the_reference(smollm2_gguf: Path) -> None:
    """2x8xh100 on virtual CPU devices: auto picks pallas_gpu for SmolLM2's packed rows; the
    CPU compiler cannot lower that Triton kernel, so the reference is compiled instead."""
    import ml_collections

    from resofilter_jax.dry_run import _abstract_model

    config = ml_collections.ConfigDict(
        {
            "model": {
                "path": str(smollm2_gguf),
                "dtype": "bfloat16",
                "param_dtype": "float32",
                "attention": "auto",
            }
        }
    )
    target = Target(parse_topology("2x8xh100"), "cpu", "test", [])
    _, model, record = _abstract_model(config, target, packed=True)
    assert record["backend"] == "pallas_gpu" and record["compiled"] == "reference"
    assert model.attention == "reference" and "Triton" in record["not_lowered"]
    _, model, record = _abstract_model(config, target, packed=False)
    assert record["backend"] == "cudnn" and "cuDNN" in record["not_lowered"]


# --------------------------------------------------------------------------- estimate

LLAMA = config_from_hf(
    {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
)


def _model_flops(step: Step) -> float:
    return sum(op.count * op.model_flops for op in step_ops(LLAMA, step))


def test_forward_flops_are_two_per_parameter_and_token_plus_attention() -> None:
    rows, length = 2, 256
    tokens = rows * length
    c = LLAMA
    matmul_params = c.num_hidden_layers * (
        c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        + 3 * c.hidden_size * c.intermediate_size
    ) + (c.vocab_size * c.hidden_size)
    attention = 4 * c.num_attention_heads * c.head_dim * mean_keys(length, None)
    expected = tokens * (2 * matmul_params + c.num_hidden_layers * attention)
    got = _model_flops(Step("ifd", rows, length))
    assert got == pytest.approx(expected, rel=1e-9)
    assert mean_keys(4, None) == 2.5 and mean_keys(4, 2) == 1.75


def test_backward_flops() -> None:
    ifd = _model_flops(Step("ifd", 2, 256))
    assert _model_flops(Step("train", 2, 256)) == pytest.approx(3 * ifd)
    assert _model_flops(Step("train", 2, 256, passes=4)) == pytest.approx(12 * ifd)
    chosen = {"model.layers.1.mlp.up_proj.weight": (128, 64)}
    reso = _model_flops(Step("resonance", 2, 256, chosen=chosen, slots=4))
    assert ifd < reso < 3 * ifd  # backward through the top layer and the head only


def test_peaks_and_the_roofline() -> None:
    assert peak_flops("v5e", "bfloat16", "highest") == 197e12
    assert peak_flops("v5e", "float32", "highest") == pytest.approx(197e12 / 6)
    assert peak_flops("h100", "float32", "default") == 495e12  # TF32
    assert peak_flops("h100", "float32", "highest") == 67e12
    assert peak_flops("cpu", "float32", "default") is None
    step = Step("ifd", 4, 1024, compute_bytes=2, attention="splash")
    fast = estimate(LLAMA, step, "v5e", dtype="bfloat16", precision="default")
    slow = estimate(LLAMA, step, "v5e", dtype="float32", precision="highest")
    assert 0 < fast["mfu"] <= 1 and slow["step_s"] > fast["step_s"]
    assert fast["step_s"] >= fast["model_tflop"] * 1e12 / 197e12
    assert fast["step_s"] >= fast["hbm_gb"] * 1e9 / 819e9
    assert "ESTIMATE" in fast["label"]
    assert estimate(LLAMA, step, "cpu", dtype="float32", precision="default") is None


# --------------------------------------------------------------------------- splash per device


def test_batch_axes() -> None:
    sizes = {"data": 4, "fsdp": 2}
    assert batch_axes(sizes, 8) == ("data", "fsdp")
    assert batch_axes(sizes, 4) == ("data",)
    assert batch_axes(sizes, 2) == ("fsdp",)
    assert batch_axes(sizes, 1) == ()


def test_splash_runs_per_device_under_a_mesh() -> None:
    """splash (interpret mode) under a (data, fsdp) mesh in context runs in a shard_map and
    matches the reference; without a mesh there is no shard_map."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    rng = np.random.default_rng(0)
    b, s, h, kv, d = 8, 40, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32)
    ids = np.ones((b, s), np.int32)
    ids[:, 25:] = 2  # two packed segments
    ids[1::2, 33:] = 0  # padding
    ids = jnp.asarray(ids)

    def attn(backend: str):
        def f(q, k, v, ids):
            out = self_attention(q, k, v, ids, scale=0.25, softcap=20.0, backend=backend)
            return jnp.where(ids[:, :, None, None] > 0, out, 0.0)  # real tokens only

        return f

    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = [jax.device_put(x, sharding) for x in (q, k, v, ids)]
    want = jax.jit(attn("reference"))(*args)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert "shard_map" in str(jax.make_jaxpr(attn("splash"))(*args))
        got = jax.jit(attn("splash"))(*args)
    assert "shard_map" not in str(jax.make_jaxpr(attn("splash"))(*args))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_dry_runs_compile_bf16_matmuls_as_the_accelerator_runs_them(monkeypatch) -> None:
    """On a host CPU without bf16 units bf16 operands are widened to fp32; a dry run compiles
    the target's program (native bf16 operands) and restores the host setting after."""
    from resofilter_jax.dry_run import _target_matmuls
    from resofilter_jax.models import precision

    monkeypatch.setenv("RESOFILTER_CPU_BF16", "0")
    precision._cpu_has_bf16_units.cache_clear()
    try:
        assert not precision.native_low_precision_matmul()
        with _target_matmuls():
            assert precision.native_low_precision_matmul()
        assert not precision.native_low_precision_matmul()
        assert os.environ["RESOFILTER_CPU_BF16"] == "0"
    finally:  # the host's own answer again once monkeypatch restores the environment
        precision._cpu_has_bf16_units.cache_clear()


# --------------------------------------------------------------------------- TPU compiles


@pytest.fixture(scope="module")
def tpu_compiler() -> dict[str, str]:
    """libtpu, or a skip (a failure in CI) saying why the compile tests cannot run."""
    found = libtpu()
    if found is None:
        wheels = sys.platform == "linux" and platform.machine() == "x86_64"
        msg = (
            "libtpu is not installed: `pip install -e '.[test]'` installs it"
            if wheels
            else f"libtpu has no wheels for {sys.platform}/{platform.machine()}"
        )
        if wheels and os.environ.get("RESOFILTER_REQUIRE_ASSETS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def _dry_run(config_name: str, kind: str, **overrides) -> dict:
    """The dry-run report of ``configs/<config_name>`` for a v5e-4 slice (compiled here)."""
    from resofilter_jax.configuration import load_config

    config = load_config(
        REPO / "configs" / config_name,
        {"dry_run": True, "dry_run_topology": "v5e-4"} | overrides,
    )
    config.dry_run_compiler = "tpu"
    if kind == "train":
        from resofilter_jax.training.pipeline import run
    else:
        from resofilter_jax.scoring.pipeline import run
    report = run(config)
    assert jax.default_backend() == "cpu"  # the TPU compiler ran without a TPU backend
    return report


def _check_compiled(report: dict, params_bytes: float) -> None:
    """Compiled by XLA:TPU with splash, and fits in v5e's 16 GiB HBM."""
    assert report["compiler"]["used"] == "tpu"
    assert report["attention"]["requested"] == "auto"
    assert report["attention"]["backend"] == report["attention"]["compiled"] == "splash"
    assert report["mosaic_kernels"] > 0  # splash lowered through Mosaic
    mem = report["per_device_bytes"]
    assert 0.95 * params_bytes < mem["arguments"]
    assert report["fits"] is True and mem["total"] < 16 * 2**30
    assert report["estimate"]["step_s"] > 0


@pytest.mark.slow
def test_ifd_step_compiles_for_v5e(tpu_compiler: dict, smollm2_gguf: Path) -> None:
    """SmolLM2 IFD, bf16, the job's default batch (16 x 1024 rows) on 4 v5e chips; the
    estimate's MFU is at least 40%."""
    report = _dry_run("ifd_smollm2_sharegpt.py", "score", **{"model.dtype": "bfloat16"})
    _check_compiled(report, 4 * report["model"]["params"])  # fp32 parameters, replicated
    assert report["batch"]["global"] == [16, 1024]
    assert report["estimate"]["mfu"] >= 0.4


@pytest.mark.slow
def test_resonance_step_compiles_for_v5e(tpu_compiler: dict, smollm2_gguf: Path) -> None:
    """SmolLM2 resonance (packed rows, bf16): one 768-token row per chip."""
    report = _dry_run(
        "reso_smollm2_gsm8k.py", "score", **{"model.dtype": "bfloat16", "token_budget": 4 * 768}
    )
    _check_compiled(report, 2 * report["model"]["params"])  # bf16 copy of the weights
    assert report["batch"]["global"] == [4, 768] and "examples per row" in report["step"]


@pytest.mark.slow
def test_train_step_compiles_for_v5e(tpu_compiler: dict, smollm2_gguf: Path) -> None:
    """SmolLM2 SFT step (AdamW, bf16 compute, scanned layers), 8 rows of 256 tokens."""
    report = _dry_run(
        "sft_smollm2.py",
        "train",
        **{"model.scan_layers": True, "train.batch_size": 8, "max_length": 256},
    )
    params = report["model"]["params"]
    _check_compiled(report, 12 * params)  # fp32 parameters and two AdamW moments
    assert report["batch"]["global"] == [1, 8, 256]
    assert math.isclose(report["per_device_bytes"]["aliased"], 12 * params, rel_tol=0.05)

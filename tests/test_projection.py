"""Random projections of gradients: the matrix, invariances, inner products, files, cosine mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resofilter_jax.analysis import gradient_cosine
from resofilter_jax.analysis.pipeline import AnalyzeConfig, run
from resofilter_jax.scoring import outputs, projection
from resofilter_jax.scoring.projection import ProjectionSpec, matrix_rows, project

REPO = Path(__file__).resolve().parents[1]
SHAPES = ((6, 10), (37,), (5, 3, 4))  # D = 157: blocks of 16 leave remainders
D = sum(int(np.prod(s)) for s in SHAPES)


def grads(n: int, seed: int = 0) -> list[np.ndarray]:
    """[n, *shape] fp32 per parameter."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, *s)).astype(np.float32) for s in SHAPES]


def flat(gs: list[np.ndarray]) -> np.ndarray:
    """[n, D] float64: the documented order (parameters in order, each row-major)."""
    return np.concatenate([g.reshape(len(g), -1) for g in gs], axis=1).astype(np.float64)


def projector(spec: ProjectionSpec):
    return jax.jit(jax.vmap(lambda *gs: project(list(gs), spec)))


def documented_rows(spec: ProjectionSpec, rows: list[int]) -> np.ndarray:
    """Rows of S [len(rows), K] float64 straight from the module docstring, one key at a time."""
    key = jax.random.key(spec.seed)
    out = np.empty((len(rows), spec.dim))
    for i, r in enumerate(rows):
        k = jax.random.fold_in(key, r)
        if spec.kind == "gaussian":
            out[i] = np.asarray(jax.random.normal(k, (spec.dim,), jnp.float32))
            continue
        words = np.asarray(jax.random.bits(k, (-(-spec.dim // 32),), jnp.uint32))
        bit = [(int(words[c // 32]) >> (c % 32)) & 1 for c in range(spec.dim)]
        out[i] = 1.0 - 2.0 * np.asarray(bit, np.float64)
    return out


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_is_the_documented_matrix_times_the_flat_gradient(kind: str) -> None:
    spec = ProjectionSpec(dim=40, seed=7, kind=kind, block=16)
    gs = grads(3)
    s = np.asarray(matrix_rows(jax.random.key(7), 0, D, spec), np.float64)  # [D, K]
    # Block and parameter edges (blocks of 16 restart at each parameter: 60, 97).
    edges = [0, 1, 15, 16, 59, 60, 61, 76, 96, 97, 98, 156]
    np.testing.assert_array_equal(s[edges], documented_rows(spec, edges))
    if kind == "rademacher":
        assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.05
    else:
        assert abs(s.mean()) < 0.05 and abs(s.std() - 1.0) < 0.05
    want = flat(gs) @ s / np.sqrt(spec.dim)  # [3, K]
    got = np.asarray(projector(spec)(*gs))
    assert got.dtype == np.float32 and got.shape == (3, 40)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_same_example_same_projection_across_batches_blocks_and_devices() -> None:
    spec = ProjectionSpec(dim=24, seed=3, block=16)
    gs = grads(8, seed=1)
    f = projector(spec)
    base = np.asarray(f(*gs))  # [8, K]
    scale = np.abs(base).max()
    alone = np.asarray(f(*(g[5:6] for g in gs)))  # a batch of one
    np.testing.assert_allclose(alone[0], base[5], rtol=0, atol=1e-6 * scale)
    perm = [5, 7, 0, 3, 1, 2, 6, 4]  # other positions and neighbours
    mixed = np.asarray(f(*(g[perm] for g in gs)))
    np.testing.assert_allclose(mixed, base[perm], rtol=0, atol=1e-6 * scale)
    # Block size changes only the summation order (the matrix rows are keyed by row).
    other = np.asarray(projector(ProjectionSpec(dim=24, seed=3, block=5))(*gs))
    np.testing.assert_allclose(other, base, rtol=0, atol=1e-6 * scale)
    # Rows split over 8 devices: every device generates the same matrix.
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = [jax.device_put(g, NamedSharding(mesh, PartitionSpec("data"))) for g in gs]
    on8 = f(*sharded)
    assert len(on8.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(on8), base, rtol=0, atol=1e-6 * scale)
    # Another seed is another matrix.
    changed = np.asarray(projector(ProjectionSpec(dim=24, seed=4, block=16))(*gs))
    assert np.abs(changed - base).max() > 0.1 * scale


def _cosines(x: np.ndarray) -> np.ndarray:
    """Pairwise cosines of the rows of x (upper triangle)."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (u @ u.T)[np.triu_indices(len(x), 1)]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_are_preserved_within_a_k_dependent_tolerance(kind: str) -> None:
    # 16 vectors in 4000 dims with cosines spread over [-0.9, 0.9] (shared components).
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 4000))
    mix = rng.uniform(-1.0, 1.0, (16, 4))
    x = (mix @ base + 0.4 * rng.standard_normal((16, 4000))).astype(np.float32)
    true = _cosines(x.astype(np.float64))
    assert true.min() < -0.5 and true.max() > 0.5
    rms = {}
    for k in (64, 256, 1024):
        spec = ProjectionSpec(dim=k, seed=11, kind=kind)
        p = np.asarray(jax.jit(jax.vmap(lambda v, s=spec: project([v], s)))(x), np.float64)
        err = _cosines(p) - true
        # The error of a projected cosine has std <= sqrt(2 / K); 120 pairs: allow 5 std.
        assert np.abs(err).max() < 5 * np.sqrt(2 / k), (k, np.abs(err).max())
        ratio = np.linalg.norm(p, axis=1) ** 2 / np.linalg.norm(x, axis=1) ** 2
        assert np.abs(ratio - 1).max() < 5 * np.sqrt(2 / k)
        rms[k] = float(np.sqrt(np.mean(err**2)))
    assert rms[1024] < rms[256] < rms[64] and rms[1024] < 0.5 * rms[64]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_inner_products_are_unbiased_over_seeds(kind: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 300))
    x[1] = 0.6 * x[0] + 0.8 * x[1]
    k, seeds = 32, 256
    spec = ProjectionSpec(dim=k, kind=kind)
    keys = jax.vmap(jax.random.key)(jnp.arange(seeds))  # the key of seeds 0..255
    s = jax.jit(jax.vmap(lambda key: matrix_rows(key, 0, 300, spec)))(keys)  # [256, 300, K]
    p = np.einsum("nd,sdk->snk", x, np.asarray(s, np.float64)) / np.sqrt(k)  # [256, 2, K]
    est = np.einsum("sk,sk->s", p[:, 0], p[:, 1])  # [256] one estimate per seed
    want = x[0] @ x[1]
    # Var of one Gaussian estimate: (|x|^2 |y|^2 + <x, y>^2) / K (Rademacher: less).
    sd1 = np.sqrt((x[0] @ x[0] * (x[1] @ x[1]) + want**2) / k)
    assert abs(est.mean() - want) < 4 * sd1 / np.sqrt(seeds)
    assert 0.3 * sd1 < est.std() < 1.3 * sd1  # the seeds really differ, by the expected amount


def test_spec_validation() -> None:
    assert ProjectionSpec(dim=8192).block_rows == 2048
    assert ProjectionSpec(dim=1).block_rows == 8192
    for bad in (dict(dim=0), dict(dim=4, kind="sparse"), dict(dim=4, block=-1)):
        with pytest.raises(ValueError):
            ProjectionSpec(**bad)


# ---- files and the gradient_cosine mode -------------------------------------------------------

PARAMS = {"model.layers.1.mlp.up_proj.weight": (8, 4), "model.layers.2.mlp.up_proj.weight": (8, 4)}
MODEL = {"path": "/m", "size": 123, "dtype": "float32", "param_dtype": "float32"}


def write_run(out: Path, x: np.ndarray, shard: int, **spec_kw) -> Path:
    """A run directory with projection shards of `shard` rows, score shards and the index."""
    params = spec_kw.pop("params", PARAMS)
    spec = ProjectionSpec(**{"dim": x.shape[1], "seed": 5, **spec_kw})
    ranges = outputs.shard_ranges(len(x), shard)
    schema = pa.schema([("index", pa.int64()), ("turn", pa.int64()), ("status", pa.string())])
    for k, (lo, hi) in enumerate(ranges):
        projection.write_shard(out, k, x[lo:hi])
        status = ["ok" if np.isfinite(r).all() else "duplicate_of:0" for r in x[lo:hi]]
        cols = {"index": list(range(lo, hi)), "turn": [0] * (hi - lo), "status": status}
        outputs.write_shard(out, k, cols, schema)
    meta = projection.index_meta(spec, params, MODEL)
    projection.write_index(out, meta, ranges)
    return out


def vectors(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[3] = np.nan  # no gradient
    return x


def test_shards_index_and_loader(tmp_path: Path) -> None:
    x = vectors(10, 6, seed=0)
    out = write_run(tmp_path / "run", x, shard=4)
    index = projection.read_index(out)
    assert [(s["file"], s["start"], s["stop"]) for s in index["shards"]] == [
        ("proj-00000.npy", 0, 4),
        ("proj-00001.npy", 4, 8),
        ("proj-00002.npy", 8, 10),
    ]
    assert index["dim"] == 6 and index["seed"] == 5 and index["kind"] == "rademacher"
    assert index["dtype"] == "float16" and index["grad_dim"] == 64 and index["rows"] == 10
    assert [p["offset"] for p in index["params"]] == [0, 32]
    assert index["prng"]["impl"] == "threefry2x32"
    got = projection.load_projections(out)
    assert got.dtype == np.float16 and got.shape == (10, 6)
    np.testing.assert_array_equal(got, x.astype(np.float16))  # NaN row included
    assert np.isnan(got[3]).all()
    one = write_run(tmp_path / "one", x[:4], shard=8)
    assert isinstance(projection.load_projections(one), np.memmap)
    assert projection.shard_matches(out, 2, 2, 6) and not projection.shard_matches(out, 2, 3, 6)
    projection.projection_path(out, 1).unlink()
    with pytest.raises(FileNotFoundError, match="proj-00001.npy is missing"):
        projection.write_index(out, index, outputs.shard_ranges(10, 4))
    with pytest.raises(FileNotFoundError, match="projection_dim"):
        projection.read_index(tmp_path)


def test_row_specs() -> None:
    np.testing.assert_array_equal(gradient_cosine.parse_rows("0:3, 7,2"), [0, 1, 2, 7])
    for bad in ("", "a", "5:2", "-1", "1:2:3"):
        with pytest.raises(ValueError, match="bad row spec"):
            gradient_cosine.parse_rows(bad)


def less_cosine(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The reference: normalise each target row, average, cosine (float64, NaN rows out)."""
    t = target.astype(np.float64)
    t = t[np.isfinite(t).all(1)]
    mean = (t / np.linalg.norm(t, axis=1, keepdims=True)).mean(0)
    x = x.astype(np.float64)
    return x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))


def test_gradient_cosine_mode_against_a_target_run_and_rows(tmp_path: Path) -> None:
    x, t = vectors(11, 16, seed=1), vectors(5, 16, seed=2)
    x[7] = t[0] * 3.0  # points along a target row
    a = write_run(tmp_path / "a", x, shard=4)
    b = write_run(tmp_path / "b", t, shard=2)
    rep = run(
        AnalyzeConfig(a=str(a), out=str(tmp_path / "r"), mode="gradient_cosine", target=str(b))
    )
    table = pq.read_table(tmp_path / "r" / "cosine.parquet")
    assert table.column_names == ["index", "status", "cosine"]  # no turn: all 0
    want = less_cosine(x.astype(np.float16), t.astype(np.float16))
    got = table.column("cosine").to_numpy()
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-12)
    assert np.isnan(got[3]) and table.column("status").to_pylist()[3] == "duplicate_of:0"
    assert rep["target"]["used"] == 4 and rep["target"]["skipped"] == 1
    assert rep["rows_with_cosine"] == 10 and rep["top"][0]["index"] == int(np.nanargmax(want))
    assert json.loads((tmp_path / "r" / "report.json").read_text())["rows"] == 11
    assert "Gradient cosine" in (tmp_path / "r" / "report.md").read_text()
    # Target = rows of A by index.
    run(
        AnalyzeConfig(
            a=str(a), out=str(tmp_path / "s"), mode="gradient_cosine", target="rows:0:3,9"
        )
    )
    got = pq.read_table(tmp_path / "s" / "cosine.parquet").column("cosine").to_numpy()
    want = less_cosine(x.astype(np.float16), x[[0, 1, 2, 9]].astype(np.float16))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-12)
    with pytest.raises(ValueError, match=r"target rows \[11\] are not in"):
        run(
            AnalyzeConfig(
                a=str(a), out=str(tmp_path / "u"), mode="gradient_cosine", target="rows:11"
            )
        )
    with pytest.raises(ValueError, match="needs --target"):
        run(AnalyzeConfig(a=str(a), out=str(tmp_path / "u"), mode="gradient_cosine"))
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (dict(seed=6), "seed: 5 vs 6"),
        (dict(kind="gaussian"), "kind: 'rademacher' vs 'gaussian'"),
        (dict(params={"model.layers.1.mlp.up_proj.weight": (8, 4)}), "params:"),
    ],
)
def test_mismatched_projections_are_refused(tmp_path: Path, changed: dict, message: str) -> None:
    a = write_run(tmp_path / "a", vectors(6, 8, seed=1), shard=4)
    b = write_run(tmp_path / "b", vectors(6, 8, seed=2), shard=4, **changed)
    with pytest.raises(ValueError, match=f"not comparable.*{message}"):
        gradient_cosine.gradient_cosine(a, str(b))
    c = write_run(tmp_path / "c", vectors(6, 4, seed=2), shard=4)
    with pytest.raises(ValueError, match="K: 8 vs 4"):
        gradient_cosine.gradient_cosine(a, str(c))


def test_cli_gradient_cosine(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", vectors(6, 8, seed=1), shard=4)
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "resofilter_jax.analyze", "--mode=gradient_cosine"]
    cmd += [f"--a={a}", f"--target={a / 'projections'}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mode"] == "gradient_cosine"
    assert pq.read_table(out / "cosine.parquet").num_rows == 6

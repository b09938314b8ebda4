"""Random projections of per-example gradients (gradient features, as LESS / TRAK use them).

**Definition.** An example's gradient ``g`` [D] is the concatenation, in ``spec.params`` order
(the order of the ``reso/<param>/...`` columns), of the fp32 gradients of the chosen matrices,
each flattened row-major in the checkpoint's layout (torch's: ``nn.Linear.weight`` is
[out, in], GPT-2's ``Conv1D`` [in, out]; names and shapes are in the index). Its
projection is ``p = g @ S / sqrt(K)`` with ``S`` [D, K] defined row by row from the key
``k_r = fold_in(key(seed), r)`` of global row ``r``:

* ``rademacher`` (default): ``w = jax.random.bits(k_r, (ceil(K / 32),), uint32)``;
  ``S[r, c] = -1`` if bit ``c % 32`` of ``w[c // 32]`` is set, else ``+1``.
* ``gaussian``: ``S[r] = jax.random.normal(k_r, (K,), float32)``.

Entries are independent with mean 0 and variance 1, so ``E[<p(x), p(y)>] = <x, y>``. A row
depends only on (seed, r, K, kind) and the PRNG implementation (recorded in the index): never
on the batch, the microbatch, the devices or the block size below.

**Computation.** ``S`` is never materialised. Inside the jitted step, for every example of the
microbatch at once (``vmap``; packed rows: every slot), a loop over blocks of ``B`` rows of each
matrix generates that block's rows of ``S`` once and accumulates ``g_block @ S_block`` in fp32
(``Precision.HIGHEST``: no TF32 on GPUs). Per device: one block, about ``3 * B * K * 4``
bytes, shared by a microbatch, plus ``K`` fp32 per example; per microbatch step
``D * K / 32`` random words (rademacher) or ``D * K`` normals, and ``2 * D * K`` flops per
example. ``B`` defaults to ``min(8192, 2**24 // K)`` rows (a 64 MiB fp32 block); it changes
only the fp32 summation order.

**Files** (written by :mod:`resofilter_jax.scoring.reso_runner`)::

    OUTPUT_DIR/projections/proj-00000.npy ...  float16 [rows of shard k, K], the shard's rows
                                              in input order; NaN rows: no gradient
    OUTPUT_DIR/projections/index.json         K, seed, kind, params + shapes, PRNG, model,
                                              dtype, shard files and their row ranges

A shard's ``.npy`` is written (atomically) just before its score shard, so a score shard never
exists without its projection; ``index.json`` is written when every shard is done. The
cosine analysis over these files is :mod:`resofilter_jax.analysis.gradient_cosine`.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resofilter_jax.data.sealed import read_sealed, write_sealed
from resofilter_jax.scoring.outputs import write_json

Array = jax.Array

KINDS = ("rademacher", "gaussian")
PROJ_DIR = "projections"
INDEX = "index.json"
FORMAT = 1
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ProjectionSpec:
    """Which random projection of the per-example gradients to compute.

    Attributes:
        dim: K, the projected dimension (>= 1).
        seed: Seed of the projection matrix.
        kind: ``rademacher`` (+-1 / sqrt(K)) or ``gaussian`` (N(0, 1 / K)).
        block: Rows of S generated at once; 0 = ``min(8192, 2**24 // dim)``.
    """

    dim: int
    seed: int = 0
    kind: str = "rademacher"
    block: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"projection dim must be >= 1, got {self.dim}")
        if self.kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, got {self.kind!r}")
        if self.block < 0:
            raise ValueError(f"projection block must be >= 0, got {self.block}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"projection seed must be in [0, 2**32), got {self.seed}")

    @property
    def block_rows(self) -> int:
        """B: rows of S per loop step."""
        return self.block or min(8192, max(1, 2**24 // self.dim))

    def fixed_bytes(self) -> int:
        """Device bytes of one generated block (signs or normals, random words, product)."""
        return 3 * self.block_rows * self.dim * 4

    def example_bytes(self) -> int:
        """Device bytes per example (accumulator and output)."""
        return 2 * 4 * self.dim


def matrix_rows(key: Array, start: Array | int, n: int, spec: ProjectionSpec) -> Array:
    """Rows ``start .. start + n - 1`` of S (unscaled): [n, K] fp32."""
    rows = jnp.asarray(start, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)  # [n]
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)  # [n] keys
    if spec.kind == "gaussian":
        return jax.vmap(lambda k: jax.random.normal(k, (spec.dim,), jnp.float32))(keys)
    words = -(-spec.dim // 32)
    bits = jax.vmap(lambda k: jax.random.bits(k, (words,), jnp.uint32))(keys)  # [n, W]
    set_ = (bits[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [n, W, 32]
    set_ = set_.reshape(n, words * 32)[:, : spec.dim]  # [n, K]
    return 1.0 - 2.0 * set_.astype(jnp.float32)


def project(grads: Sequence[Array], spec: ProjectionSpec) -> Array:
    """[K] fp32 projection of one example's gradients (in the documented order).

    Vectorise with ``jax.vmap``: S depends on no batched value, so each block is generated
    once per call and multiplies all examples at once.
    """
    key = jax.random.key(spec.seed)
    total = sum(math.prod(g.shape) for g in grads)
    if total >= 2**32:
        raise ValueError(f"{total} gradient elements: the projection supports < 2**32")
    acc = jnp.zeros((spec.dim,), jnp.float32)  # [K]
    hi = jax.lax.Precision.HIGHEST
    offset = 0
    for g in grads:
        flat = g.reshape(-1).astype(jnp.float32)  # [n]
        n = flat.shape[0]
        b = min(spec.block_rows, n)
        full, rem = divmod(n, b)

        def body(
            i: Array, acc: Array, flat: Array = flat, offset: int = offset, b: int = b
        ) -> Array:
            x = jax.lax.dynamic_slice(flat, (i * b,), (b,))  # [b]
            s = matrix_rows(key, offset + i.astype(jnp.uint32) * b, b, spec)  # [b, K]
            return acc + jnp.dot(x, s, precision=hi)

        acc = jax.lax.fori_loop(0, full, body, acc)
        if rem:
            s = matrix_rows(key, offset + full * b, rem, spec)  # [rem, K]
            acc = acc + jnp.dot(flat[full * b :], s, precision=hi)
        offset += n
    return acc / math.sqrt(spec.dim)


# ---- files ------------------------------------------------------------------------------------


def shard_file(k: int) -> str:
    """``proj-{k:05d}.npy``."""
    return f"proj-{k:05d}.npy"


def projection_path(out_dir: str | os.PathLike[str], k: int) -> Path:
    """``OUT/projections/proj-{k:05d}.npy``."""
    return Path(out_dir) / PROJ_DIR / shard_file(k)


def write_shard(
    out_dir: str | os.PathLike[str],
    k: int,
    proj: np.ndarray,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Writes shard ``k``'s projections ([rows, K], any float) as float16, atomically, sealed
    with ``meta`` (``outputs.shard_meta``; :mod:`resofilter_jax.data.sealed`)."""
    x = np.asarray(proj, np.float32)
    finite = np.isfinite(x)
    overflow = int(np.sum(finite & (np.abs(x) > _FP16_MAX)))
    if overflow:
        warnings.warn(
            f"projection shard {k}: {overflow} values exceed the float16 range and are stored "
            "as inf (gradients this large suggest a broken example or loss)",
            stacklevel=2,
        )
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float16), allow_pickle=False)
    return write_sealed(projection_path(out_dir, k), buf.getvalue(), meta or {})


def shard_matches(
    out_dir: str | os.PathLike[str],
    k: int,
    rows: int,
    dim: int,
    expect: Mapping[str, Any] | None = None,
) -> bool:
    """Whether shard ``k``'s file is complete, intact and sealed with ``expect`` (None: any
    run), as float16 [rows, dim]."""
    data, _ = read_sealed(projection_path(out_dir, k), expect or {})
    if data is None:
        return False
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError):
        return False
    return x.dtype == np.float16 and x.shape == (rows, dim)


def prng_info() -> dict[str, Any]:
    """The PRNG settings the projection matrix depends on."""
    return {
        "impl": str(jax.config.jax_default_prng_impl),
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }


def index_meta(
    spec: ProjectionSpec, params: Mapping[str, Sequence[int]], model: Mapping[str, Any]
) -> dict[str, Any]:
    """What defines the projection: K, seed, kind, parameters (in order) with shapes, PRNG."""
    plist, offset = [], 0
    for name, shape in params.items():
        size = math.prod(shape)
        plist.append({"name": name, "shape": list(shape), "offset": offset, "size": size})
        offset += size
    return {
        "format": FORMAT,
        "dim": spec.dim,
        "seed": spec.seed,
        "kind": spec.kind,
        "block_rows": spec.block_rows,
        "params": plist,
        "grad_dim": offset,
        "order": "params in this order, each flattened row-major (C order) in the listed shape",
        "prng": prng_info(),
        "model": dict(model),
        "compute_dtype": "float32",
        "dtype": "float16",
    }


def write_index(
    out_dir: str | os.PathLike[str], meta: Mapping[str, Any], ranges: Sequence[tuple[int, int]]
) -> Path:
    """Writes ``index.json`` for shards covering ``ranges``; removes files of other shards.

    Raises:
        FileNotFoundError: If a shard's file is missing or has the wrong shape / dtype.
    """
    d = Path(out_dir) / PROJ_DIR
    shards = [{"file": shard_file(k), "start": lo, "stop": hi} for k, (lo, hi) in enumerate(ranges)]
    for k, s in enumerate(shards):
        if not shard_matches(out_dir, k, s["stop"] - s["start"], meta["dim"]):
            raise FileNotFoundError(f"projection shard {d / s['file']} is missing or malformed")
    keep = {s["file"] for s in shards}
    for f in [*d.glob("proj-*.npy"), *d.glob(".proj-*.tmp")]:  # other runs', killed writes
        if f.name not in keep:
            f.unlink()
    path = d / INDEX
    write_json(path, {**meta, "rows": ranges[-1][1] if ranges else 0, "shards": shards})
    return path


def _projection_dir(path: str | os.PathLike[str]) -> Path:
    """A run's output directory or its ``projections`` directory -> the latter."""
    p = Path(path)
    if (p / PROJ_DIR / INDEX).is_file():
        return p / PROJ_DIR
    if (p / INDEX).is_file():
        return p
    raise FileNotFoundError(
        f"{p} holds no {PROJ_DIR}/{INDEX}: score it with --config.features.projection_dim=K "
        "(and let the run finish)"
    )


def read_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a run's projections (``path``: the output dir or its projections dir)."""
    d = _projection_dir(path)
    index = json.loads((d / INDEX).read_text())
    index["dir"] = str(d)
    return index


def iter_shards(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, rows)`` per shard; rows: a read-only float16 memmap [stop - start, K]."""
    index = read_index(path)
    for s in index["shards"]:
        x = np.load(Path(index["dir"]) / s["file"], mmap_mode="r", allow_pickle=False)
        if x.shape != (s["stop"] - s["start"], index["dim"]):
            raise ValueError(f"{s['file']} has shape {x.shape}, the index says otherwise")
        yield s["start"], s["stop"], x


def load_projections(output_dir: str | os.PathLike[str]) -> np.ndarray:
    """All projections, [n, K] float16, rows in input order (NaN rows: no gradient).

    A single shard comes back memory-mapped (read-only); several are concatenated in memory
    (use :func:`iter_shards` to stream large runs shard by shard).
    """
    index = read_index(output_dir)
    parts = [x for _, _, x in iter_shards(index["dir"])]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros((0, index["dim"]), np.float16)
    return np.concatenate(parts)


_MODEL_KEYS = ("size", "dtype", "param_dtype")


def check_compatible(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Raises unless two indexes project the same gradients with the same matrix.

    Compared: K, seed, kind, parameter names and shapes, PRNG settings, and the model's size
    and dtypes (not its path or mtime).

    Raises:
        ValueError: Naming every setting that differs.
    """

    def key(index: Mapping[str, Any]) -> dict[str, Any]:
        model = index.get("model", {})
        return {
            "K": index["dim"],
            "seed": index["seed"],
            "kind": index["kind"],
            "params": [(p["name"], list(p["shape"])) for p in index["params"]],
            "prng": index.get("prng"),
            **{f"model.{k}": model.get(k) for k in _MODEL_KEYS},
        }

    ka, kb = key(a), key(b)
    diff = [f"{k}: {ka[k]!r} vs {kb[k]!r}" for k in ka if ka[k] != kb[k]]
    if diff:
        raise ValueError(
            f"projections in {a.get('dir', 'A')} and {b.get('dir', 'B')} are not comparable "
            f"(score both with the same model, parameters, projection_dim and projection_seed); "
            f"differing: {'; '.join(diff)}"
        )

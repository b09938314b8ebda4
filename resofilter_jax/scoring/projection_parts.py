"""Projection files of multi-process resonance jobs: one part per process, merged by process 0.

Process p of an n-process job writes its rows of shard k to
``projections/parts/p{p}of{n}/projections/proj-{k:05d}.npy`` (the single-process writer and
checker of :mod:`resofilter_jax.scoring.projection`, rooted at the part directory), before
its score part. Process 0 concatenates a shard's complete set of parts (rows in process order,
float16 kept exactly) into the ordinary ``projections/proj-{k:05d}.npy``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.data import host_slice
from resofilter_jax.scoring import outputs, projection

PARTS = "parts"
_ROOT = re.compile(r"^p(\d+)of(\d+)$")


def part_root(out_dir: str | os.PathLike[str], part: tuple[int, int]) -> Path:
    """The directory process ``part[0]`` of ``part[1]`` writes its projection files under."""
    p, n = part
    return Path(out_dir) / projection.PROJ_DIR / PARTS / f"p{p}of{n}"


def write_part(
    out_dir: str | os.PathLike[str],
    k: int,
    proj: np.ndarray,
    part: tuple[int, int],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Writes this process's rows [r, K] of shard ``k``'s projections (float16, atomic),
    sealed with ``meta``."""
    return projection.write_shard(part_root(out_dir, part), k, proj, meta)


def merge_parts(
    out_dir: str | os.PathLike[str],
    ranges: Sequence[tuple[int, int]],
    dim: int,
    run: str | None = None,
) -> list[int]:
    """Merges every complete, valid set of parts into its shard's file; returns those shards.

    With ``run`` (``outputs.run_hash``), parts and merged files count only when this run
    sealed them for their rows. The parts directory is removed once every shard has a valid
    merged file.
    """

    def expect(k: int, part: tuple[int, int]) -> dict[str, Any] | None:
        return None if run is None else outputs.shard_meta(run, k, *ranges[k], part)

    parts_dir = Path(out_dir) / projection.PROJ_DIR / PARTS
    if not parts_dir.is_dir():
        return []
    counts = sorted({int(m[2]) for d in os.listdir(parts_dir) if (m := _ROOT.match(d))})
    merged = []
    for k, (lo, hi) in enumerate(ranges):
        if projection.shard_matches(out_dir, k, hi - lo, dim, expect(k, (0, 1))):
            continue
        for n in counts:
            roots = [part_root(out_dir, (p, n)) for p in range(n)]
            sizes = [len(host_slice(range(lo, hi), p, n)) for p in range(n)]
            if all(
                projection.shard_matches(r, k, s, dim, expect(k, (p, n)))
                for p, (r, s) in enumerate(zip(roots, sizes, strict=True))
            ):
                rows = [np.load(projection.projection_path(r, k)) for r in roots]  # [r_p, K]
                whole = np.concatenate(rows).astype(np.float32)
                projection.write_shard(out_dir, k, whole, expect(k, (0, 1)))
                merged.append(k)
                break
    if all(
        projection.shard_matches(out_dir, k, hi - lo, dim, expect(k, (0, 1)))
        for k, (lo, hi) in enumerate(ranges)
    ):
        shutil.rmtree(parts_dir, ignore_errors=True)
    return merged

"""Embeddings cached next to a score file: ``<scores dir>/embeddings/<kind>-<key>.npy``.

Each array (float32 [rows, hidden], ``.npy``) has a JSON sidecar ``<kind>-<key>.json`` with
the settings that made it (model and its file stamp, dtype, pooling, max_length, template,
the rows' fingerprint) and its shape; ``<key>`` is a hash of those settings. An array is
reused when its sidecar holds exactly the settings asked for and the array has the recorded
shape; other settings give another key, so another file (older files stay, for a switch
back). The array is filled in place through a memory map of a temporary file that replaces
the final name when complete (:func:`resofilter_jax.data.atomic.atomic_path`), then the
sidecar is written (atomically): a killed run leaves no file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.data.atomic import atomic_path, atomic_write_bytes

__all__ = ["CACHE_DIR", "EmbeddingCache", "settings_key"]

CACHE_DIR = "embeddings"


def settings_key(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the settings as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EmbeddingCache:
    """The embedding arrays of one score file's directory."""

    def __init__(self, scores: str | os.PathLike[str]) -> None:
        self.folder = Path(scores).parent / CACHE_DIR

    def paths(self, kind: str, settings: Mapping[str, Any]) -> tuple[Path, Path]:
        """``(array, sidecar)`` paths of ``kind`` (``candidates`` / ``targets``) made with
        ``settings``."""
        stem = f"{kind}-{settings_key(settings)}"
        return self.folder / f"{stem}.npy", self.folder / f"{stem}.json"

    def load(self, kind: str, settings: Mapping[str, Any]) -> np.ndarray | None:
        """The cached array (read-only memory map), or None when there is no valid one."""
        array, sidecar = self.paths(kind, settings)
        if not (array.is_file() and sidecar.is_file()):
            return None
        try:
            meta = json.loads(sidecar.read_text())
            x = np.load(array, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        same = json.loads(json.dumps(dict(settings), default=str)) == meta.get("settings")
        if not same or list(x.shape) != meta.get("shape") or x.dtype != np.float32:
            return None
        return x

    def store(
        self,
        kind: str,
        settings: Mapping[str, Any],
        shape: tuple[int, int],
        fill: Callable[[np.ndarray], None],
    ) -> np.ndarray:
        """Creates the array of ``kind``: ``fill(out)`` writes every row of the float32
        ``out`` [shape]; returns the stored array (read-only memory map).

        Raises:
            ValueError: For an empty array (nothing to embed).
        """
        if shape[0] == 0:
            raise ValueError(f"no {kind} to embed")
        array, sidecar = self.paths(kind, settings)
        with atomic_path(array) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            fill(out)
            out.flush()
            del out
        meta = {"kind": kind, "shape": list(shape), "dtype": "float32", "settings": settings}
        atomic_write_bytes(sidecar, json.dumps(meta, indent=1, default=str).encode())
        loaded = self.load(kind, settings)
        if loaded is None:  # written just now: another process replaced or removed it
            raise RuntimeError(f"the {kind} embeddings just written to {array} cannot be read back")
        return loaded

"""Sealed files: a finished file plus a small record of what it is and its checksum.

A run that resumes must trust only files it can prove complete and its own. Each sealed file
``F`` gets ``F.seal.json`` written (atomically) after ``F`` itself: its size, its SHA-256 and
the writer's metadata (the run's fingerprint hash, the shard number, the row range, ...).
:func:`check_sealed` then says why a file cannot be used: missing, never sealed (the writer
died between the two writes, or an older version wrote it), truncated, corrupted (checksum),
or foreign (metadata of another run or another row range).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resofilter_jax.data.atomic import atomic_write_bytes

SEAL_SUFFIX = ".seal.json"


def seal_path(path: str | os.PathLike[str]) -> Path:
    """``F`` -> ``F.seal.json``."""
    p = Path(path)
    return p.with_name(p.name + SEAL_SUFFIX)


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a fingerprint's canonical JSON."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_sealed(path: str | os.PathLike[str], data: bytes, meta: Mapping[str, Any]) -> Path:
    """Writes ``data`` to ``path`` atomically, then its seal (size, SHA-256, ``meta``).

    When the seal cannot be written (an exception, e.g. a full disk or a second Ctrl-C), the
    data file is removed again; only a SIGKILL between the two writes leaves an unsealed
    file, which :func:`check_sealed` never accepts.
    """
    p = Path(path)
    seal_path(p).unlink(missing_ok=True)  # an old seal never vouches for new bytes
    atomic_write_bytes(p, data)
    seal = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **meta}
    try:
        atomic_write_bytes(seal_path(p), json.dumps(seal, sort_keys=True).encode())
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    return p


def read_sealed(
    path: str | os.PathLike[str], expect: Mapping[str, Any]
) -> tuple[bytes | None, str]:
    """(the file's bytes, "") when ``path`` is complete, intact and sealed with ``expect``;
    else (None, the reason)."""
    p = Path(path)
    if not p.is_file():
        return None, "missing"
    try:
        seal = json.loads(seal_path(p).read_text())
    except FileNotFoundError:
        return None, "not sealed (its writer stopped before finishing it, or it is foreign)"
    except (OSError, ValueError) as e:
        return None, f"unreadable seal ({e})"
    data = p.read_bytes()
    if len(data) != seal.get("bytes"):
        return None, f"truncated or extended: {len(data)} bytes, sealed with {seal.get('bytes')}"
    if hashlib.sha256(data).hexdigest() != seal.get("sha256"):
        return None, "corrupted: its SHA-256 differs from the one it was sealed with"
    for key, want in expect.items():
        got = seal.get(key)
        if json.loads(json.dumps(got)) != json.loads(json.dumps(want)):
            return None, f"foreign: sealed with {key}={got!r}, this run expects {want!r}"
    return data, ""


def check_sealed(path: str | os.PathLike[str], expect: Mapping[str, Any]) -> str:
    """ "" when ``path`` is usable (see :func:`read_sealed`), else why not."""
    return read_sealed(path, expect)[1]


def remove_sealed(path: str | os.PathLike[str]) -> None:
    """Removes a file and its seal (either may be missing)."""
    Path(path).unlink(missing_ok=True)
    seal_path(path).unlink(missing_ok=True)


__all__ = [
    "SEAL_SUFFIX",
    "check_sealed",
    "fingerprint_hash",
    "read_sealed",
    "remove_sealed",
    "seal_path",
    "write_sealed",
]

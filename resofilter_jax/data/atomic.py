"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

A write that runs out of space (ENOSPC, or EDQUOT on a quota) raises :class:`DiskFullError`
naming the path, the bytes the write needed (or had written when it failed) and the space
left; its temporary file is removed, so nothing partial is left behind. The training side
(orbax checkpoints, metrics, export) raises the same error through :func:`is_disk_full` and
:func:`disk_full_error`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_FULL = (errno.ENOSPC, errno.EDQUOT)
# How ENOSPC / EDQUOT reads in errors that are not OSErrors with an errno (pyarrow,
# tensorstore under orbax, Rust writers).
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


class DiskFullError(OSError):
    """A write ran out of space on its filesystem (the message says where and how much)."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is ENOSPC / EDQUOT."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if any(text in str(e) for text in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for the free space)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def disk_full_error(
    path: Path,
    needed: int,
    cause: BaseException,
    *,
    how: str = "",
    resume: str = "where it stopped",
) -> DiskFullError:
    """The error of a write to ``path`` that found the disk full.

    ``how``: "" (``needed`` is exact), ``"about"`` (an estimate) or ``"more than"`` (the bytes
    written when it failed); ``resume``: where a re-run starts again.
    """
    try:
        free = f"{shutil.disk_usage(_existing(Path(path))).free:,}"
    except OSError:
        free = "?"
    need = f"{how} {needed:,} bytes" if how else f"{needed:,} bytes"
    errno_ = cause.errno if isinstance(cause, OSError) and cause.errno else errno.ENOSPC
    return DiskFullError(
        errno_,
        f"no space left to write {path}: it needs {need} and the filesystem has {free} bytes "
        "free; free some space (or choose another directory) and run the same command again: "
        f"it resumes {resume}",
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, len(data), e) from e
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write in any way; it replaces ``path`` (fsynced)
    when the block ends without an exception, and is removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, written, e, how="more than") from e
        raise


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Writes a Parquet file atomically."""
    atomic_write_bytes(path, table_bytes(table))

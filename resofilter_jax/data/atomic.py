"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

A write that runs out of space (ENOSPC, or EDQUOT on a quota) raises :class:`DiskFullError`
naming the path, the bytes the write needed (or had written when it failed) and the space
left; its temporary file is removed, so nothing partial is left behind.
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


class DiskFullError(OSError):
    """A write ran out of space on its filesystem (the message says where and how much)."""


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _disk_full(path: Path, needed: int, exact: bool, cause: OSError) -> DiskFullError:
    need = f"{needed:,} bytes" if exact else f"more than the {needed:,} bytes written so far"
    return DiskFullError(
        cause.errno,
        f"no space left to write {path}: it needed {need} and the filesystem has "
        f"{_free_bytes(path.parent):,} bytes free; free some space (or choose another "
        "directory) and run the same command again: it resumes where it stopped",
    )


def _is_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when pyarrow reports it as an OSError with the text only."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    return isinstance(e, OSError | pa.ArrowException) and "No space left on device" in str(e)


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
        if _is_full(e):
            raise _disk_full(path, len(data), True, e) from e
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
        if _is_full(e):
            raise _disk_full(path, written, False, e) from e
        raise


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Writes a Parquet file atomically."""
    atomic_write_bytes(path, table_bytes(table))

"""Fault-injection helpers shared by the fault tests: a small real filesystem (a tmpfs) to
fill up, resized when space is "freed"."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PAGE = 4096  # tmpfs allocates whole pages


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (skips the test when it cannot mount)."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux (CI runs the tests as root)")
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if got.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size_bytes: int) -> None:
    """Changes the size of the tmpfs mounted at ``path``."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)


def pages(path: Path) -> int:
    """Bytes that the files under ``path`` (or the file ``path``) take on a tmpfs."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)

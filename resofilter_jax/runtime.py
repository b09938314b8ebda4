"""Process set-up shared by the commands: allocator, compilation cache, versions.

Host allocator (Linux, glibc): XLA on CPU allocates its large temporaries (activations, a
chunk of logits) with ``malloc`` on every call. glibc serves blocks above 32 MiB, and blocks
of its per-thread arenas, with fresh ``mmap`` pages and gives them back on ``free``, so
every call page-faults through hundreds of MiB again. Measured on the 2-core CI VM:
``sum(exp(x))`` over [1024, 49152] fp32 went from 266 ms to 62 ms, and the whole SmolLM2
forward + loss at 8 x 1024 tokens from 27.5-28.8 s to 22.8 s, once freed memory stays in the
process (one arena, no ``mmap``, no trimming). The cost is that the process keeps its peak
heap until it exits, which suits a batch job. Set ``RESOFILTER_MALLOC_TUNING=0`` to leave
the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
import sys
import threading
from pathlib import Path

# Packages whose versions every run.json records (absent ones are reported as "absent").
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "tokenizers",
    "numpy",
    "pyarrow",
)

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keeps freed heap memory in the process; True when the settings were applied.

    Call it early (before JAX starts its thread pools), once per process; later calls return
    the first result. A no-op off Linux/glibc or with ``RESOFILTER_MALLOC_TUNING=0``.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("RESOFILTER_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave it alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX))
    _tuned = all(mallopt(param, value) == 1 for param, value in settings)
    return _tuned


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` ("" = off)."""
    if path:
        import jax

        cache = Path(path).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python and package versions, for the ``versions`` entry of run.json."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # every executable built
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"  # XLA compiles (cache misses)
_compile_counts = [0, 0]  # [executables built, XLA backend compiles] in this process
_listening = threading.Lock()
_registered = [False]


def _count_compile(event: str, duration: float, **kw: object) -> None:
    del duration, kw
    if event == _LOWER_EVENT:
        _compile_counts[0] += 1
    elif event == _BACKEND_EVENT:
        _compile_counts[1] += 1


def compile_counts() -> tuple[int, int]:
    """(executables built, XLA backend compilations) so far in this process.

    Counted from JAX's monitoring events: every jit specialisation that is lowered counts as
    built; it is compiled by XLA unless the persistent compilation cache has it. The first
    call registers the listener (earlier compilations are not counted).
    """
    with _listening:
        if not _registered[0]:
            import jax

            jax.monitoring.register_event_duration_secs_listener(_count_compile)
            _registered[0] = True
    return _compile_counts[0], _compile_counts[1]

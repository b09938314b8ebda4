"""Dry-run targets: chips, topology names, and the devices a dry run compiles for.

A target is named ``HOSTSxDEVICESxCHIP`` (``2x8xh100``, ``4x4xv5e``), by a TPU slice name
(``v5e-32``, ``v4-32``), by ``SLICESx`` and a slice name for a multi-slice TPU job
(``2xv5e-16``: two v5e-16 slices joined over the data-center network), or by a TPU chip grid
(``v5p:4x4x12``, ``v5e:4x8``) for slice shapes that are not a power of two.

TPU targets compile with the real XLA:TPU compiler when libtpu is installed
(``pip install resofilter_jax[tpu]``): ``jax.experimental.topologies.get_topology_desc``
gives compile-only TPU devices on a host without TPUs. Other targets (GPUs), and TPU targets
without libtpu, compile on virtual CPU devices (one per target device).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

GIB = 1024**3
COMPILERS = ("auto", "tpu", "cpu")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: memory, devices per host in multi-host jobs, public peak figures.

    ``bf16_flops`` is the dense bf16 matmul peak per device (TPU v4/v5p: one megacore device
    per chip); ``fp32_flops`` (GPUs) maps ``model.matmul_precision`` to the peak for fp32
    operands (TF32 for default/high, plain fp32 for highest). TPUs run fp32 operands as 1, 3
    or 6 bf16 passes (``TPU_FP32_PASSES``).
    """

    platform: str  # tpu | gpu | cpu
    memory_gib: float | None
    per_host: int
    bf16_flops: float | None = None
    hbm_bytes_s: float | None = None
    fp32_flops: dict[str, float] = dataclasses.field(default_factory=dict)


def _gpu_fp32(tf32: float, fp32: float) -> dict[str, float]:
    return {"default": tf32, "high": tf32, "highest": fp32}


# Vendor data sheets (dense, no sparsity): TFLOP/s, HBM GB/s.
CHIPS: dict[str, Chip] = {
    "cpu": Chip("cpu", None, 8),
    "v4": Chip("tpu", 32.0, 4, 275e12, 1228e9),
    "v5e": Chip("tpu", 16.0, 4, 197e12, 819e9),
    "v5p": Chip("tpu", 95.0, 4, 459e12, 2765e9),
    "v6e": Chip("tpu", 32.0, 4, 918e12, 1640e9),
    "a100": Chip("gpu", 80.0, 8, 312e12, 2039e9, _gpu_fp32(156e12, 19.5e12)),
    "a100-40": Chip("gpu", 40.0, 8, 312e12, 1555e9, _gpu_fp32(156e12, 19.5e12)),
    "h100": Chip("gpu", 80.0, 8, 989e12, 3350e9, _gpu_fp32(495e12, 67e12)),
    "h200": Chip("gpu", 141.0, 8, 989e12, 4800e9, _gpu_fp32(495e12, 67e12)),
    "l4": Chip("gpu", 24.0, 8, 121e12, 300e9, _gpu_fp32(60e12, 30e12)),
}
TPU_FP32_PASSES = {"default": 1, "high": 3, "highest": 6}

# TPU chip -> (get_topology_desc name prefix, chip config, grid dimensions).
TPU_GRID: dict[str, tuple[str, str, int]] = {
    "v4": ("v4", "megacore", 3),
    "v5p": ("v5p", "megacore", 3),
    "v5e": ("v5e", "default", 2),
    "v6e": ("v6e", "default", 2),
}
# Devices per host -> chips_per_host_bounds (the host's chip block within the grid).
HOST_BOUNDS = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 4, 1)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A target job: ``hosts`` processes with ``per_host`` devices of ``chip`` each, in
    ``slices`` TPU slices (hosts and devices count all slices); ``grid`` is an explicit TPU
    chip grid of one slice, or None (derived from the chip count)."""

    name: str
    chip: str
    hosts: int
    per_host: int
    slices: int = 1
    grid: tuple[int, ...] | None = None

    @property
    def devices(self) -> int:
        return self.hosts * self.per_host

    @property
    def memory_gib(self) -> float | None:
        return CHIPS[self.chip].memory_gib

    @property
    def platform(self) -> str:
        return CHIPS[self.chip].platform


def _tpu_slice(name: str, chip: str, chips: int, slices: int, grid: Any = None) -> Topology:
    if chips < 1:
        raise ValueError(f"topology {name!r} has no chips")
    if chip in ("v5e", "v6e") and chips <= 8:
        per, hosts = chips, 1
    else:
        per = min(4, chips)
        if chips % per:
            raise ValueError(f"topology {name!r}: {chips} chips do not fill hosts of {per}")
        hosts = chips // per
    return Topology(name, chip, hosts * slices, per, slices, grid)


def parse_topology(name: str) -> Topology:
    """A topology from ``HOSTSxDEVICESxCHIP`` (``2x8xh100``), a TPU slice name with an
    optional ``SLICESx`` prefix (``v5e-32``, ``2xv5e-16``) or a TPU grid (``v5p:2x2x4``).

    TPU slice names: ``v4-N`` and ``v5p-N`` count TensorCores (2 per chip, one megacore
    device), ``v5e-N`` / ``v5litepod-N`` and ``v6e-N`` count chips; 8-chip v5e/v6e slices are
    one host, larger slices have 4 chips per host.

    Raises:
        ValueError: For a name that matches no form or an unknown chip.
    """
    s = name.strip().lower()
    m = re.fullmatch(r"(\d+)x(\d+)x([a-z0-9-]+)", s)
    if m:
        hosts, per, chip = int(m[1]), int(m[2]), m[3]
        if chip not in CHIPS:
            raise ValueError(f"unknown chip {chip!r} in {name!r}; known: {sorted(CHIPS)}")
        return Topology(name, chip, hosts, per)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", s)
    if m:
        chip, grid = m[1], tuple(int(g) for g in m[2].split("x"))
        if len(grid) != TPU_GRID[chip][2]:
            raise ValueError(f"topology {name!r}: a {chip} grid has {TPU_GRID[chip][2]} sizes")
        return _tpu_slice(name, chip, math.prod(grid), 1, grid)
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", s)
    if not m:
        raise ValueError(
            f"topology {name!r}: use HOSTSxDEVICESxCHIP (e.g. 2x8xh100, 4x4xv5e), a TPU "
            "slice name (v4-32, v5p-64, v5e-32, v6e-16), SLICESx and a slice name for "
            "multi-slice (2xv5e-16) or a TPU grid (v5p:4x4x12)"
        )
    slices, kind, n = int(m[1] or 1), m[2], int(m[3])
    if slices < 1:
        raise ValueError(f"topology {name!r} has no slices")
    chip = "v5e" if kind == "v5litepod" else kind
    return _tpu_slice(name, chip, n // 2 if chip in ("v4", "v5p") else n, slices)


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a power-of-two slice, as Cloud TPU shapes them: 2-D v5e/v6e slices
    1x1, 2x2, 2x4, 4x4, 4x8, ...; 3-D v4/v5p slices 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...

    Raises:
        ValueError: For a chip count that is not a power of two.
    """
    if chips < 1 or chips & (chips - 1):
        raise ValueError(
            f"{chips} chips is not a power of two: give the grid, e.g. v5p:4x4x12 or v5e:4x8"
        )
    grid = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(grid) < chips:  # double the smallest size, the last one on ties
        i = max(range(dims), key=lambda j: (-grid[j], j))
        grid[i] *= 2
    return tuple(grid)


def tpu_topology_args(topo: Topology) -> dict[str, Any]:
    """Keyword arguments of ``get_topology_desc(platform="tpu", ...)`` for a TPU target.

    Raises:
        ValueError: For a non-TPU chip or a host size that does not tile the chip grid.
    """
    if topo.chip not in TPU_GRID:
        raise ValueError(f"{topo.name}: {topo.chip} is not a TPU")
    prefix, chip_config, dims = TPU_GRID[topo.chip]
    grid = topo.grid or chip_grid(topo.devices // topo.slices, dims)
    bounds = HOST_BOUNDS.get(topo.per_host)
    full = (*grid, 1) if dims == 2 else grid
    if bounds is None or any(g % b for g, b in zip(full, bounds, strict=True)):
        raise ValueError(
            f"{topo.name}: hosts of {topo.per_host} chips do not tile the {topo.chip} grid "
            f"{'x'.join(map(str, grid))}"
        )
    if dims == 3:  # slices of 4 chips or more in every direction are a full torus
        wrap = (min(grid) >= 4,) * 3
    else:  # v5e / v6e: a direction of 16 chips (a full pod side) wraps around
        wrap = (grid[0] == 16, grid[1] == 16, False)
    return {
        "topology_name": f"{prefix}:{'x'.join(map(str, grid))}",
        "chip_config_name": chip_config,
        "chips_per_host_bounds": bounds,
        "num_slices": topo.slices,
        "wrap": wrap,
    }


def libtpu() -> dict[str, str] | None:
    """Where libtpu is (``TPU_LIBRARY_PATH`` or the ``libtpu`` package) and its version;
    None when it is not installed. Nothing is loaded."""
    path = os.environ.get("TPU_LIBRARY_PATH", "")
    if not os.path.isfile(path):
        spec = importlib.util.find_spec("libtpu")
        if spec is None or spec.origin is None:
            return None
        path = str(Path(spec.origin).parent / "libtpu.so")
        if not os.path.isfile(path):
            return None
    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"path": path, "version": version}


def choose_compiler(
    topo: Topology, requested: str = "auto", installed: dict[str, str] | None = None
) -> tuple[str, str]:
    """("tpu" | "cpu", why): the compiler a dry run of ``topo`` uses.

    ``auto``: XLA:TPU for TPU targets when libtpu is ``installed``, else virtual CPU devices.

    Raises:
        ValueError: An unknown request, or ``tpu`` for a non-TPU target or without libtpu.
    """
    if requested not in COMPILERS:
        raise ValueError(f"dry_run_compiler must be one of {COMPILERS}, got {requested!r}")
    tpu = topo.platform == "tpu"
    if requested == "cpu":
        return "cpu", "virtual CPU devices (requested)"
    if tpu and installed is not None:
        return "tpu", (
            f"the XLA:TPU compiler of libtpu {installed['version']} on "
            f"{topo.devices} compile-only {topo.chip} devices"
        )
    if requested == "tpu":
        why = "is not a TPU" if not tpu else "needs libtpu: pip install 'resofilter_jax[tpu]'"
        raise ValueError(f"dry_run_compiler='tpu': {topo.name} {why}")
    if tpu:
        return "cpu", (
            "virtual CPU devices: libtpu is not installed (pip install 'resofilter_jax[tpu]' "
            "for the real TPU compiler)"
        )
    return "cpu", f"virtual CPU devices: no {topo.chip} compiler on this host"


def tpu_devices(topo: Topology) -> list[Any]:
    """Compile-only TPU devices of ``topo`` (libtpu must be installed).

    JAX's own backend stays the CPU: the TPU runtime is not started, no TPU is needed.

    Raises:
        RuntimeError: If the topology does not have the expected device count.
    """
    # Compile-only use never opens a TPU: several dry runs (or a dry run next to a TPU job)
    # may share the host, which libtpu's lock file would otherwise refuse.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental.topologies import get_topology_desc

    try:
        jax.config.update("jax_platforms", "cpu")
    except Exception:  # noqa: BLE001 - backend already initialised: its platform stays
        pass
    devices = list(get_topology_desc(platform="tpu", **tpu_topology_args(topo)).devices)
    if len(devices) != topo.devices:
        raise RuntimeError(f"{topo.name}: libtpu gave {len(devices)} devices, not {topo.devices}")
    return devices


def use_virtual_devices(n: int) -> None:
    """Makes JAX start with ``n`` CPU devices (must run before JAX's backend starts).

    Raises:
        RuntimeError: If the backend already runs with fewer devices.
    """
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # noqa: BLE001 - backend already initialised; checked below
        pass
    if len(jax.devices()) < n:
        raise RuntimeError(
            f"the dry run needs {n} virtual devices but JAX already started with "
            f"{len(jax.devices())}; run it in a fresh process"
        )


@dataclasses.dataclass
class Target:
    """Where a dry run compiles: the topology, the compiler and its devices."""

    topo: Topology
    compiler: str  # tpu | cpu
    why: str
    devices: list[Any]


def target_of(config: Any) -> Target:
    """The target of ``config.dry_run_topology`` and its devices (sets up JAX's backend:
    virtual CPU devices, or the CPU backend plus compile-only TPU devices)."""
    topo = parse_topology(config.dry_run_topology)
    compiler, why = choose_compiler(topo, config.get("dry_run_compiler", "auto"), libtpu())
    if compiler == "tpu":
        return Target(topo, compiler, why, tpu_devices(topo))
    use_virtual_devices(topo.devices)
    import jax

    return Target(topo, compiler, why, jax.devices()[: topo.devices])

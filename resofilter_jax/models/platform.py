"""Which platform a traced program is compiled for (shared by attention, precision, features).

A dry run traces TPU programs on a CPU host (abstract TPU devices in the mesh of the context),
so "where does this run" is not always `jax.default_backend()`: code that picks a kernel or a
method per platform asks :func:`target_platform`.
"""

from __future__ import annotations

import jax


def platform_name(platform: str) -> str:
    """One name per platform family: cpu | gpu (cuda, rocm) | tpu."""
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def target_platform() -> str:
    """The platform the traced program is compiled for: that of the mesh in context
    (`jax.set_mesh`; a dry run's abstract TPU devices) or else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform_name(platform or jax.default_backend())

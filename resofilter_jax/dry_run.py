"""Dry run: compile a job's step for a target topology on this machine, without data or weights.

    python -m resofilter_jax.score --config configs/reso_gemma2_metamath.py \
        --config.model.path=gemma-2-2b/config.json --config.dry_run=True \
        --config.dry_run_topology=v5e-32

The target's mesh is built from virtual CPU devices (one per target device, in one process),
the model is abstract (shapes only, nothing allocated: a config.json, a model directory or a
.gguf file is enough), and the step the job would run (IFD loss batch, resonance batch, or the
train step) is lowered and compiled ahead of time with the job's largest batch shape. It prints
the mesh, the global and per-process batch shape, and per-device memory: parameters and other
arguments (exact: they follow from the shardings), outputs, and the compiler's temporary
buffers, against the device memory of the target.

The per-device program is the same SPMD program every device of the real job runs, but it is
compiled by the CPU backend here: argument and output sizes are exact, temporaries are the CPU
compiler's estimate (TPU/GPU compilers fuse differently; treat them as a guide within tens of
percent) and the total excludes framework overheads (allocator slack, collectives' buffers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

GIB = 1024**3

# Chip -> (device memory in GiB, devices per host in multi-host slices).
CHIPS: dict[str, tuple[float | None, int]] = {
    "cpu": (None, 8),
    "v4": (32.0, 4),
    "v5e": (16.0, 4),
    "v5p": (95.0, 4),
    "v6e": (32.0, 4),
    "a100": (80.0, 8),
    "a100-40": (40.0, 8),
    "h100": (80.0, 8),
    "h200": (141.0, 8),
    "l4": (24.0, 8),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A target job: ``hosts`` processes with ``per_host`` devices of ``chip`` each."""

    name: str
    chip: str
    hosts: int
    per_host: int

    @property
    def devices(self) -> int:
        return self.hosts * self.per_host

    @property
    def memory_gib(self) -> float | None:
        return CHIPS[self.chip][0]


def parse_topology(name: str) -> Topology:
    """A topology from ``HOSTSxDEVICESxCHIP`` (``2x8xh100``) or a TPU slice name.

    TPU slice names: ``v4-N`` and ``v5p-N`` count TensorCores (2 per chip), ``v5e-N`` /
    ``v5litepod-N`` and ``v6e-N`` count chips; 8-chip v5e/v6e slices are one host, larger
    slices have 4 chips per host.

    Raises:
        ValueError: For a name that matches neither form or an unknown chip.
    """
    s = name.strip().lower()
    m = re.fullmatch(r"(\d+)x(\d+)x([a-z0-9-]+)", s)
    if m:
        hosts, per, chip = int(m[1]), int(m[2]), m[3]
        if chip not in CHIPS:
            raise ValueError(f"unknown chip {chip!r} in {name!r}; known: {sorted(CHIPS)}")
        return Topology(name, chip, hosts, per)
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", s)
    if not m:
        raise ValueError(
            f"topology {name!r}: use HOSTSxDEVICESxCHIP (e.g. 2x8xh100, 4x4xv5e) or a TPU "
            "slice name (v4-32, v5p-64, v5e-32, v6e-16)"
        )
    kind, n = m[1], int(m[2])
    chip = "v5e" if kind == "v5litepod" else kind
    chips = n // 2 if chip in ("v4", "v5p") else n
    if chips < 1:
        raise ValueError(f"topology {name!r} has no chips")
    if chip in ("v5e", "v6e") and chips <= 8:
        return Topology(name, chip, 1, chips)
    per = min(4, chips)
    if chips % per:
        raise ValueError(f"topology {name!r}: {chips} chips do not fill hosts of {per}")
    return Topology(name, chip, chips // per, per)


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


def model_config_of(path: str) -> Any:
    """The ModelConfig of a config.json, a HF model directory or a .gguf file (no weights)."""
    from resofilter_jax import assets
    from resofilter_jax.models.config import config_from_hf

    p = Path(path or assets.smollm2_gguf()).expanduser()
    if p.suffix == ".gguf":
        from resofilter_jax.models.gguf_io import GGUFFile

        return config_from_hf(GGUFFile(p).hf_config())
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the dry run needs a config.json, model dir or .gguf")
    return config_from_hf(json.loads(p.read_text()))


def _abstract(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` with ``sharding`` (one sharding, or a matching tree)."""
    import jax

    if not isinstance(sharding, jax.sharding.Sharding):  # a tree of shardings like `tree`
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
        )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _batch_spec(shapes: dict[str, tuple[tuple[int, ...], Any]], sharding: Any) -> dict[str, Any]:
    import jax

    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def _memory(compiled: Any) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _rows(token_budget: int, length: int, devices: int) -> int:
    """Rows of the job's longest-bucket batch (as the batch planner sizes them)."""
    return max(devices, token_budget // length // devices * devices)


def dry_run_scoring(config: Any) -> dict[str, Any]:
    """Compiles the IFD or resonance batch function of a scoring config for its topology."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resofilter_jax.models.loading import as_dtype
    from resofilter_jax.models.registry import abstract_model
    from resofilter_jax.parallel import batch_sharding, make_mesh, replicated

    topo = parse_topology(config.dry_run_topology)
    use_virtual_devices(topo.devices)
    mcfg = model_config_of(config.model.path)
    dtype, pdtype = as_dtype(config.model.dtype), as_dtype(config.model.param_dtype)
    model = abstract_model(mcfg, dtype=dtype, param_dtype=pdtype)
    model.scan_layers = bool(config.model.get("scan_layers", False))
    mesh = make_mesh(jax.devices()[: topo.devices])
    length = int(config.max_length)
    rows = _rows(int(config.token_budget), length, topo.devices)
    bs = batch_sharding(mesh)
    t0 = time.perf_counter()
    if config.method == "resonance":
        from resofilter_jax.scoring import reso_runner
        from resofilter_jax.scoring.resonance import make_resonance_fn, max_slots

        spec = reso_runner.spec_from_config(config, model)
        fn = make_resonance_fn(model, spec, data_shards=topo.devices)
        ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=bs)
        batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
        slots = None
        limit = int(config.resonance.get("max_segments", 8))
        limit = max_slots(model, spec, length, limit)  # as the scoring loop lowers it
        if config.get("pack", True) and fn.packable and limit > 1:  # the fullest packed rows
            slots = limit
            batch["positions"] = ids
        lowered = fn.lower(batch, slots=slots)
        step = f"resonance ({len(spec.params)} matrices, {spec.rule}"
        step += f", {slots} examples per row)" if slots else ")"
    else:
        from resofilter_jax.scoring.ifd import make_batch_fn

        graphdef, state = nnx.split(model)
        batch = _batch_spec(
            {
                "input_ids": ((rows, length), jnp.int32),
                "attention_mask": ((rows, length), jnp.int32),
                "positions": ((rows, length), jnp.int32),
                "loss_mask": ((rows, length), jnp.float32),
            },
            bs,
        )
        fn = make_batch_fn(graphdef, chunk=int(config.ce_chunk))
        lowered = fn.lower(_abstract(state, replicated(mesh)), batch)
        step = "ifd loss batch"
    compiled = lowered.compile()
    return _report(
        topo,
        mcfg,
        step,
        {"global": [rows, length], "per_process": [rows // topo.hosts, length]},
        {"data": topo.devices},
        _memory(compiled),
        time.perf_counter() - t0,
    )


def dry_run_training(config: Any) -> dict[str, Any]:
    """Compiles the train step of a training config (fsdp shardings, accumulation)."""
    import jax
    import jax.numpy as jnp
    import optax

    from resofilter_jax.models.loading import as_dtype
    from resofilter_jax.models.registry import abstract_model
    from resofilter_jax.parallel import (
        make_train_mesh,
        param_shardings,
        replicated,
        train_batch_sharding,
    )
    from resofilter_jax.training.optim import optimizer_from_config
    from resofilter_jax.training.trainer import make_step_fn, split_model

    topo = parse_topology(config.dry_run_topology)
    use_virtual_devices(topo.devices)
    mcfg = model_config_of(config.model.path)
    dtype, pdtype = as_dtype(config.model.dtype), as_dtype(config.model.param_dtype)
    model = abstract_model(mcfg, dtype=dtype, param_dtype=pdtype)
    model.scan_layers = bool(config.model.get("scan_layers", False))
    mesh = make_train_mesh(config.mesh.data, config.mesh.fsdp, jax.devices()[: topo.devices])
    n_dev = int(mesh.devices.size)
    t = config.train
    micro = t.micro_batch_size or t.batch_size
    if t.batch_size % micro or micro % n_dev:
        raise ValueError(
            f"batch_size={t.batch_size}, micro_batch_size={micro} do not split over the "
            f"{n_dev} devices of {topo.name} (micro must be a multiple of the device count)"
        )
    accum = t.batch_size // micro
    parts, params = split_model(model)
    shapes = {n: tuple(v.shape) for n, v in params.items()}
    p_shard = param_shardings(shapes, mesh)
    tx, _, _ = optimizer_from_config(config.optim, shapes, 1000)
    rep = replicated(mesh)
    abs_params = _abstract(params, p_shard)
    opt_shapes = jax.eval_shape(tx.init, abs_params)
    opt_shard = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, opt_shapes, p_shard, transform_non_params=lambda _: rep
    )
    length = int(config.max_length)
    batch = _batch_spec(
        {k: ((accum, micro, length), jnp.int32) for k in ("input_ids", "labels")}
        | {k: ((accum, micro, length), jnp.int32) for k in ("segment_ids", "positions")},
        train_batch_sharding(mesh),
    )
    step_fn = jax.jit(
        make_step_fn(parts, tx, ce_chunk=int(config.ce_chunk), grad_sharding=p_shard),
        in_shardings=(p_shard, opt_shard, train_batch_sharding(mesh)),
        out_shardings=(p_shard, opt_shard, rep),
        donate_argnums=(0, 1),
    )
    t0 = time.perf_counter()
    compiled = step_fn.lower(abs_params, _abstract(opt_shapes, opt_shard), batch).compile()
    return _report(
        topo,
        mcfg,
        f"train step (AdamW, {accum} micro-batch(es))",
        {
            "global": [accum, micro, length],
            "per_process": [accum, micro // topo.hosts, length],
        },
        dict(mesh.shape),
        _memory(compiled),
        time.perf_counter() - t0,
    )


def _report(
    topo: Topology,
    mcfg: Any,
    step: str,
    batch: dict[str, list[int]],
    mesh: dict[str, int],
    memory: dict[str, int],
    compile_s: float,
) -> dict[str, Any]:
    """Prints and returns the dry run's findings."""
    cap = topo.memory_gib
    fits = None if cap is None else memory["total"] <= cap * GIB
    report = {
        "topology": dataclasses.asdict(topo) | {"devices": topo.devices, "memory_gib": cap},
        "model": {"model_type": mcfg.model_type, "params": mcfg.num_params_estimate},
        "step": step,
        "mesh": mesh,
        "batch": batch,
        "per_device_bytes": memory,
        "per_device_gib": {k: v / GIB for k, v in memory.items()},
        "fits": fits,
        "compile_s": compile_s,
    }
    verdict = "unknown memory" if fits is None else ("fits" if fits else "DOES NOT FIT")
    lines = [
        f"dry run: {topo.name} = {topo.hosts} host(s) x {topo.per_host} {topo.chip} "
        f"({topo.devices} devices), mesh {mesh}",
        f"model {mcfg.model_type}, {mcfg.num_params_estimate / 1e9:.2f}B parameters; step: {step}",
        f"batch: global {batch['global']}, per process {batch['per_process']}",
        "per device: "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in memory.items() if k != "aliased")
        + (f" of {cap:.0f} GiB -> {verdict}" if cap else ""),
        f"compiled in {compile_s:.1f} s (CPU backend; temporaries are an estimate)",
    ]
    print("\n".join(lines), flush=True)
    return report


def run_dry(config: Any, kind: str) -> dict[str, Any]:
    """The dry run of a ``score`` (kind="score") or ``train`` (kind="train") config.

    Raises:
        ValueError: If the config needs a model path and none is given.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.get("require_model_path", False) and not config.model.path:
        raise ValueError(
            "the dry run needs --config.model.path=<config.json, model directory or .gguf> "
            "(only the architecture is read)"
        )
    return dry_run_training(config) if kind == "train" else dry_run_scoring(config)

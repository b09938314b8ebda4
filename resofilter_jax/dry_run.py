"""Dry run: compile a job's step for a target topology on this machine, without data or weights.

    python -m resofilter_jax.score --config configs/reso_gemma2_metamath.py \
        --config.model.path=gemma-2-2b/config.json --config.dry_run=True \
        --config.dry_run_topology=v5e-32

The model is abstract (shapes only, nothing allocated: a config.json, a model directory or a
.gguf file is enough), the attention backend is resolved for the target's platform as the job
would (`auto` -> splash on TPU, cudnn / pallas_gpu / xla on GPU), and the step the job would
run (IFD loss batch, resonance batch, or the train step) is lowered and compiled ahead of time
with the job's largest batch shape. It prints the compiler used, the mesh, the global and
per-process batch shape, per-device memory against the chip's memory, and an ESTIMATE of the
step time and MFU (`dry_run_estimate`: a roofline from analytic FLOPs, not a measurement).

Compilers (`dry_run_targets.choose_compiler`; `dry_run_compiler` = auto | tpu | cpu):

* TPU targets (v4, v5e, v5p, v6e; multi-slice as ``2xv5e-16``) with libtpu installed
  (``pip install 'resofilter_jax[tpu]'``): the real XLA:TPU compiler on compile-only TPU
  devices (`jax.experimental.topologies`), as the job's process would compile it; splash
  attention is lowered through Mosaic. The memory figures are the TPU compiler's own, and a
  program that does not fit in HBM is refused by the compiler (reported as DOES NOT FIT).
* GPU targets, and TPU targets without libtpu: virtual CPU devices (one per target device,
  in one process). Argument and output sizes are exact (they follow from the shardings);
  temporaries are the CPU compiler's estimate of the same SPMD program (TPU/GPU compilers fuse
  differently; a guide within tens of percent, framework overheads excluded). Attention
  kernels the CPU compiler cannot lower (splash, cudnn, pallas_gpu: `CPU_CANNOT_LOWER`) are
  compiled as `reference` in their place, and the report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resofilter_jax.dry_run_targets import (  # noqa: F401 - re-exported for callers
    CHIPS,
    GIB,
    Target,
    Topology,
    parse_topology,
    target_of,
    use_virtual_devices,
)

# Attention kernels the CPU compiler cannot lower (a dry run on virtual CPU devices compiles
# `reference` in their place), and why.
CPU_CANNOT_LOWER = {
    "splash": "splash is a Mosaic TPU kernel: only the TPU compiler (libtpu) lowers it",
    "cudnn": "cudnn is a cuDNN fused-attention custom call: only the CUDA backend lowers it",
    "pallas_gpu": "pallas_gpu is a Triton kernel: only the CUDA backend lowers it",
}


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


def _abstract_model(config: Any, target: Target, packed: bool) -> tuple[Any, Any, dict]:
    """(model config, abstract model, attention record) with the target's attention backend.

    `auto` resolves for the target's platform, as the real job would. On virtual CPU devices
    a kernel the CPU compiler cannot lower (``CPU_CANNOT_LOWER``) is compiled as `reference`.
    """
    from resofilter_jax.models.attention import configure_attention
    from resofilter_jax.models.loading import as_dtype
    from resofilter_jax.models.registry import abstract_model
    from resofilter_jax.models.stacking import set_scan_layers

    mcfg = model_config_of(config.model.path)
    dtype, pdtype = as_dtype(config.model.dtype), as_dtype(config.model.param_dtype)
    model = abstract_model(mcfg, dtype=dtype, param_dtype=pdtype)
    # As the jobs store the layers: stacked with scan_layers, per layer for resonance (it
    # selects matrices by HF layer name; scoring/pipeline.py and training/pipeline.py).
    per_layer = config.get("method", "") == "resonance"
    set_scan_layers(model, bool(config.model.get("scan_layers", False)), per_layer=per_layer)
    record = configure_attention(
        model,
        config.model.get("attention", "auto"),
        packed=packed,
        platform=target.topo.platform,
    )
    record["compiled"] = record["backend"]
    if target.compiler == "cpu" and record["backend"] in CPU_CANNOT_LOWER:
        record["compiled"] = model.attention = "reference"
        record["not_lowered"] = CPU_CANNOT_LOWER[record["backend"]]
    return mcfg, model, record


def _compile(lowered: Any) -> tuple[Any, str | None]:
    """(compiled, None), or (None, the compiler's message) when the program does not fit in
    the device's memory (HBM, or a kernel's on-chip scoped VMEM)."""
    try:
        return lowered.compile(), None
    except Exception as e:  # noqa: BLE001 - only out-of-memory is a finding; others re-raise
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            lines = [line.strip() for line in msg.strip().splitlines() if line.strip()]
            return None, " / ".join(lines[:6])[:1500]
        raise


def dry_run_scoring(config: Any) -> dict[str, Any]:
    """Compiles the IFD or resonance batch function of a scoring config for its topology."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resofilter_jax.dry_run_estimate import Step
    from resofilter_jax.parallel import batch_sharding, make_mesh, replicated

    target = target_of(config)
    topo, n_dev = target.topo, target.topo.devices
    pack = bool(config.get("pack", True))
    mcfg, model, attention = _abstract_model(config, target, pack)
    mesh = make_mesh(target.devices)
    length = int(config.max_length)
    from resofilter_jax.scoring.shard_loop import resolve_token_budget

    budget = resolve_token_budget(int(config.token_budget), topo.platform)  # 0: the target's
    rows = _rows(budget, length, n_dev)
    bs = batch_sharding(mesh)
    step_shape = dict(rows=rows // n_dev, length=length, attention=attention["backend"])
    t0 = time.perf_counter()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # splash: shard_map per device
        if config.method == "resonance":
            from resofilter_jax.scoring import reso_runner
            from resofilter_jax.scoring.resonance import (
                make_resonance_fn,
                max_slots,
                microbatch_size,
                param_shapes,
            )

            spec = reso_runner.spec_from_config(config, model)
            fn = make_resonance_fn(model, spec, data_shards=n_dev)
            ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=bs)
            batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
            slots = None
            limit = int(config.resonance.get("max_segments", 8))
            limit = max_slots(model, spec, length, limit)  # as the scoring loop lowers it
            if pack and fn.packable and limit > 1:  # the fullest packed rows
                slots = limit
                batch["positions"] = ids
            lowered = fn.lower(batch, slots=slots)
            step = f"resonance ({len(spec.params)} matrices, {spec.rule}"
            step += f", {slots} examples per row)" if slots else ")"
            micro = microbatch_size(model, spec, length, rows // n_dev, segments=slots or 1)
            shapes = {n: s for n, s in param_shapes(model).items() if n in spec.params}
            step_shape |= dict(
                kind="resonance",
                rows=micro,
                passes=-(-(rows // n_dev) // micro),
                chosen=shapes,
                slots=slots or 1,
                ce_chunk=spec.ce_chunk,
            )
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
            step = f"{config.method} loss batch"
            step_shape |= dict(kind="ifd", ce_chunk=int(config.ce_chunk))
    compiled, oom = _compile(lowered)
    kernels = lowered.as_text().count("tpu_custom_call")  # distinct Mosaic kernels (splash)
    return _report(
        target,
        mcfg,
        step,
        {"global": [rows, length], "per_process": [rows // topo.hosts, length]},
        {"data": n_dev},
        None if compiled is None else _memory(compiled),
        time.perf_counter() - t0,
        attention=attention,
        estimate=_estimate(config, mcfg, target, Step(**step_shape)),
        oom=oom,
        mosaic_kernels=kernels,
    )


def dry_run_training(config: Any) -> dict[str, Any]:
    """Compiles the train step of a training config (fsdp shardings, accumulation)."""
    import jax
    import jax.numpy as jnp
    import optax

    from resofilter_jax.dry_run_estimate import Step
    from resofilter_jax.models.base import check_remat
    from resofilter_jax.parallel import (
        make_train_mesh,
        param_shardings,
        replicated,
        train_batch_sharding,
    )
    from resofilter_jax.training.optim import optimizer_from_config
    from resofilter_jax.training.trainer import make_step_fn, split_model

    target = target_of(config)
    topo = target.topo
    packed = bool(config.data.get("packing")) or bool(config.data.get("pack_batches"))
    mcfg, model, attention = _abstract_model(config, target, packed)
    remat = check_remat(config.train.get("remat", "none"))
    model.remat = remat  # as the train pipeline sets it
    mesh = make_train_mesh(config.mesh.data, config.mesh.fsdp, target.devices)
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
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # splash: shard_map per device
        lowered = step_fn.lower(abs_params, _abstract(opt_shapes, opt_shard), batch)
    compiled, oom = _compile(lowered)
    kernels = lowered.as_text().count("tpu_custom_call")  # distinct Mosaic kernels (splash)
    step_shape = Step(
        kind="train",
        rows=micro // n_dev,
        length=length,
        passes=accum,
        attention=attention["backend"],
        ce_chunk=int(config.ce_chunk),
        remat=remat,
        shards=int(mesh.shape.get("fsdp", 1)),
    )
    return _report(
        target,
        mcfg,
        f"train step (AdamW, {accum} micro-batch(es))",
        {
            "global": [accum, micro, length],
            "per_process": [accum, micro // topo.hosts, length],
        },
        dict(mesh.shape),
        None if compiled is None else _memory(compiled),
        time.perf_counter() - t0,
        attention=attention,
        estimate=_estimate(config, mcfg, target, step_shape),
        oom=oom,
        mosaic_kernels=kernels,
    )


def _estimate(config: Any, mcfg: Any, target: Target, step: Any) -> dict[str, Any] | None:
    """The roofline ESTIMATE of ``step`` on the target chip (None for chips without figures)."""
    import dataclasses as dc

    import jax.numpy as jnp

    from resofilter_jax.dry_run_estimate import estimate
    from resofilter_jax.models.loading import as_dtype

    dtype = str(config.model.dtype)
    step = dc.replace(
        step,
        compute_bytes=jnp.dtype(as_dtype(dtype)).itemsize,
        param_bytes=jnp.dtype(as_dtype(config.model.param_dtype)).itemsize,
    )
    precision = str(config.model.get("matmul_precision", "default"))
    out = estimate(mcfg, step, target.topo.chip, dtype=dtype, precision=precision)
    if out is not None:
        out["tokens_per_s"] = out["tokens_per_s_per_device"] * target.topo.devices
        low = dtype in ("bfloat16", "float16")  # the precision setting is for fp32 operands
        out["matmul"] = f"{dtype} operands" + ("" if low else f", matmul_precision={precision}")
    return out


def _report(
    target: Target,
    mcfg: Any,
    step: str,
    batch: dict[str, list[int]],
    mesh: dict[str, int],
    memory: dict[str, int] | None,
    compile_s: float,
    *,
    attention: dict[str, str],
    estimate: dict[str, Any] | None,
    oom: str | None = None,
    mosaic_kernels: int = 0,
) -> dict[str, Any]:
    """Prints and returns the dry run's findings."""
    topo = target.topo
    cap = topo.memory_gib
    if memory is None:  # the TPU compiler refused: the program does not fit in HBM
        fits = False
    else:
        fits = None if cap is None else memory["total"] <= cap * GIB
    tpu = target.compiler == "tpu"
    report = {
        "topology": dataclasses.asdict(topo) | {"devices": topo.devices, "memory_gib": cap},
        "compiler": {"used": target.compiler, "why": target.why},
        "attention": attention,
        "mosaic_kernels": mosaic_kernels,
        "model": {"model_type": mcfg.model_type, "params": mcfg.num_params_estimate},
        "step": step,
        "mesh": mesh,
        "batch": batch,
        "per_device_bytes": memory,
        "per_device_gib": None if memory is None else {k: v / GIB for k, v in memory.items()},
        "memory_is": "exact (XLA:TPU)" if tpu else "arguments/outputs exact, temporaries XLA:CPU's",
        "fits": fits,
        "compiler_error": oom,
        "estimate": estimate,
        "compile_s": compile_s,
    }
    verdict = "unknown memory" if fits is None else ("fits" if fits else "DOES NOT FIT")
    slices = f" in {topo.slices} slices" if topo.slices > 1 else ""
    lines = [
        f"dry run: {topo.name} = {topo.hosts} host(s) x {topo.per_host} {topo.chip}{slices} "
        f"({topo.devices} devices), mesh {mesh}",
        f"compiler: {'XLA:TPU' if tpu else 'XLA:CPU'}: {target.why}",
        f"model {mcfg.model_type}, {mcfg.num_params_estimate / 1e9:.2f}B parameters; step: {step}",
        _attention_line(attention)
        + (
            f"; {mosaic_kernels} distinct Mosaic kernel(s) in the program" if mosaic_kernels else ""
        ),
        f"batch: global {batch['global']}, per process {batch['per_process']}",
    ]
    if memory is None:
        where = "on-chip VMEM (a fusion or kernel)" if "vmem" in str(oom).lower() else "HBM"
        lines.append(f"per device: DOES NOT FIT in {where}: the TPU compiler says: {oom}")
    else:
        lines.append(
            "per device: "
            + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in memory.items() if k != "aliased")
            + (f" of {cap:.0f} GiB -> {verdict}" if cap else "")
            + (" (the TPU compiler's figures)" if tpu else "")
        )
    if estimate is not None:
        e = estimate
        lines.append(
            f"ESTIMATE (roofline from analytic FLOPs, not measured): step {e['step_s'] * 1e3:.1f}"
            f" ms, MFU {e['mfu']:.0%} (upper bound), {e['tokens_per_s']:,.0f} tokens/s; "
            f"{e['model_tflop']:.2f} model TFLOP per device, {e['matmul']} at "
            f"{e['peak_tflops']:.0f} TFLOP/s (bf16 peak {e['bf16_peak_tflops']:.0f}), "
            f"HBM {e['hbm_gbps']:.0f} GB/s, {e['memory_bound_share']:.0%} of the time "
            "memory-bound"
        )
    lines.append(
        f"compiled in {compile_s:.1f} s"
        + ("" if tpu else " (CPU backend; temporaries are the CPU compiler's estimate)")
    )
    print("\n".join(lines), flush=True)
    return report


def _attention_line(a: dict[str, str]) -> str:
    line = f"attention: {a['requested']} -> {a['backend']} on the target ({a['reason']})"
    if a["compiled"] != a["backend"]:
        line += (
            f"; compiled with {a['compiled']} instead: {a['not_lowered']} (the reference's "
            "[heads, seq, seq] scores make temporaries an overestimate)"
        )
    return line


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
    with _target_matmuls():
        return dry_run_training(config) if kind == "train" else dry_run_scoring(config)


@contextlib.contextmanager
def _target_matmuls() -> Iterator[None]:
    """bf16 matmuls compile as the accelerator runs them (native bf16 operands), not widened
    to fp32 as on this host's CPU when it has no bf16 units (`precision.
    native_low_precision_matmul` asks the host; ``RESOFILTER_CPU_BF16=1`` overrides it)."""
    from resofilter_jax.models import precision

    cached = getattr(precision, "_cpu_has_bf16_units", None)
    old = os.environ.get("RESOFILTER_CPU_BF16")
    os.environ["RESOFILTER_CPU_BF16"] = "1"
    if cached is not None:
        cached.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RESOFILTER_CPU_BF16", None)
        else:
            os.environ["RESOFILTER_CPU_BF16"] = old
        if cached is not None:
            cached.cache_clear()

"""The fused attention kernels behind `attention.self_attention` (the backends other than the
reference): XLA's `jax.nn.dot_product_attention`, cuDNN flash attention, the Pallas/Triton GPU
flash attention with segment ids, and TPU splash attention (run per device under `shard_map`
on a multi-device mesh). Each takes q [b, s, h, d], k/v [b, s, kv, d] and the segment ids
[b, s] of `attention.Rows` and returns [b, s, h, d] in q's dtype; which cases each can express
is decided in `attention.unsupported`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from resofilter_jax.models.layers import attention_mask_bias
from resofilter_jax.models.platform import target_platform

Array = jax.Array

LOW_PRECISION = ("bfloat16", "float16")
# Pallas GPU flash attention tiles (forward q/k rows, backward rows); short rows use one tile.
PALLAS_GPU_BLOCK = 128
PALLAS_GPU_BWD_BLOCK = 32
# Splash attention tiles must be multiples of 128 (TPU lanes); the largest that divides wins.
SPLASH_BLOCKS = (512, 256, 128)


def _interpret() -> bool:
    """Pallas kernels run interpreted when the program is compiled for CPU (tests)."""
    return target_platform() == "cpu"


def xla_attention(
    q: Array, k: Array, v: Array, ids: Array, *, scale: float, sliding_window: int | None
) -> Array:
    """jax.nn.dot_product_attention (XLA) with the reference's boolean mask."""
    mask = attention_mask_bias(ids, sliding_window)  # [b, 1, s, s]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    return out.astype(q.dtype)  # [b, s, h, d]


def cudnn_attention(
    q: Array, k: Array, v: Array, ids: Array, *, scale: float, sliding_window: int | None
) -> Array:
    """cuDNN flash attention: causal, padding by sequence lengths (one right-padded sequence
    per row: the lengths count the real tokens), sliding window by `local_window_size`.

    An all-padding row gets length 1 (its first token sees itself) so that no row is empty,
    and padding positions are zeroed, so nothing undefined reaches the gradients.
    """
    lengths = jnp.maximum(jnp.sum(ids > 0, axis=-1), 1).astype(jnp.int32)  # [b]
    window = None if sliding_window is None else (sliding_window - 1, 0)  # keys i-w+1 .. i
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=window,
        implementation="cudnn",
    )
    return jnp.where(ids[:, :, None, None] > 0, out, 0).astype(q.dtype)  # [b, s, h, d]


def _pad_seq(x: Array, pad: int) -> Array:
    """Zero-pads axis 1 (the sequence) by `pad` rows at the end."""
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def _pallas_gpu_sizes(s: int) -> tuple[int, Any]:
    """(padded length, BlockSizes) for the Pallas GPU kernel: blocks must divide the rows."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    if s <= PALLAS_GPU_BLOCK:
        padded = -(-s // 16) * 16  # one forward tile; Triton dots need >= 16 rows
        fwd = padded
        bwd = PALLAS_GPU_BWD_BLOCK if padded % PALLAS_GPU_BWD_BLOCK == 0 else 16
    else:
        padded = -(-s // PALLAS_GPU_BLOCK) * PALLAS_GPU_BLOCK
        fwd, bwd = PALLAS_GPU_BLOCK, PALLAS_GPU_BWD_BLOCK
    sizes = gpu_attention.BlockSizes(
        block_q=fwd,
        block_k=fwd,
        block_q_dkv=bwd,
        block_kv_dkv=bwd,
        block_q_dq=bwd,
        block_kv_dq=bwd,
    )
    return padded, sizes


def pallas_gpu_attention(q: Array, k: Array, v: Array, ids: Array, *, scale: float) -> Array:
    """Pallas GPU flash attention with segment ids (padding is segment 0: padding queries
    see padding keys only, real queries never see them)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, s, h, d = q.shape
    groups = h // k.shape[2]
    if groups > 1:  # the kernel wants one kv head per query head
        k = jnp.repeat(k, groups, axis=2)  # [b, s, h, d]
        v = jnp.repeat(v, groups, axis=2)  # [b, s, h, d]
    padded, sizes = _pallas_gpu_sizes(s)
    pad = padded - s
    segments = _pad_seq(ids.astype(jnp.int32), pad)  # [b, padded]
    out = gpu_attention.mha(
        _pad_seq(q, pad),
        _pad_seq(k, pad),
        _pad_seq(v, pad),
        segments,
        sm_scale=scale,
        causal=True,
        block_sizes=sizes,
        interpret=_interpret(),
    )  # [b, padded, h, d]
    return out[:, :s].astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(
    heads: int, padded: int, window: int | None, softcap: float | None, interpret: bool
) -> Any:
    """A single-example splash kernel (built once per shape: the mask is processed here)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (padded, padded)
    if window is None:
        one = splash.CausalMask(shape)
    else:  # keys i - (window - 1) .. i
        one = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    block = next(blk for blk in SPLASH_BLOCKS if padded % blk == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to reuse across traces
        return splash.make_splash_mha_single_device(
            splash.MultiHeadMask([one] * heads),
            block_sizes=sizes,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    ids: Array,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> Array:
    """TPU splash attention, vmapped over the batch, heads-first; GQA is native. On a
    multi-device mesh the kernel runs per device under `shard_map` (`_per_device`)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, s, h, d = q.shape
    padded = -(-s // 128) * 128  # splash tiles are multiples of 128 rows
    pad = padded - s
    kernel = _splash_kernel(h, padded, sliding_window, softcap, _interpret())
    qs = _pad_seq(q * jnp.asarray(scale, q.dtype), pad).transpose(0, 2, 1, 3)  # [b, h, p, d]
    ks = _pad_seq(k, pad).transpose(0, 2, 1, 3)  # [b, kv, p, d]
    vs = _pad_seq(v, pad).transpose(0, 2, 1, 3)  # [b, kv, p, d]
    segments = _pad_seq(ids.astype(jnp.int32), pad)  # [b, p]

    def one(qi: Array, ki: Array, vi: Array, seg: Array) -> Array:
        return kernel(qi, ki, vi, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    if jnp.dtype(q.dtype).name in LOW_PRECISION:
        one = _native_precision(one)

    def rows(qb: Array, kb: Array, vb: Array, sb: Array) -> Array:
        return jax.vmap(one)(qb, kb, vb, sb)  # [rows, h, p, d]

    out = _per_device(rows, b, 4)(qs, ks, vs, segments)  # [b, h, p, d]
    return out.transpose(0, 2, 1, 3)[:, :s].astype(q.dtype)  # [b, s, h, d]


def _native_precision(fn: Any) -> Any:
    """``fn`` with its forward and backward passes traced at the default matmul precision.

    Mosaic has no bf16 x bf16 dot at fp32 precision ("Bad lhs type"), so the splash kernels
    of low-precision operands take the native pass whatever `model.matmul_precision` says,
    as the precision contract pins every bf16 matmul to DEFAULT. The backward kernels are
    traced after the forward pass, outside any scope around the call; hence the custom VJP.
    """

    @jax.custom_vjp
    def run(*args: Array) -> Array:
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def fwd(*args: Array) -> tuple[Array, Any]:
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)

    def bwd(vjp: Any, grad: Array) -> tuple[Any, ...]:
        with jax.default_matmul_precision("default"):
            return vjp(grad)

    run.defvjp(fwd, bwd)
    return run


def batch_axes(sizes: dict[str, int], rows: int) -> tuple[str, ...]:
    """Mesh axes (in mesh order, size > 1) the batch of ``rows`` is split over: each axis
    is taken while the product of the taken sizes still divides ``rows``."""
    axes: list[str] = []
    split = 1
    for name, size in sizes.items():
        if size > 1 and rows % (split * size) == 0:
            axes.append(name)
            split *= size
    return tuple(axes)


def _per_device(fn: Any, rows: int, n_args: int) -> Any:
    """``fn`` over batch-major arrays, as one kernel call per device on a multi-device mesh.

    XLA cannot partition a Mosaic (TPU Pallas) kernel: on a mesh in context
    (`jax.sharding.use_abstract_mesh`; `jax.set_mesh` too, but a dry run's compile-only
    devices cannot run the eager mask set-up under it) with several devices the call is
    wrapped in a `shard_map` over every mesh axis (those not already manual), the batch split
    over the axes that divide it (`batch_axes`: what a data / fsdp batch sharding does) and
    replicated over the rest. A batch that no axis divides (e.g. one example inside a `vmap`
    over examples) is computed whole on every device: correct, but not split. Interpret mode
    (CPU) takes the same path. Without a mesh in context, ``fn`` as is.

    Raises:
        ValueError: A TPU run on several devices without a mesh in context.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        if not _interpret() and jax.default_backend() == "tpu" and jax.device_count() > 1:
            raise ValueError(
                "splash attention on several TPU devices runs under shard_map and needs the "
                "mesh: trace the step inside `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`"
            )
        return fn
    # Mosaic wants every mesh axis manual, size-1 axes included.
    free = {n: k for n, k in mesh.shape.items() if n not in mesh.manual_axes}
    if math.prod(free.values()) == 1:  # one device, or already per device (in a shard_map)
        return fn
    from jax.sharding import PartitionSpec as P

    axes = batch_axes(free, rows)
    spec = P(axes if axes else None)  # leading (batch) dimension only
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec,) * n_args,
        out_specs=spec,
        axis_names=frozenset(free),
        check_vma=False,
    )

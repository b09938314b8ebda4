"""Causal self-attention behind one switch: `model.attention` = auto | reference | xla | ...

Every backend computes the same thing as the reference (`layers.dot_product_attention` with
the mask of `layers.attention_mask_bias`, the oracle) for every real token:

    reference   the CPU-tuned implementation in `layers` (the CPU default, the oracle)
    xla         `jax.nn.dot_product_attention(implementation="xla")` (no soft-cap)
    cudnn       cuDNN flash attention on GPU, bf16/fp16: one right-padded sequence per row
                (padding via sequence lengths, sliding window via `local_window_size`)
    pallas_gpu  the Pallas/Triton flash attention of `jax.experimental.pallas.ops.gpu`, with
                segment ids: packed rows on GPU (no sliding window, no soft-cap)
    splash      TPU splash attention: segment ids, causal or local (sliding-window) masks and
                Gemma 2's logit soft-cap

`auto` picks one from the platform, the row layout (packed or not), the compute dtype and the
model's features (`resolve_attention`), and logs what it chose and why. An explicit choice
that cannot express the case is refused with a ValueError. On CPU the Pallas kernels run in
interpret mode (slow; it is how their use here is tested).

On several TPU devices splash runs per device under `shard_map` (Mosaic kernels are not
partitioned by XLA): the step must be traced with its mesh in context,
`with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):` around the call that traces it.

Rows follow `attention_mask_bias`: `attention_mask` [b, s] holds a segment id per token (0 =
padding); a real query sees the earlier keys of its own segment (and, with a window w, only
keys j > i - w). What a padding query computes differs between backends: it is finite and
never reaches a real token (no real query sees a padding key, and losses mask padding).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from resofilter_jax.models.config import ModelConfig
from resofilter_jax.models.layers import attention_mask_bias, dot_product_attention
from resofilter_jax.models.platform import platform_name, target_platform

Array = jax.Array
log = logging.getLogger("resofilter_jax.attention")

BACKENDS = ("reference", "xla", "cudnn", "pallas_gpu", "splash")
CHOICES = ("auto", *BACKENDS)
LOW_PRECISION = ("bfloat16", "float16")

# Pallas GPU flash attention tiles (forward q/k rows, backward rows); short rows use one tile.
PALLAS_GPU_BLOCK = 128
PALLAS_GPU_BWD_BLOCK = 32
# Splash attention tiles must be multiples of 128 (TPU lanes); the largest that divides wins.
SPLASH_BLOCKS = (512, 256, 128)


# --------------------------------------------------------------------------- resolution


def model_features(config: ModelConfig) -> tuple[int | None, float | None]:
    """(sliding window, attention soft-cap) the model's attention needs; None when absent."""
    sliding = any(config.is_sliding(i) for i in range(config.num_hidden_layers))
    window = config.sliding_window if sliding else None
    # HF's Gemma 3 never applies `attn_logit_softcapping`; only Gemma 2 does (see gemma.py).
    softcap = config.attn_logit_softcapping if config.arch == "gemma2" else None
    return window, softcap


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


def unsupported(
    backend: str,
    *,
    platform: str,
    packed: bool,
    sliding_window: int | None,
    softcap: float | None,
    dtype: Any = None,
) -> str | None:
    """Why `backend` cannot run this case on `platform`, or None when it can.

    Args:
        platform: `jax.default_backend()` of the run: cpu | gpu (also cuda/rocm) | tpu.
        packed: rows may hold several segments (sequences) each.
        dtype: compute dtype (None = unknown: not checked).
    """
    platform = platform_name(platform)
    name = _dtype_name(dtype)
    if backend == "reference":
        return None
    if backend == "xla":
        if softcap is not None:
            return "xla (jax.nn.dot_product_attention) cannot express the attention logit soft-cap"
        return None
    if backend == "cudnn":
        if platform != "gpu":
            return f"cudnn flash attention needs a GPU, the platform is {platform}"
        if packed:
            return "cudnn takes one right-padded sequence per row, not packed rows (segment ids)"
        if softcap is not None:
            return "cudnn cannot express the attention logit soft-cap"
        if name is not None and name not in LOW_PRECISION:
            return f"cudnn flash attention runs in bf16/fp16 only, the compute dtype is {name}"
        return None
    if backend == "pallas_gpu":
        if platform == "tpu":
            return "pallas_gpu is a Triton kernel and cannot run on TPU (use splash)"
        if sliding_window is not None:
            return "pallas_gpu (pallas.ops.gpu.attention.mha) has no sliding-window mask"
        if softcap is not None:
            return "pallas_gpu (pallas.ops.gpu.attention.mha) has no attention logit soft-cap"
        return None
    if backend == "splash":
        if platform == "gpu":
            return "splash is a TPU (Mosaic) kernel and cannot run on GPU"
        return None
    raise ValueError(f"unknown attention backend {backend!r}; use one of {CHOICES}")


_LOGGED: set[tuple] = set()


def resolve_attention(
    name: str,
    *,
    platform: str,
    packed: bool,
    sliding_window: int | None,
    softcap: float | None,
    dtype: Any = None,
) -> tuple[str, str]:
    """The backend to run and why: `auto` is resolved, an explicit choice is checked.

    Logs the choice (logger `resofilter_jax.attention`) once per distinct resolution.

    Raises:
        ValueError: an unknown name, or an explicit backend that cannot run this case.
    """
    if name not in CHOICES:
        raise ValueError(f"unknown attention backend {name!r}; use one of {CHOICES}")
    platform = platform_name(platform)
    case = dict(
        platform=platform,
        packed=packed,
        sliding_window=sliding_window,
        softcap=softcap,
        dtype=dtype,
    )
    if name != "auto":
        why = unsupported(name, **case)
        if why is not None:
            raise ValueError(f"model.attention={name!r} cannot run here: {why}")
        backend = name
        reason = f"chosen explicitly (platform {platform})"
        if name in ("pallas_gpu", "splash") and platform == "cpu":
            reason += "; Pallas interpret mode on CPU (slow, for tests)"
    else:
        backend, reason = _auto(**case)
    key = (name, backend, platform, packed, sliding_window, softcap, _dtype_name(dtype))
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("attention %s -> %s: %s", name, backend, reason)
    return backend, reason


def _auto(
    *,
    platform: str,
    packed: bool,
    sliding_window: int | None,
    softcap: float | None,
    dtype: Any,
) -> tuple[str, str]:
    """auto: the fastest backend that can express the case, with the reasons for skipping."""
    case = dict(
        platform=platform,
        packed=packed,
        sliding_window=sliding_window,
        softcap=softcap,
        dtype=dtype,
    )
    if platform == "cpu":
        return "reference", "CPU: the reference implementation (no fused kernel runs on CPU)"
    if platform == "tpu":
        return "splash", "TPU: splash attention (segment ids, local masks, soft-cap)"
    if platform != "gpu":
        return "reference", f"platform {platform}: no fused kernel, the reference"
    skipped = []
    for backend in ("cudnn", "pallas_gpu", "xla"):
        why = unsupported(backend, **case)
        if why is None:
            rows = "packed rows" if packed else "unpacked rows"
            note = f"; fell back because {'; '.join(skipped)}" if skipped else ""
            return backend, f"GPU, {rows}: {backend}{note}"
        skipped.append(why)
    return "reference", "GPU: no fused kernel fits (" + "; ".join(skipped) + ")"


def configure_attention(
    model: Any, name: str, *, packed: bool, platform: str | None = None
) -> dict[str, str]:
    """Resolves `name` for `model` (its features and compute dtype) and sets `model.attention`.

    Returns the run-record entry {"requested", "backend", "reason"}. `platform` defaults to
    `jax.default_backend()`.
    """
    window, softcap = model_features(model.config)
    backend, reason = resolve_attention(
        name,
        platform=platform or jax.default_backend(),
        packed=packed,
        sliding_window=window,
        softcap=softcap,
        dtype=model.dtype,
    )
    model.attention = backend
    return {"requested": name, "backend": backend, "reason": reason}


# --------------------------------------------------------------------------- model side


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """What a decoder layer needs to attend with a non-reference backend (a pytree).

    `segment_ids` [b, s] is the row's attention mask; `local` (a bool, or a traced bool under
    `scan_layers`) says whether this layer uses the sliding `window`. `base.pick` selects
    between two Rows leaf by leaf, like between two boolean masks.
    """

    segment_ids: Array  # [b, s]
    local: Any  # bool | bool[]
    window: int | None = dataclasses.field(metadata=dict(static=True), default=None)
    backend: str = dataclasses.field(metadata=dict(static=True), default="reference")


def layer_masks(
    attention_mask: Array, window: int | None, backend: str
) -> tuple[Array | Rows, Array | Rows]:
    """(full, sliding) masks for a non-cached forward pass: boolean [b, 1, s, s] masks for the
    reference backend, `Rows` otherwise. `window` None: the sliding one is the full one."""
    if backend == "reference":
        full = attention_mask_bias(attention_mask)  # [b, 1, s, s]
        slide = full if window is None else attention_mask_bias(attention_mask, window)
        return full, slide
    full = Rows(attention_mask, False, window, backend)
    return full, (full if window is None else Rows(attention_mask, True, window, backend))


def attend(
    q: Array, k: Array, v: Array, mask: Array | Rows, *, scale: float, softcap: float | None
) -> Array:
    """A layer's attention: `Rows` go to `self_attention`, a boolean mask (reference, KV
    cache) to `layers.dot_product_attention`. q [b, s, h, d], k/v [b, t, kv, d]."""
    if not isinstance(mask, Rows):
        return dot_product_attention(q, k, v, mask, scale=scale, softcap=softcap)

    def run(window: int | None) -> Array:
        return self_attention(
            q,
            k,
            v,
            mask.segment_ids,
            scale=scale,
            sliding_window=window,
            softcap=softcap,
            backend=mask.backend,
        )

    if mask.window is None or isinstance(mask.local, bool):
        return run(mask.window if mask.local is True else None)
    return jax.lax.cond(mask.local, lambda: run(mask.window), lambda: run(None))


# --------------------------------------------------------------------------- entry point


def self_attention(
    q: Array,
    k: Array,
    v: Array,
    attention_mask: Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    backend: str = "reference",
) -> Array:
    """Causal self-attention (no KV cache) of segment-masked rows with the chosen backend.

    Args:
        q: [b, s, heads, d]; k, v: [b, s, kv_heads, d] (heads a multiple of kv_heads; query
            head i uses kv head i // (heads // kv_heads), as in HF).
        attention_mask: [b, s], 0 = padding, > 0 = the token's segment id.
        scale: logit scale; sliding_window: HF window (key j hidden when j <= i - window);
        softcap: Gemma 2 logit soft-cap `tanh(x / c) * c` after scaling.
        backend: a resolved name (not `auto`).
    Returns:
        [b, s, heads, d] in q's dtype.
    Raises:
        ValueError: the backend cannot express the window or soft-cap.
    """
    if backend == "auto":
        raise ValueError("resolve 'auto' first (resolve_attention / configure_attention)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {CHOICES}")
    if backend == "reference":
        mask = attention_mask_bias(attention_mask, sliding_window)  # [b, 1, s, s]
        return dot_product_attention(q, k, v, mask, scale=scale, softcap=softcap)
    # Only the features matter here: packing and platform were checked at resolution.
    why = unsupported(
        backend,
        platform="gpu" if backend == "cudnn" else "cpu",
        packed=False,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    if why is not None:
        raise ValueError(f"attention backend {backend!r}: {why}")
    if backend == "xla":
        return _xla(q, k, v, attention_mask, scale=scale, sliding_window=sliding_window)
    if backend == "cudnn":
        return _cudnn(q, k, v, attention_mask, scale=scale, sliding_window=sliding_window)
    if backend == "pallas_gpu":
        return _pallas_gpu(q, k, v, attention_mask, scale=scale)
    return _splash(
        q, k, v, attention_mask, scale=scale, sliding_window=sliding_window, softcap=softcap
    )


def _interpret() -> bool:
    """Pallas kernels run interpreted when the program is compiled for CPU (tests)."""
    return target_platform() == "cpu"


def _xla(
    q: Array, k: Array, v: Array, ids: Array, *, scale: float, sliding_window: int | None
) -> Array:
    """jax.nn.dot_product_attention (XLA) with the reference's boolean mask."""
    mask = attention_mask_bias(ids, sliding_window)  # [b, 1, s, s]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    return out.astype(q.dtype)  # [b, s, h, d]


def _cudnn(
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


def _pallas_gpu(q: Array, k: Array, v: Array, ids: Array, *, scale: float) -> Array:
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


def _splash(
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


def _batch_axes(sizes: dict[str, int], rows: int) -> tuple[str, ...]:
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
    over the axes that divide it (`_batch_axes`: what a data / fsdp batch sharding does) and
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

    axes = _batch_axes(free, rows)
    spec = P(axes if axes else None)  # leading (batch) dimension only
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec,) * n_args,
        out_specs=spec,
        axis_names=frozenset(free),
        check_vma=False,
    )

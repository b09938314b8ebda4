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
import logging
from typing import Any

import jax
import jax.numpy as jnp

from resofilter_jax.models.config import ModelConfig
from resofilter_jax.models.fused_attention import (
    LOW_PRECISION,
    cudnn_attention,
    pallas_gpu_attention,
    splash_attention,
    xla_attention,
)
from resofilter_jax.models.layers import attention_mask_bias, dot_product_attention
from resofilter_jax.models.platform import platform_name

Array = jax.Array
log = logging.getLogger("resofilter_jax.attention")

BACKENDS = ("reference", "xla", "cudnn", "pallas_gpu", "splash")
CHOICES = ("auto", *BACKENDS)


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
        return xla_attention(q, k, v, attention_mask, scale=scale, sliding_window=sliding_window)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, attention_mask, scale=scale, sliding_window=sliding_window)
    if backend == "pallas_gpu":
        return pallas_gpu_attention(q, k, v, attention_mask, scale=scale)
    return splash_attention(
        q, k, v, attention_mask, scale=scale, sliding_window=sliding_window, softcap=softcap
    )

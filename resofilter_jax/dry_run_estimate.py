"""An ESTIMATE of a dry-run step's time and MFU from analytic model FLOPs and chip peaks.

Not a measurement. The step is split into ops (per layer: the q/k/v and output projections,
attention, the MLP matmuls, the norms and residuals; the LM head and cross-entropy per
sequence chunk; backward ops; the optimizer), each with analytic FLOPs and the HBM bytes it
moves at least (operands read once, results written once, elementwise work fused into its
neighbouring matmul), and each op takes ``max(FLOPs / peak, bytes / HBM bandwidth)`` (a
roofline per op, ops not overlapped). It assumes peak matmul throughput and full bandwidth
and leaves out collectives, host work and launch gaps, so the real step is slower: read the
MFU as an upper bound.

Counted FLOPs (per device; the batch is split evenly over the devices):

* forward: 2 x parameters x tokens for the matmuls (LM head included) plus the causal
  attention products 4 x heads x head_dim x (mean keys per query) per token and layer;
* backward: twice the forward of what it differentiates (input and weight gradients).
  The train step differentiates everything; resonance stops at the lowest chosen layer
  (input gradients only, plus each chosen matrix's per-example weight gradient: one weight
  gradient per example slot); IFD has no backward pass;
* rematerialisation (``train.remat``, the chunked cross-entropy) adds hardware FLOPs but no
  model FLOPs: MFU counts model FLOPs only, against the chip's dense bf16 peak.

The peak for fp32 operands follows ``model.matmul_precision``: TPUs run 1 / 3 / 6 bf16 passes
(default / high / highest), GPUs TF32 (default, high) or plain fp32 (highest).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from resofilter_jax.dry_run_targets import CHIPS, TPU_FP32_PASSES

FUSED_ATTENTION = ("splash", "cudnn", "pallas_gpu")  # no [s, s] scores in HBM


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of the roofline: FLOPs the hardware runs, bytes it moves, FLOPs that count
    for MFU (recomputation excluded), times ``count``."""

    name: str
    flops: float
    bytes: float
    model_flops: float
    count: float = 1.0


@dataclasses.dataclass(frozen=True)
class Step:
    """What one compiled step computes, per device.

    Attributes:
        kind: ifd | resonance | train.
        rows: Rows per device per pass; length: tokens per row.
        passes: Forward passes per step (train: micro-batches; resonance: micro steps), each
            over ``rows`` rows and reading every weight once.
        compute_bytes / param_bytes: bytes per element of activations / stored parameters.
        attention: The attention backend the target runs.
        ce_chunk: Sequence chunk of the cross-entropy (the LM head is read once per chunk).
        remat: train: none | layer | dots.
        chosen: resonance: {parameter name: shape} of the chosen parameters.
        slots: resonance: examples per row (1 when unpacked).
        shards: train: devices the optimizer state is split over (fsdp).
    """

    kind: str
    rows: int
    length: int
    passes: int = 1
    compute_bytes: int = 4
    param_bytes: int = 4
    attention: str = "reference"
    ce_chunk: int = 128
    remat: str = "none"
    chosen: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    slots: int = 1
    shards: int = 1


def mean_keys(length: int, window: int | None) -> float:
    """Keys a query attends to on average in a causal row of ``length`` (window: HF's)."""
    seen = np.arange(1, length + 1, dtype=np.float64)
    if window is not None:
        seen = np.minimum(seen, window)
    return float(seen.mean())


def _layer_ops(cfg: Any, layer: int, step: Step) -> list[Op]:
    """The forward ops of decoder layer ``layer`` over one pass of ``step``."""
    t = step.rows * step.length
    c, p = step.compute_bytes, step.param_bytes
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    up = 2 if cfg.arch != "gpt2" else 1  # gated MLPs: gate and up
    window = cfg.sliding_window if cfg.is_sliding(layer) else None
    ctx = mean_keys(step.length, window)
    attn_bytes = t * (q + 2 * kv) * c + t * q * c
    if step.attention not in FUSED_ATTENTION:  # fp32 scores: written, softmaxed, read
        attn_bytes += t * cfg.num_attention_heads * step.length * 4 * 3
    ops = [
        ("qkv", 2 * t * d * (q + 2 * kv), t * d * c + t * (q + 2 * kv) * c + d * (q + 2 * kv) * p),
        ("attention", 4 * t * q * ctx, attn_bytes),
        ("o_proj", 2 * t * q * d, t * q * c + t * d * c + q * d * p),
        ("norms", 0.0, 7 * t * d * c),
        ("mlp_in", 2 * up * t * d * f, t * d * c + up * t * f * c + up * d * f * p),
        ("mlp_out", 2 * t * f * d, up * t * f * c + t * d * c + f * d * p),
    ]
    return [Op(n, fl, by, fl) for n, fl, by in ops]


def _head_ops(cfg: Any, step: Step) -> list[Op]:
    """LM head + cross-entropy, chunk by chunk (fp32 logits written and read back)."""
    chunks = max(1, math.ceil((step.length - 1) / step.ce_chunk))
    t = step.rows * step.length / chunks
    d, v = cfg.hidden_size, cfg.vocab_size
    fl = 2 * t * d * v
    by = v * d * step.compute_bytes + t * d * step.compute_bytes + 2 * t * v * 4
    return [Op("lm_head+ce", fl, by, fl, chunks)]


def _backward(ops: list[Op], *, weights: bool, recompute: bool) -> list[Op]:
    """Backward of forward ``ops``: input gradients (1x the forward), weight gradients (1x
    more with ``weights``; attention always needs 2x), plus a recomputed forward."""
    out = []
    for op in ops:
        mult = 2.0 if (weights or op.name == "attention") else 1.0
        grad_bytes = op.bytes * (2.0 if weights else 1.5)  # saved inputs + output gradients
        out.append(Op(f"{op.name}:bwd", mult * op.flops, grad_bytes, mult * op.flops, op.count))
        if recompute:
            out.append(Op(f"{op.name}:remat", op.flops, op.bytes, 0.0, op.count))
    return out


def _layer_of(name: str) -> int | None:
    m = re.search(r"(?:layers|h)\.(\d+)\.", name)
    return int(m[1]) if m else None


def step_ops(cfg: Any, step: Step) -> list[Op]:
    """The ops of one step per device (see the module docstring)."""
    n_layers = cfg.num_hidden_layers
    layers = [_layer_ops(cfg, i, step) for i in range(n_layers)]
    fwd = [op for ops in layers for op in ops] + _head_ops(cfg, step)
    ops = list(fwd)
    if step.kind == "train":
        recompute = step.remat == "layer"
        ops += _backward(fwd[:-1], weights=True, recompute=recompute)
        ops += _backward(fwd[-1:], weights=True, recompute=True)  # the CE chunks are remat
    elif step.kind == "resonance":
        chosen = [_layer_of(n) for n in step.chosen]
        lowest = 0 if None in chosen or not chosen else min(i for i in chosen if i is not None)
        upper = [op for ops in layers[lowest:] for op in ops]
        ops += _backward(upper, weights=False, recompute=False)
        ops += _backward(fwd[-1:], weights=False, recompute=True)
        t = step.rows * step.length
        for name, shape in step.chosen.items():
            numel = math.prod(shape)
            examples = step.rows * step.slots
            fl = 2.0 * t * numel * step.slots  # one weight gradient per example slot
            by = examples * numel * 4 + t * sum(shape) * step.compute_bytes
            ops.append(Op(f"{name}:per_example_grad", fl, by, fl))
            feats = 3.0 * examples * numel * 4  # gradient (twice) and weights read, fp32
            ops.append(Op(f"{name}:features", 20.0 * examples * numel, feats, 0.0))
    elif step.kind != "ifd":
        raise ValueError(f"unknown step kind {step.kind!r}")
    ops = [dataclasses.replace(op, count=op.count * step.passes) for op in ops]
    if step.kind == "train":  # AdamW on this device's shard: params, grads, 2 moments
        n = cfg.num_params_estimate / step.shards
        ops.append(Op("optimizer", 12.0 * n, 7 * 4 * n, 0.0))
    return ops


def peak_flops(chip: str, dtype: str, precision: str) -> float | None:
    """The matmul peak per device for ``dtype`` operands under ``precision``."""
    spec = CHIPS[chip]
    if spec.bf16_flops is None:
        return None
    if dtype in ("bfloat16", "float16"):
        return spec.bf16_flops
    if spec.platform == "tpu":
        return spec.bf16_flops / TPU_FP32_PASSES[precision]
    return spec.fp32_flops.get(precision, spec.bf16_flops)


def estimate(
    cfg: Any, step: Step, chip: str, *, dtype: str, precision: str
) -> dict[str, Any] | None:
    """The step-time / MFU estimate of ``step`` on ``chip``; None without chip figures."""
    spec, peak = CHIPS[chip], peak_flops(chip, dtype, precision)
    if peak is None or spec.hbm_bytes_s is None or spec.bf16_flops is None:
        return None
    ops = step_ops(cfg, step)
    times = [op.count * max(op.flops / peak, op.bytes / spec.hbm_bytes_s) for op in ops]
    total = sum(times)
    model = sum(op.count * op.model_flops for op in ops)
    memory_bound = sum(
        t for t, op in zip(times, ops, strict=True) if op.bytes / spec.hbm_bytes_s > op.flops / peak
    )
    tokens = step.rows * step.length * step.passes
    return {
        "label": "ESTIMATE (per-op roofline from analytic FLOPs; an upper bound on MFU)",
        "step_s": total,
        "model_tflop": model / 1e12,
        "hardware_tflop": sum(op.count * op.flops for op in ops) / 1e12,
        "hbm_gb": sum(op.count * op.bytes for op in ops) / 1e9,
        "mfu": model / (total * spec.bf16_flops),
        "tokens_per_s_per_device": tokens / total,
        "memory_bound_share": memory_bound / total,
        "peak_tflops": peak / 1e12,
        "bf16_peak_tflops": spec.bf16_flops / 1e12,
        "hbm_gbps": spec.hbm_bytes_s / 1e9,
    }

"""The optimizer of a fine-tuning run: torch-style clipping, AdamW with a decay mask, a schedule.

Semantics (each matched by the PyTorch parity test in ``tests/test_train.py``):

* **Schedule** = ``optax.warmup_cosine_decay_schedule(0, peak, W, T, end)``. The update with
  index ``t`` (0-based: the first update has ``t = 0``) uses
  ``peak * t / W`` for ``t < W`` (so the first update of a warmed-up run has lr 0, as in
  Hugging Face's ``get_cosine_schedule_with_warmup``) and
  ``end + (peak - end) * 0.5 * (1 + cos(pi * min(t - W, T - W) / (T - W)))`` after.
  ``W = ceil(warmup_ratio * T)`` (HF's rule), ``T`` the number of optimizer steps of the run.
* **Clipping** as ``torch.nn.utils.clip_grad_norm_``: ``g * min(1, c / (||g|| + 1e-6))``
  (optax's own clip has no ``1e-6``; this one matches what HF Trainer users run).
* **AdamW** = ``optax.adamw`` (decoupled decay ``-lr * wd * theta``, ``eps`` outside the sqrt,
  bias-corrected moments: identical to ``torch.optim.AdamW``).
* **Decay mask** ``"matrices"`` (default): weight decay on parameters with >= 2 dims only, i.e.
  not on biases and norm scales. That is HF Trainer's default split (its
  ``get_decay_parameter_names`` excludes biases and LayerNorm/RMSNorm weights; for the
  families here those are exactly the 1-D parameters; embeddings and the LM head decay).
  ``"all"`` decays everything, as a bare ``torch.optim.AdamW(model.parameters())`` does.
  Stacked layer parameters (``model.layers.*.x`` [L, ...], ``scan_layers``) are judged by
  their per-layer shape: a stacked norm scale [L, d] is not decayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from resofilter_jax.models.stacking import per_layer_shape

DECAY_RULES = ("matrices", "all")
SCHEDULES = ("cosine", "linear", "constant")
TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6)


def warmup_steps(total_steps: int, ratio: float, steps: int = -1) -> int:
    """Warmup length: ``steps`` when >= 0, else ``ceil(ratio * total_steps)`` (HF's rule)."""
    if steps >= 0:
        return int(steps)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {ratio}")
    return math.ceil(ratio * total_steps)


def make_schedule(
    peak: float, total_steps: int, warmup: int, *, kind: str = "cosine", end: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup`` updates, then ``kind`` decay to ``end`` at ``total``.

    Raises:
        ValueError: For an unknown ``kind`` or ``total_steps < 1``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    decay_end = max(total_steps, warmup + 1)  # optax needs a non-empty decay phase
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_end, end)
    if kind == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                optax.linear_schedule(peak, end, decay_end - warmup),
            ],
            [warmup],
        )
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    raise ValueError(f"unknown schedule {kind!r}; use one of {SCHEDULES}")


class ClipState(NamedTuple):
    """Stateless."""


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Scales updates by ``min(1, max_norm / (global_norm + 1e-6))``, as torch does."""

    def init_fn(params: Any) -> ClipState:
        del params
        return ClipState()

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(shapes: Mapping[str, Sequence[int]], rule: str = "matrices") -> dict[str, bool]:
    """{HF name: whether weight decay applies} under ``rule`` (see the module docstring)."""
    if rule == "matrices":
        return {n: len(per_layer_shape(n, s)) >= 2 for n, s in shapes.items()}
    if rule == "all":
        return dict.fromkeys(shapes, True)
    raise ValueError(f"unknown weight-decay rule {rule!r}; use one of {DECAY_RULES}")


def make_optimizer(
    *,
    shapes: Mapping[str, Sequence[int]],
    lr: float,
    total_steps: int,
    warmup: int,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float = 1.0,
    schedule: str = "cosine",
    end_lr: float = 0.0,
    decay: str = "matrices",
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip (if ``clip_norm > 0``) -> AdamW with ``make_schedule``; returns (tx, schedule).

    Args:
        shapes: {HF name: shape} of the trained parameters (the pytree is a flat dict).
    """
    sched = make_schedule(lr, total_steps, warmup, kind=schedule, end=end_lr)
    adamw = optax.adamw(
        sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(shapes, decay)
    )
    if clip_norm > 0:
        return optax.chain(clip_by_global_norm_torch(clip_norm), adamw), sched
    return adamw, sched


def optimizer_from_config(
    optim: Any, shapes: Mapping[str, Sequence[int]], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule, int]:
    """``make_optimizer`` from a config's ``optim`` section; returns (tx, schedule, warmup)."""
    warm = warmup_steps(total_steps, optim.warmup_ratio, optim.warmup_steps)
    tx, sched = make_optimizer(
        shapes=shapes,
        lr=optim.lr,
        total_steps=total_steps,
        warmup=warm,
        weight_decay=optim.weight_decay,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        clip_norm=optim.clip_norm,
        schedule=optim.schedule,
        end_lr=optim.end_lr,
        decay=optim.decay,
    )
    return tx, sched, warm

"""The PyTorch fine-tuning loop the JAX train step is checked against (fp32, CPU).

Per optimizer step, as HF Trainer with gradient accumulation and
``average_tokens_across_devices=True`` computes it: every micro-batch's summed CE over its
target tokens is divided by the target count of the *whole step*, gradients accumulate over
the micro-batches, then ``clip_grad_norm_``, ``AdamW.step()`` and ``LambdaLR.step()``.
The schedule is written out here from its formula (not taken from transformers or optax).

Also here: how trained parameters are compared (:func:`assert_params_close`). Adam divides by
``sqrt(v_hat) + eps``, so where ``sqrt(v_hat)`` is within a few orders of ``eps`` an fp32
rounding difference of the gradient is amplified in the update. Every element is held to
``rtol`` of its tensor (the parity tests' convention), or, where that fails, to the
first-order bound of that amplification, and the bound may be needed by at most 1 in 2000
elements. The bound is for one step from the same state: the parity tests start each step
from the other run's state (``train`` returns AdamW's moments for that), because a rounding
difference amplified at step 1 reaches every later gradient, which the bound does not model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

GRAD_ERR = 3e-6  # fp32 gradient rounding, relative to the tensor's max |g| (measured ~1.5e-6)


class StepRecord(NamedTuple):
    """What the error bound needs of one optimizer step, per parameter name."""

    lr: float
    grad_max: dict[str, float]  # max |g| after clipping
    denom: dict[str, np.ndarray]  # sqrt(v_hat) + eps


def update_bound(records: list[StepRecord], name: str) -> np.ndarray:
    """Per-element bound on the parameter difference caused by GRAD_ERR gradient rounding."""
    allow, g_scale = 0.0, 0.0
    for r in records:
        g_scale = max(g_scale, r.grad_max[name])
        allow = allow + 2 * r.lr * GRAD_ERR * g_scale / r.denom[name]
    return allow


def assert_params_close(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    records: list[StepRecord],
    rtol: float,
) -> None:
    """``got`` equals ``want`` per element to ``rtol`` of the tensor or the Adam bound."""
    plain, total = 0, 0
    for k in want:
        err = np.abs(got[k] - want[k])
        scale = np.abs(want[k])
        ok = err <= rtol * (scale + scale.max())  # the parity tests' convention
        plain, total = plain + int(ok.sum()), total + ok.size
        rounding = 8 * np.finfo(np.float32).eps * scale
        bad = ~ok & (err > update_bound(records, k) + rounding)
        assert not bad.any(), (k, err[bad][:5], want[k][bad][:5])
    assert plain >= total - max(3, total // 2000), (plain, total)


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """lr multiplier of update ``step`` (0-based): linear warmup from 0, then cosine to 0."""
    if step < warmup:
        return step / warmup
    span = max(total, warmup + 1) - warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def train(
    model: torch.nn.Module,
    steps: Sequence[Sequence[dict[str, np.ndarray]]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup: int,
    total: int,
    clip_norm: float,
    decay_matrices_only: bool = True,
) -> list[dict[str, Any]]:
    """Trains ``model`` in place on ``steps`` (each a list of micro-batches).

    Micro-batches hold ``input_ids``, ``attention_mask`` and ``labels`` ([rows, seq], labels
    -100 where not trained on). Returns per step: ``loss`` (token mean over the step),
    ``grad_norm`` (before clipping), ``lr``, and for error analysis per parameter name
    ``grad_max`` (max |g| after clipping) and ``denom`` (``sqrt(v_hat) + eps`` of the update),
    and the state after the step: ``params`` (the state dict), AdamW's ``exp_avg`` and
    ``exp_avg_sq`` per parameter name.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 or not decay_matrices_only]
    no_decay = [p for n, p in params if p.ndim < 2 and decay_matrices_only]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=warmup, total=total)
    )
    model.train()
    out = []
    for micro_batches in steps:
        n_total = sum(int(np.sum(mb["labels"][:, 1:] != -100)) for mb in micro_batches)
        loss_total = 0.0
        for mb in micro_batches:
            ids = torch.from_numpy(mb["input_ids"]).long()
            mask = torch.from_numpy(mb["attention_mask"]).long()
            labels = torch.from_numpy(mb["labels"]).long()
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [b, s, vocab]
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            loss = ce / n_total
            loss.backward()
            loss_total += float(loss.detach())
        lr_now = opt.param_groups[0]["lr"]
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        grad_max = {n: float(p.grad.abs().max()) for n, p in params}  # after clipping
        opt.step()
        sched.step()
        denom, exp_avg, exp_avg_sq = {}, {}, {}  # per parameter name
        for n, p in params:
            state = opt.state[p]
            v_hat = state["exp_avg_sq"] / (1 - betas[1] ** float(state["step"]))
            denom[n] = (v_hat.sqrt() + eps).numpy().copy()  # sqrt(v_hat) + eps of the update
            exp_avg[n] = state["exp_avg"].numpy().copy()
            exp_avg_sq[n] = state["exp_avg_sq"].numpy().copy()
        opt.zero_grad(set_to_none=True)
        out.append(
            {
                "loss": loss_total,
                "grad_norm": float(norm),
                "lr": lr_now,
                "grad_max": grad_max,
                "denom": denom,
                "params": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
                "exp_avg": exp_avg,
                "exp_avg_sq": exp_avg_sq,
            }
        )
    return out

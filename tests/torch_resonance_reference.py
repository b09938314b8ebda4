"""ResoFilter's published resonance loop in PyTorch (docs/DESIGN.md §3.2), for parity tests.

Per sample: restore the original weights, build a fresh optimizer (``torch.optim.AdamW(lr=1e-5)``
with betas 0.9/0.999, eps 1e-8, weight decay 0.01 unless told otherwise), run one
forward/backward on that sample alone (``model(input_ids, labels=labels).loss.backward()``),
take one step, then compute the features of every chosen matrix from ``theta_before -
theta_after``. Nothing here uses the closed form.

For speed only the chosen parameters require gradients (``all_params=True`` puts every
parameter in the optimizer with gradients, as the published loop does; the chosen matrices'
updates are the same either way). The model runs in eval mode (no dropout).

``step_dtype`` different from ``dtype`` runs the model (forward/backward) in ``dtype`` but takes
the optimizer step on ``step_dtype`` copies of the chosen matrices, given the gradients cast to
``step_dtype``: the same torch AdamW step without the fp32 ``before - after`` cancellation, at
fp32 model cost (used for the real-weight test).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

BOUNDS = (1e-6, 5e-6, 9e-6, 1e-5)
QUANTILES = (0.10, 0.25, 0.90, 0.95, 0.99)


def _optimizer(name: str, params: list[torch.nn.Parameter], lr: float, wd: float) -> Any:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    raise ValueError(name)


def features(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """The features of one matrix from its weights before and after the step (torch ops)."""
    diff = (before - after).flatten()  # the reference's difference
    delta = -diff  # the update, after - before
    a = diff.abs()
    b, t = before.flatten(), after.flatten()
    cos = torch.nn.functional.cosine_similarity(b, t, dim=0)
    pearson = torch.corrcoef(torch.stack([b, t]))[0, 1]
    out = {
        "mean_abs": a.mean(),
        "std": delta.std(),
        "max": delta.max(),
        "min": delta.min(),
        "std_abs": a.std(),
        "l1": a.sum(),
        "l2": diff.norm(),
        "cosine": cos,
        "pearson": pearson,
        "cosine_gap": 1 - cos,
        "pearson_gap": 1 - pearson,
    }
    qs = torch.quantile(a, torch.tensor(QUANTILES, dtype=a.dtype))
    for q, v in zip(QUANTILES, qs, strict=True):
        out[f"q{100 * q:g}_abs"] = v
    for bound in BOUNDS:
        out[f"n_abs_le_{bound:g}"] = (a <= bound).sum()
        out[f"n_pos_gt_{bound:g}"] = (delta > bound).sum()
        out[f"n_neg_lt_{bound:g}"] = (delta < -bound).sum()
    return {k: v.item() for k, v in out.items()}


def resonance_loop(
    hf_model: torch.nn.Module,
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str],
    *,
    dtype: torch.dtype = torch.float64,
    optimizer: str = "adamw",
    lr: float = 1e-5,
    weight_decay: float = 0.01,
    all_params: bool = False,
    keep: bool = False,
    step_dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Runs the per-sample loop on a copy of ``hf_model`` in ``dtype``.

    Args:
        examples: (ids [n], labels [n]) per sample, unpadded, -100 on masked positions.
        names: HF names of the chosen matrices.
        keep: Also return each matrix's update ``after - before`` and gradient (numpy).
        step_dtype: dtype of the optimizer step (default: ``dtype``, the literal loop).

    Returns:
        Per sample: ``loss``, ``n_tokens``, ``features`` {name: {feature: value}} and, with
        ``keep``, ``delta`` and ``grad`` {name: array}.
    """
    model = copy.deepcopy(hf_model).to(dtype).eval()
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(all_params or n in names)
    original = {n: p.detach().clone() for n, p in params.items()}
    results = []
    for ids, labels in examples:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
        model.zero_grad(set_to_none=True)
        chosen = list(model.parameters()) if all_params else [params[n] for n in names]
        opt = _optimizer(optimizer, chosen, lr, weight_decay)
        ids_t = torch.from_numpy(np.asarray(ids, np.int64))[None]
        lab_t = torch.from_numpy(np.asarray(labels, np.int64))[None]
        loss = model(input_ids=ids_t, labels=lab_t).loss
        loss.backward()
        grads = {n: params[n].grad.detach().clone() for n in names}
        if step_dtype is None or step_dtype == dtype:
            opt.step()
            before, after = original, {n: params[n].detach() for n in names}
        else:  # the same step on higher-precision copies
            before = {n: original[n].to(step_dtype) for n in names}
            copies = [before[n].clone().requires_grad_(True) for n in names]
            for c, n in zip(copies, names, strict=True):
                c.grad = grads[n].to(step_dtype)
            _optimizer(optimizer, copies, lr, weight_decay).step()
            after = {n: c.detach() for c, n in zip(copies, names, strict=True)}
        res: dict[str, Any] = {
            "loss": loss.item(),
            "n_tokens": int((lab_t[0, 1:] != -100).sum()),
            "features": {n: features(before[n], after[n]) for n in names},
        }
        if keep:
            res["delta"] = {n: (after[n] - before[n]).numpy() for n in names}
            res["grad"] = {n: grads[n].numpy() for n in names}
        results.append(res)
    del model
    return results

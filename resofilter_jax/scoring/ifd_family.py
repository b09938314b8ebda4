"""The IFD family's token-level parts: per-token losses and informative-token IFD (host only).

Every ``ok`` sample of the pair scorers (:mod:`resofilter_jax.scoring.runner`) has a direct and
a conditioned sequence; with ``ifd.token_losses`` the per-position CE of each sequence's
scored tokens is kept, in sequence order, and stored as the list columns
:data:`TOKENS_DIRECT` / :data:`TOKENS_CONDITION` (float32; ``n_tokens_direct`` /
``n_tokens_condition`` values). Their means are ``loss_direct`` / ``loss_condition``.

**Pairing the two lists** (docs/METHODS.md). The conditioned list starts at the first
response token (the prompt predicts it); the direct list starts at the first response token
the response alone can predict: the first one when the tokenizer puts a token in front of
every text (BOS), else the second. With ``n_special`` tokens added around a text (prefix +
suffix; GPT-2 and SmolLM2: 0, Llama: 1) the same response token is at ``direct[j]`` and
``cond[j + a]`` with ``a = 1 - n_special`` (:func:`token_pair_offset`), for every ``j`` where
both exist. Both sequences are cut from the right, so this left pairing also holds under
truncation (where the ends differ). It is exact when the tokens of ``prompt + response`` are
the prompt's followed by the response's (the usual case; ``data.host_tokenize.clean_join``);
where the tokenizer merges across the join, tokens near the join pair up approximately.

**Informative-token IFD** (T-SHIRT, Fu et al., 2025, "Selective IFD"): with the per-token
log-ratio ``delta_t = cond_t - direct_t`` (nats) of each paired token, the informative tokens
are those with ``|delta_t| > threshold`` and::

    ifd_informative = exp(sum of delta_t over informative t / max(1, their number))

(``1.0`` when no paired token is informative, NaN when no token pairs up). The paper sets the
threshold per dataset as a percentile of ``|delta_t|`` over all tokens
(:func:`informative_threshold_at_ratio`); the scorer streams shards, so it takes a fixed
threshold (``ifd.informative_threshold``) and the paper's rule can be applied afterwards to
the stored lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

INFORMATIVE = "ifd_informative"
TOKENS_DIRECT = "token_losses_direct"
TOKENS_CONDITION = "token_losses_condition"
# |delta_t| threshold in nats: the median |delta_t| (T-SHIRT's default of half the tokens),
# 0.067, of SmolLM2-135M-Instruct on the first 160 ShareGPT rows (98 ok, 25,394 paired
# tokens) at max_length 1024, rounded (docs/METHODS.md, Measurements).
DEFAULT_INFORMATIVE_THRESHOLD = 0.07


def token_pair_offset(tokenizer: Any) -> int:
    """``a = 1 - n_special``: ``direct[j]`` pairs with ``cond[j + a]`` (module docstring)."""
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    return 1 - n_special


def paired_deltas(direct: np.ndarray, cond: np.ndarray, offset: int) -> np.ndarray:
    """``cond[j + offset] - direct[j]`` for every ``j`` where both exist (float64).

    Args:
        direct: [n_d] per-token CE of the direct sequence's scored tokens.
        cond: [n_c] per-token CE of the conditioned sequence's scored tokens.
        offset: :func:`token_pair_offset` of the tokenizer.

    Returns:
        [m] per-token log-ratios ``delta_t`` in response-token order.
    """
    d = np.asarray(direct, np.float64)  # [n_d]
    c = np.asarray(cond, np.float64)  # [n_c]
    lo, hi = max(0, -offset), min(d.size, c.size - offset)
    if hi <= lo:
        return np.zeros((0,), np.float64)
    return c[lo + offset : hi + offset] - d[lo:hi]  # [m]


def informative_ifd(direct: np.ndarray, cond: np.ndarray, offset: int, threshold: float) -> float:
    """T-SHIRT's selective IFD of one sample (module docstring); NaN without paired tokens."""
    delta = paired_deltas(direct, cond, offset)  # [m]
    if delta.size == 0:
        return float("nan")
    keep = np.abs(delta) > threshold  # [m] informative tokens
    return float(np.exp(np.sum(delta[keep]) / max(1, int(keep.sum()))))


def informative_ifd_rows(
    directs: Sequence[np.ndarray | None],
    conds: Sequence[np.ndarray | None],
    offset: int,
    threshold: float,
) -> np.ndarray:
    """:func:`informative_ifd` of every row ([n] float64; NaN where a list is None)."""
    return np.array(
        [
            float("nan") if d is None or c is None else informative_ifd(d, c, offset, threshold)
            for d, c in zip(directs, conds, strict=True)
        ],
        np.float64,
    )


def informative_threshold_at_ratio(
    directs: Sequence[np.ndarray | None],
    conds: Sequence[np.ndarray | None],
    offset: int,
    ratio: float,
) -> float:
    """The paper's dataset-level threshold: the ``(1 - ratio)`` quantile of ``|delta_t|`` over
    every paired token of every row (so a fraction ``ratio`` of all tokens is informative).

    Apply it to stored lists (``token_losses_*`` of a merged score file) with
    :func:`informative_ifd_rows`; ``ratio=0.5`` is T-SHIRT's default.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    parts = [
        np.abs(paired_deltas(d, c, offset))
        for d, c in zip(directs, conds, strict=True)
        if d is not None and c is not None
    ]
    every = np.concatenate(parts) if parts else np.zeros((0,))
    if every.size == 0:
        raise ValueError("no paired token in any row")
    return float(np.percentile(every, (1.0 - ratio) * 100.0))


def token_columns(
    status: Sequence[str],
    owner: np.ndarray,
    tokens: Sequence[np.ndarray],
    *,
    offset: int,
    threshold: float | None,
) -> dict[str, Any]:
    """The token-loss list columns (and, with ``threshold``, :data:`INFORMATIVE`) of a group.

    Args:
        status: Final status of every sample (lists and scores only for ``ok`` ones).
        owner: [n_ok] sample of sequence pair k (``IFDSequences.owner``).
        tokens: [2 * n_ok] scored-token CE per sequence (direct, conditioned, ...), float32.
        offset: :func:`token_pair_offset` of the tokenizer.
        threshold: ``|delta_t|`` threshold of the informative column; None: no such column.

    Returns:
        :data:`TOKENS_DIRECT`, :data:`TOKENS_CONDITION` (one float32 array or None per
        sample) and, with ``threshold``, :data:`INFORMATIVE` ([n] float64, NaN where not ok).
    """
    n = len(status)
    direct: list[np.ndarray | None] = [None] * n
    cond: list[np.ndarray | None] = [None] * n
    for k, i in enumerate(np.asarray(owner).tolist()):
        if status[i] == "ok":
            direct[i], cond[i] = tokens[2 * k], tokens[2 * k + 1]
    out: dict[str, Any] = {TOKENS_DIRECT: direct, TOKENS_CONDITION: cond}
    if threshold is not None:
        out[INFORMATIVE] = informative_ifd_rows(direct, cond, offset, threshold)
    return out

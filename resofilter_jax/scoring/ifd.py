"""Superfiltering's IFD score and its reverse (r-IFD): pure device and host functions (no
files, flags or loops).

Every ``ok`` sample contributes two sequences to ONE sequence list, ``2 * k`` (direct: the
target alone) and ``2 * k + 1`` (conditioned: prompt + target), so both go through the
same packed, length-bucketed batches. The device function returns the masked CE of every
position; the host sums each sequence's segment and turns per-sequence results into
per-sample scores (:class:`PairMethod`: IFD's target is the response, r-IFD's the
instruction under a reverse prompt):

    loss = loss_sum / count,  ppl = exp(loss),  ifd = ppl_condition / ppl_direct,
    ifd_loss_ratio = loss_condition / loss_direct.

Token-level columns (per-token losses, informative-token IFD): :mod:`.ifd_family`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from resofilter_jax.data import IFDPair, Segment
from resofilter_jax.models.base import CausalLM
from resofilter_jax.scoring.ifd_family import INFORMATIVE, TOKENS_CONDITION, TOKENS_DIRECT
from resofilter_jax.scoring.losses import token_losses

Array = jax.Array
OK = "ok"


@dataclass(frozen=True)
class PairMethod:
    """A two-sequence score: its column names and the status of a pair without tokens.

    Attributes:
        name: The score column (``ppl_condition / ppl_direct``); ``<name>_loss_ratio`` is
            ``loss_condition / loss_direct``.
        no_tokens: Status of a sample one of whose sequences has no scored token.
        informative: Whether it has T-SHIRT's informative-token column (with token losses).
    """

    name: str
    no_tokens: str
    informative: bool

    @property
    def ratio(self) -> str:
        """The loss-ratio column."""
        return f"{self.name}_loss_ratio"

    def columns(self, tokens: bool = False) -> tuple[str, ...]:
        """Per-sample result columns in output order (after index/id/turn/status); ``tokens``:
        with the token-loss lists (and the informative-token column where it has one)."""
        scores = ["loss_direct", "loss_condition", "ppl_direct", "ppl_condition", self.name]
        scores.append(self.ratio)
        if tokens and self.informative:
            scores.append(INFORMATIVE)
        scores += ["n_tokens_direct", "n_tokens_condition"]
        return tuple(scores + ([TOKENS_DIRECT, TOKENS_CONDITION] if tokens else []))


IFD = PairMethod("ifd", "no_response_tokens", informative=True)
RIFD = PairMethod("rifd", "no_instruction_tokens", informative=False)
PAIR_METHODS = {m.name: m for m in (IFD, RIFD)}

# IFD's per-sample result columns (default settings), in output order.
SCORE_COLUMNS = IFD.columns()


def batch_losses(model: CausalLM, batch: dict[str, Array], *, chunk: int = 128) -> Array:
    """Masked per-position CE of one collated batch (packed or not).

    Args:
        model: The causal LM.
        batch: ``input_ids``, ``attention_mask`` (segment ids) [B, L] int32, ``loss_mask``
            [B, L] float32 and optionally ``positions`` [B, L] int32 (from
            :func:`resofilter_jax.data.collate_packed` or :func:`resofilter_jax.data.collate`).
        chunk: Sequence chunk of the cross-entropy.

    Returns:
        [B, L - 1] fp32: the loss of token t at column t - 1 where it is scored, else 0.
    """
    return token_losses(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["loss_mask"],
        batch.get("positions"),
        chunk=chunk,
    )


def make_batch_fn(
    graphdef: nnx.GraphDef, *, chunk: int = 128
) -> Callable[[nnx.State, dict[str, Array]], Array]:
    """A jitted ``(state, batch) -> per-position CE [B, L - 1]`` for a split NNX model.

    Shardings follow the inputs: a batch split over the ``data`` axis with replicated
    ``state`` gives data-parallel scoring (per-row results stay on their device).
    """

    @jax.jit
    def fn(state: nnx.State, batch: dict[str, Array]) -> Array:
        model = nnx.merge(graphdef, state)
        return batch_losses(model, batch, chunk=chunk)

    return fn


def add_segment_losses(
    ce: np.ndarray,
    segments: Sequence[Segment],
    loss_sum: np.ndarray,
    count: np.ndarray,
    tokens: list[np.ndarray] | None = None,
) -> None:
    """Writes each segment's summed CE (float64 sum) and scored-token count, in place.

    Args:
        ce: [B, L - 1] per-position CE of a batch (from :func:`make_batch_fn`).
        segments: Where each sequence sits in the batch.
        loss_sum, count: [n_seq] per-sequence outputs, indexed by ``Segment.seq``.
        tokens: Optional [n_seq] list that gets each sequence's scored-token CE (float32, in
            token order: the last ``count`` slots of the segment).
    """
    for g in segments:
        part = ce[g.row, g.offset : g.offset + g.length - 1]  # slots predicting its tokens
        loss_sum[g.seq] = float(np.sum(part, dtype=np.float64))
        count[g.seq] = g.scored
        if tokens is not None:
            tokens[g.seq] = np.array(part[part.size - g.scored :], np.float32)  # [scored]


@dataclass(frozen=True)
class IFDSequences:
    """The sequence list of a group of samples (two per ``ok`` sample).

    Attributes:
        seqs: Token ids per sequence; ``seqs[2k]`` direct, ``seqs[2k + 1]`` conditioned.
        starts: First label position per sequence.
        owner: [n_ok] position (in the ``pairs`` list) of the sample of sequence pair k.
    """

    seqs: list[np.ndarray]
    starts: list[int]
    owner: np.ndarray

    @property
    def lengths(self) -> list[int]:
        """Length of every sequence."""
        return [len(s) for s in self.seqs]


def ifd_sequences(pairs: Sequence[IFDPair]) -> IFDSequences:
    """Builds the interleaved direct/conditioned sequence list of the ``ok`` pairs."""
    owner = [i for i, p in enumerate(pairs) if p.status == OK]
    seqs: list[np.ndarray] = []
    starts: list[int] = []
    for i in owner:
        p = pairs[i]
        seqs += [p.direct_ids, p.cond_ids]
        starts += [p.direct_start, p.cond_start]
    return IFDSequences(seqs, starts, np.asarray(owner, np.int64))


NONFINITE = "nonfinite_loss"  # status: response tokens were scored but the loss is NaN/Inf


def ifd_scores(
    pairs: Sequence[IFDPair], owner: np.ndarray, loss_sum: np.ndarray, count: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-sample IFD columns from per-sequence results (:func:`pair_scores` of :data:`IFD`)."""
    return pair_scores(pairs, owner, loss_sum, count, IFD)


def pair_scores(
    pairs: Sequence[IFDPair],
    owner: np.ndarray,
    loss_sum: np.ndarray,
    count: np.ndarray,
    method: PairMethod = IFD,
) -> dict[str, np.ndarray]:
    """Per-sample columns of a two-sequence score from per-sequence results.

    Args:
        pairs: All samples of the group (any status).
        owner: [n_ok] from :class:`IFDSequences`.
        loss_sum, count: [2 * n_ok] per-sequence summed CE and scored-token count, in the
            order of the sequence list.
        method: Which score (:data:`IFD` or :data:`RIFD`): column names and statuses.

    Returns:
        Columns ``status`` (list of str) and ``method.columns()`` ([n] arrays: float64
        scores, NaN where the status is not ``ok``; int64 token counts, 0 there).
    """
    n = len(pairs)
    s = np.asarray(loss_sum, np.float64).reshape(-1, 2)  # [n_ok, 2] (direct, cond)
    c = np.asarray(count, np.float64).reshape(-1, 2)  # [n_ok, 2]
    if s.shape[0] != len(owner) or c.shape != s.shape:
        raise ValueError(f"{len(owner)} ok samples but results of shape {s.shape}, {c.shape}")
    status = [p.status for p in pairs]
    names = method.columns()
    out = {k: np.full(n, np.nan) for k in names[:6]}  # losses, ppls, score, loss ratio
    out["n_tokens_direct"] = np.zeros(n, np.int64)
    out["n_tokens_condition"] = np.zeros(n, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = s / c  # [n_ok, 2]; 0/0 -> NaN (no scored token)
    empty = (c == 0).any(axis=1)  # [n_ok] a sequence kept no scored token
    bad = empty | ~np.isfinite(loss).all(axis=1)  # [n_ok]
    for k in np.nonzero(bad)[0]:
        # Tokens scored but a NaN/Inf loss (overflow, broken weights): never a silent score.
        status[int(owner[k])] = method.no_tokens if empty[k] else NONFINITE
    good = owner[~bad]
    loss = loss[~bad]  # [n_good, 2]
    ppl = np.exp(loss)
    out["loss_direct"][good] = loss[:, 0]
    out["loss_condition"][good] = loss[:, 1]
    out["ppl_direct"][good] = ppl[:, 0]
    out["ppl_condition"][good] = ppl[:, 1]
    out[method.name][good] = ppl[:, 1] / ppl[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[method.ratio][good] = loss[:, 1] / loss[:, 0]  # a zero direct loss: inf / NaN
    out["n_tokens_direct"][good] = c[~bad, 0].astype(np.int64)
    out["n_tokens_condition"][good] = c[~bad, 1].astype(np.int64)
    return {"status": status, **out}

"""The update rules and per-matrix features of the resonance score (pure jnp on one example).

See `resofilter_jax.scoring.resonance` for the closed form of the first AdamW step and what each
feature means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from resofilter_jax.models.platform import target_platform
from resofilter_jax.scoring.projection import ProjectionSpec

Array = jax.Array

RULES = ("adamw", "adam", "sgd")
_DEFAULT_WD = {"adamw": 0.01, "adam": 0.0, "sgd": 0.0}  # torch.optim defaults
AGGREGATES = ("mean", "sum", "max")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCALARS = ("score", "loss", "ppl", "n_tokens")


@dataclass(frozen=True)
class ResonanceSpec:
    """What to measure and how.

    Attributes:
        params: HF names of the chosen parameters (see ``param_select.select_params``).
        rule: Update model: ``adamw`` (default), ``adam`` or ``sgd``.
        lr: Learning rate of the one step.
        eps: Adam epsilon.
        weight_decay: None: the rule's torch default (adamw 0.01, adam/sgd 0).
        aggregate: How ``score`` combines the chosen matrices: mean | sum | max.
        score_feature: The per-matrix feature that ``score`` aggregates.
        bounds: Thresholds of the count features.
        quantiles: Quantiles of ``|delta|`` (in (0, 1)).
        compute_dtype: ``float32`` or ``bfloat16`` (model compute; gradients of the chosen
            matrices and all features stay fp32).
        micro: Examples per device per step; None: derived from ``memory_budget_bytes``.
        memory_budget_bytes: Per-device bytes for per-example gradients, features and
            activations of one step (beyond the resident weights).
        ce_chunk: Sequence chunk of the cross-entropy (bounds the logits held at once).
        projection: Also return each example's gradient of ``params`` randomly projected to
            ``projection.dim`` dims (see `resofilter_jax.scoring.projection`); None: off.
    """

    params: tuple[str, ...]
    rule: str = "adamw"
    lr: float = 1e-5
    eps: float = 1e-8
    weight_decay: float | None = None
    aggregate: str = "mean"
    score_feature: str = "mean_abs"
    bounds: tuple[float, ...] = (1e-6, 5e-6, 9e-6, 1e-5)
    quantiles: tuple[float, ...] = (0.10, 0.25, 0.90, 0.95, 0.99)
    compute_dtype: str = "float32"
    micro: int | None = None
    memory_budget_bytes: int = 4 << 30
    ce_chunk: int = 128
    projection: ProjectionSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        if not self.params or len(set(self.params)) != len(self.params):
            raise ValueError(f"params must be non-empty and distinct, got {self.params}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(DTYPES)}")
        if self.score_feature not in matrix_feature_names(self):
            raise ValueError(f"score_feature {self.score_feature!r} is not a feature")
        if not all(0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must lie in (0, 1), got {self.quantiles}")
        if self.micro is not None and self.micro < 1:
            raise ValueError(f"micro must be >= 1, got {self.micro}")
        if self.lr <= 0 or self.eps < 0 or self.memory_budget_bytes < 1 or self.ce_chunk < 1:
            raise ValueError("lr must be > 0, eps >= 0, memory_budget_bytes and ce_chunk >= 1")
        if self.projection is not None and not isinstance(self.projection, ProjectionSpec):
            raise TypeError(f"projection must be a ProjectionSpec, got {self.projection!r}")

    @property
    def wd(self) -> float:
        """The weight decay in effect."""
        return _DEFAULT_WD[self.rule] if self.weight_decay is None else self.weight_decay


def _bound_tag(b: float) -> str:
    return f"{b:g}"


def matrix_feature_names(spec: ResonanceSpec) -> list[str]:
    """Per-matrix feature names, in output order."""
    names = ["mean_abs", "std", "max", "min", "std_abs", "l1", "l2"]
    names += ["cosine", "pearson", "cosine_gap", "pearson_gap"]
    names += [f"q{100 * q:g}_abs" for q in spec.quantiles]
    for b in spec.bounds:
        t = _bound_tag(b)
        names += [f"n_abs_le_{t}", f"n_pos_gt_{t}", f"n_neg_lt_{t}"]
    return names


def feature_names(spec: ResonanceSpec) -> list[str]:
    """Output column names: ``score, loss, ppl, n_tokens``, then ``reso/<param>/<feature>``."""
    feats = matrix_feature_names(spec)
    return [*SCALARS, *(f"reso/{p}/{f}" for p in spec.params for f in feats)]


def update_delta(theta: Array, grad: Array, spec: ResonanceSpec) -> Array:
    """The first-step update ``theta_after - theta_before`` (fp32, same shape as theta)."""
    t, g = theta.astype(jnp.float32), grad.astype(jnp.float32)
    lr, wd, eps = spec.lr, spec.wd, spec.eps
    if spec.rule == "adamw":
        return -lr * (g / (jnp.abs(g) + eps) + wd * t)
    if spec.rule == "adam":
        g = g + wd * t
        return -lr * (g / (jnp.abs(g) + eps))
    return -lr * (g + wd * t)


def _mean(x: Array) -> Array:
    """Mean of a 1-D array, corrected by a second pass (robust to summation error)."""
    m0 = jnp.mean(x)
    return m0 + jnp.mean(x - m0)


def _angle(a: Array, d: Array) -> tuple[Array, Array]:
    """cos(a, a + d) and 1 - cos(a, a + d) for 1-D a, d, without cancellation.

    With ``c = <a, d> / |a|^2``, a + d has the component ``p = |a| (1 + c)`` along a and
    ``q = |d - c a|`` across it, so ``cos = p / r`` and ``1 - cos = q^2 / (r (r + p))``,
    ``r = sqrt(p^2 + q^2)``.
    """
    na2 = jnp.sum(a * a)
    c = jnp.sum(a * d) / na2
    q2 = jnp.sum(jnp.square(d - c * a))
    p = jnp.sqrt(na2) * (1.0 + c)
    r = jnp.sqrt(p * p + q2)
    cos = p / r
    gap = jnp.where(p > 0, q2 / (r * (r + p)), 1.0 - cos)
    return cos, gap


def _in_turn(pass_j: Callable[[Array], Array], count: int, dtype: jnp.dtype) -> Array:
    """[count] scalars ``pass_j(j)``, j = 0 .. count - 1, computed one after another in a loop.

    For the passes that XLA:CPU cannot fuse into their reduction (comparisons and selects):
    it writes each one's full-size input out and, were they independent ops, would schedule
    them side by side (17 copies of the matrices per example were live at once). In a loop
    one pass's temporary is live at a time, one per example when batched with ``vmap``.
    """
    if count == 0:
        return jnp.zeros((0,), dtype)

    def body(j: Array, acc: Array) -> Array:
        return acc.at[j].set(pass_j(j).astype(dtype))

    return jax.lax.fori_loop(0, count, body, jnp.zeros((count,), dtype))


def _count(mask: Array) -> Array:
    """int32 number of True elements of ``mask``.

    Summed in fp32 below 2**24 elements: every partial sum is then an integer below 2**24,
    exact in fp32 whatever the summation order, and XLA:CPU reduces fp32 batched over slots
    about twice as fast as int32 (measured: feature step of 32 slots 16.1 s -> 11.4 s).
    """
    if mask.size < 2**24:
        return jnp.sum(mask, dtype=jnp.float32).astype(jnp.int32)
    return jnp.sum(mask, dtype=jnp.int32)


def _count_le(x: Array, limits: Array) -> Array:
    """[R] int32: elements of ``x`` [n] at or below each of ``limits`` [R] (one pass each)."""
    return _in_turn(lambda j: _count(x <= limits[j]), len(limits), jnp.int32)


ORDER_SAMPLE = 4096  # elements sampled to bracket each order statistic


def _order_stats(a: Array, ranks: Sequence[int], sample: int = ORDER_SAMPLE) -> Array:
    """Exact order statistics (0-based ranks) of a 1-D non-negative fp32 array, without sorting.

    Bisection on the int32 bit patterns (monotone in the value for non-negative floats): each
    step counts the elements at or below a midpoint per rank, instead of an O(n log n) sort,
    which is slow on CPU. The search starts from a bracket read off a sorted strided sample
    of ``sample`` elements (the sample's order statistics 4 standard deviations either side of
    the rank's position), checked by one counting pass; a bracket that misses falls back to
    the whole range, so the result is exact either way. The bracket typically leaves 11-17
    steps instead of 32. Batched with ``vmap`` (every slot of a microbatch at once), the
    search runs until every row's brackets are closed; closed ones no longer move.

    Returns [len(ranks)] values, ``sorted(a)[k]`` for each rank k.
    """
    if not ranks:
        return jnp.zeros((0,), jnp.float32)
    n = a.shape[0]
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)  # [n]
    need = jnp.asarray(ranks, jnp.int32) + 1  # [R] elements at or below the answer
    m = min(n, sample)
    stride = n // m
    # A reshape, not a strided slice: Mosaic/XLA:TPU tile a strided gather of a large
    # vector badly (gemma-2-2b's up_proj overflowed v5e's scoped VMEM).
    picked = jnp.sort(bits[: m * stride].reshape(m, stride)[:, 0])  # [m] sorted sample
    q = np.asarray(ranks, np.float64) / max(n - 1, 1)  # [R]
    spread = 4.0 * np.sqrt(m * q * (1.0 - q)) + 2.0  # binomial sd of the sample count, padded
    i_lo = np.floor(q * (m - 1) - spread).astype(np.int64)  # [R]
    i_hi = np.ceil(q * (m - 1) + spread).astype(np.int64)  # [R]
    whole_lo, whole_hi = jnp.min(bits) - 1, jnp.max(bits)
    lo = jnp.where(jnp.asarray(i_lo >= 0), picked[np.clip(i_lo, 0, m - 1)] - 1, whole_lo)
    hi = jnp.where(jnp.asarray(i_hi < m), picked[np.clip(i_hi, 0, m - 1)], whole_hi)
    counts = _count_le(bits, jnp.concatenate([lo, hi]))  # [2R]
    r = len(ranks)
    lo = jnp.where(counts[:r] < need, lo, whole_lo)  # invariant: count(<= lo) < need
    hi = jnp.where(counts[r:] >= need, hi, whole_hi)  # invariant: count(<= hi) >= need

    def unfinished(bounds: tuple[Array, Array]) -> Array:
        lo, hi = bounds
        return jnp.any(hi - lo > 1)

    def step(bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2  # [R]
        enough = _count_le(bits, mid) >= need  # [R]
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, hi = jax.lax.while_loop(unfinished, step, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


HISTOGRAM_BITS = 16  # coarse bins of the histogram search: 2**16 int32 counters (256 KiB)


def _running_sum(x: Array) -> Array:
    """Inclusive prefix sum over the last axis as a log-depth scan: ``jnp.cumsum`` lowers to a
    reduce-window that XLA's cost analysis counts as n^2 work (and XLA:CPU ran 2.6x slower)."""
    return jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 1)


def _searchsorted_rows(cumulative: Array, need: Array) -> Array:
    """[R] first index of each row of ``cumulative`` [R, m] (non-decreasing) that is >= need."""
    return jax.vmap(lambda c, k: jnp.searchsorted(c, k, side="left"))(cumulative, need)


def _order_stats_histogram(a: Array, ranks: Sequence[int]) -> Array:
    """Exact order statistics of a 1-D non-negative fp32 array from two histogram passes.

    The same answer as :func:`_order_stats` (radix selection on the int32 bit patterns,
    which are monotone in the value): pass 1 counts the elements per coarse bin (the top
    16 of the 31 significant bits); each rank's coarse bin follows from the
    running count; pass 2 counts, per such bin, the elements by their 15 low bits, which pins
    each rank's exact bit pattern. Integer counts are exact in any order. On XLA:CPU a
    scatter-add pass costs ~8 counting passes of the bisection, which needs 60-90 of them:
    the 10 ranks of the default quantiles of a SmolLM2 up_proj take 15-19 ms instead of
    67-80 (one process, 2 cores; BENCHMARKS.md). Accelerators keep the bisection
    (:func:`order_stats`): TPUs scatter slowly, and on a GPU most of the elements (|delta|
    within ~1% of lr) would contend for the atomics of a few coarse bins (not measured).
    """
    r = len(ranks)
    shift = 31 - HISTOGRAM_BITS  # a non-negative int32 has 31 significant bits
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)  # [n], >= 0
    coarse = bits >> shift  # [n] in [0, 2**16): the top 16 bits
    counts = jnp.zeros(1 << HISTOGRAM_BITS, jnp.int32).at[coarse].add(1)  # pass 1
    running = _running_sum(counts)  # [2**16]
    need = jnp.asarray(ranks, jnp.int32) + 1  # [R] elements at or below the answer
    bin_of = jnp.searchsorted(running, need, side="left").astype(jnp.int32)  # [R]
    below = running[bin_of] - counts[bin_of]  # [R] elements in lower bins
    # One fine histogram per distinct coarse bin (ranks sharing a bin share its slot);
    # elements of no rank's bin go to slot r, which is dropped.
    slot_of_bin = jnp.full(1 << HISTOGRAM_BITS, r, jnp.int32)
    slot_of_bin = slot_of_bin.at[bin_of].min(jnp.arange(r, dtype=jnp.int32))
    fine = bits & ((1 << shift) - 1)  # [n]: the low 15 bits
    index = slot_of_bin[coarse] * (1 << shift) + fine  # [n]
    hist = jnp.zeros((r + 1) << shift, jnp.int32).at[index].add(1)  # pass 2
    hist = hist.reshape(r + 1, 1 << shift)[slot_of_bin[bin_of]]  # [R, 2**15]
    within = _searchsorted_rows(_running_sum(hist), need - below)  # [R]
    answer = (bin_of << shift) + within.astype(jnp.int32)  # [R] bit patterns
    return jax.lax.bitcast_convert_type(answer, jnp.float32)


def order_stats(a: Array, ranks: Sequence[int], method: str = "auto") -> Array:
    """``sorted(a)[k]`` for each rank k of a 1-D non-negative fp32 array, exactly.

    ``method``: ``histogram`` (:func:`_order_stats_histogram`), ``bisect``
    (:func:`_order_stats`), or ``auto``: histogram when the program is compiled for CPU
    (where it was measured faster), else bisect.
    """
    if not ranks:
        return jnp.zeros((0,), jnp.float32)
    if method == "auto":
        method = "histogram" if target_platform() == "cpu" else "bisect"
    if method == "histogram":
        return _order_stats_histogram(a, ranks)
    if method == "bisect":
        return _order_stats(a, ranks)
    raise ValueError(f"order statistics method must be auto | histogram | bisect, got {method!r}")


def _bound_counts(d: Array, bounds: Sequence[float]) -> Array:
    """[3, len(bounds)] int32: elements with ``|d| <= b``, ``d > b``, ``d < -b`` (a pass each)."""
    lim = jnp.asarray(np.tile(np.asarray(bounds, np.float32), 3))  # [3B]
    kind = jnp.asarray(np.repeat(np.arange(3, dtype=np.int32), len(bounds)))  # [3B]

    def count(j: Array) -> Array:
        b = lim[j]
        hit = jnp.where(kind[j] == 0, jnp.abs(d) <= b, jnp.where(kind[j] == 1, d > b, d < -b))
        return _count(hit)

    return _in_turn(count, 3 * len(bounds), jnp.int32).reshape(3, len(bounds))


def matrix_features(theta: Array, delta: Array, spec: ResonanceSpec) -> dict[str, Array]:
    """Scalar features of one matrix's update (all fp32 except int32 counts).

    Batch it with ``vmap`` (matrices, examples); the passes XLA:CPU cannot fuse into their
    reduction run in loops (:func:`_in_turn`), so each example holds a few copies of the matrix
    at once (delta, its bit patterns, one pass), not one per feature.
    """
    t = theta.reshape(-1).astype(jnp.float32)  # [n]
    d = delta.reshape(-1).astype(jnp.float32)  # [n]
    a = jnp.abs(d)  # [n]
    n = d.size
    mean_abs, mean = _mean(a), _mean(d)
    out = {
        "mean_abs": mean_abs,
        "std": jnp.sqrt(jnp.sum(jnp.square(d - mean)) / (n - 1)),
        "max": jnp.max(d),
        "min": jnp.min(d),
        "std_abs": jnp.sqrt(jnp.sum(jnp.square(a - mean_abs)) / (n - 1)),
        "l1": mean_abs * n,
        "l2": jnp.sqrt(jnp.sum(d * d)),
    }
    out["cosine"], out["cosine_gap"] = _angle(t, d)
    out["pearson"], out["pearson_gap"] = _angle(t - _mean(t), d - mean)
    ranks = [q * (n - 1) for q in spec.quantiles]  # torch.quantile 'linear' positions
    floors = [int(math.floor(r)) for r in ranks]
    # x[lo] and x[lo + 1] of each quantile (torch.quantile's linear interpolation)
    wanted = sorted({k for lo in floors for k in (lo, min(lo + 1, n - 1))})
    values = order_stats(a, wanted)  # [len(wanted)]
    at = {k: values[i] for i, k in enumerate(wanted)}
    for q, r, lo in zip(spec.quantiles, ranks, floors, strict=True):
        below, above = at[lo], at[min(lo + 1, n - 1)]
        out[f"q{100 * q:g}_abs"] = below + (r - lo) * (above - below)
    counts = _bound_counts(d, spec.bounds)  # [3, n_bounds]
    for i, b in enumerate(spec.bounds):
        tag = _bound_tag(b)
        out[f"n_abs_le_{tag}"], out[f"n_pos_gt_{tag}"], out[f"n_neg_lt_{tag}"] = counts[:, i]
    return {k: out[k] for k in matrix_feature_names(spec)}


# fp32 copies of one matrix that its features hold per example, the picked update included
# (measured on XLA:CPU, vmapped over 1-32 examples: 5.3-5.5).
FEATURE_COPIES = 6


def histogram_bytes(quantiles: int) -> int:
    """Device bytes one example's histogram search (:func:`_order_stats_histogram`) holds:
    int32 coarse counts, their running sum and the bin -> slot table (2**16 each), and per
    rank (two per quantile: x[lo], x[lo + 1]) a fine histogram, its gathered copy and its
    running sum (2**15 each), plus the dropped slot. Independent of the matrix size."""
    ranks = 2 * quantiles
    return 4 * (3 * (1 << HISTOGRAM_BITS) + (3 * ranks + 1) * (1 << (31 - HISTOGRAM_BITS)))


def feature_bytes(shapes: Sequence[tuple[int, ...]], quantiles: int) -> int:
    """Device bytes that one example's features of matrices of these shapes hold at once.

    Same-shaped matrices take turns (:func:`features_in_turn`): per distinct shape, the
    update of the matrix of the turn and its feature temporaries, ``FEATURE_COPIES`` fp32
    copies of one matrix, and the histograms of its ``quantiles`` (:func:`histogram_bytes`;
    an upper bound where the bisection runs); the loops of different shapes may run side by
    side. (Not per example, so not counted: the turn's theta, one copy per step.)
    """
    per_shape = histogram_bytes(quantiles) if quantiles else 0
    return sum(FEATURE_COPIES * 4 * math.prod(s) + per_shape for s in set(map(tuple, shapes)))


def features_in_turn(
    thetas: Sequence[Array], grads: Sequence[Array], spec: ResonanceSpec
) -> dict[str, Array]:
    """Features [k] of k same-shaped matrices (thetas, grads: k arrays of one shape).

    The matrices take turns in a loop (each turn computes its matrix's update in a
    ``lax.switch`` branch), so batched with ``vmap`` over examples the temporaries live at
    once are those of one matrix for every example: ``FEATURE_COPIES`` copies of it per
    example (:func:`feature_bytes`), whatever k.
    """
    k = len(thetas)
    flat_t = [t.reshape(-1) for t in thetas]  # [n] each
    deltas = [
        lambda t=t, g=g: update_delta(t, g.reshape(-1), spec)
        for t, g in zip(flat_t, grads, strict=True)
    ]  # -> [n] each
    if k == 1:
        return {name: v[None] for name, v in matrix_features(flat_t[0], deltas[0](), spec).items()}

    def turn(i: Array, acc: dict[str, Array]) -> dict[str, Array]:
        t = jax.lax.switch(i, [lambda x=x: x for x in flat_t])  # [n]
        d = jax.lax.switch(i, deltas)  # [n]
        return {name: acc[name].at[i].set(v) for name, v in matrix_features(t, d, spec).items()}

    shapes = jax.eval_shape(lambda: matrix_features(flat_t[0], deltas[0](), spec))
    acc = {name: jnp.zeros((k, *s.shape), s.dtype) for name, s in shapes.items()}
    return jax.lax.fori_loop(0, k, turn, acc)

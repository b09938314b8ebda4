"""Packed resonance vectorises over slots: every slot of a row at once, projections per step.

Batched over examples with ``vmap`` and with same-shaped matrices taking turns
(`reso_features.features_in_turn`), the features equal those of one example and one matrix at
a time (order statistics and counts also equal numpy's); the temporaries they hold are what
the microbatch sizing counts (`reso_features.feature_bytes`); and the packed step has no
per-slot loop or branch: features run for the slots of a row at once, rows in turn, and the
projection matrix is generated once per step for every slot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.registry import build_model
from resofilter_jax.scoring.projection import ProjectionSpec
from resofilter_jax.scoring.reso_features import (
    ResonanceSpec,
    feature_bytes,
    features_in_turn,
    matrix_feature_names,
    matrix_features,
    update_delta,
)
from resofilter_jax.scoring.resonance import make_resonance_fn

SPEC = ResonanceSpec(params=("a", "b", "c", "v"), quantiles=(0.1, 0.5, 0.9, 0.99))
SHAPES = {"a": (24, 40), "b": (24, 40), "c": (24, 40), "v": (50,)}  # a group of 3, one alone
ORDER_BASED = ("max", "min", *(f for f in matrix_feature_names(SPEC) if f.startswith("q")))


def slot_grads(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """[5, *shape] fp32 gradients of five slots: plain, empty (zeros), near eps with zeros,
    few distinct values (repeated quantiles), and large."""
    g = rng.standard_normal((5, *shape)).astype(np.float32)
    g[0] *= 1e-3
    g[1] = 0.0
    g[2] = np.where(rng.random(shape) < 0.2, 0.0, g[2] * 1e-8)
    g[3] = np.round(g[3] * 2) * 1e-4
    g[4] *= 10.0
    return g


def numpy_order_features(delta: np.ndarray, spec: ResonanceSpec) -> dict[str, Any]:
    """max, min, quantiles of |delta| (torch 'linear', fp32 as ours) and the counts."""
    d = delta.ravel()
    a = np.sort(np.abs(d))
    out: dict[str, Any] = {"max": d.max(), "min": d.min()}
    for q in spec.quantiles:
        r = q * (len(a) - 1)
        lo = int(np.floor(r))
        below, above = a[lo], a[min(lo + 1, len(a) - 1)]
        out[f"q{100 * q:g}_abs"] = below + np.float32(r - lo) * (above - below)
    for b in spec.bounds:
        f32 = np.float32(b)
        out[f"n_abs_le_{b:g}"] = np.sum(np.abs(d) <= f32)
        out[f"n_pos_gt_{b:g}"] = np.sum(d > f32)
        out[f"n_neg_lt_{b:g}"] = np.sum(d < -f32)
    return out


def test_features_of_all_slots_at_once_equal_one_example_at_a_time() -> None:
    rng = np.random.default_rng(0)
    thetas = {p: (0.1 * rng.standard_normal(s)).astype(np.float32) for p, s in SHAPES.items()}
    grads = {p: slot_grads(rng, s) for p, s in SHAPES.items()}  # [5, *shape] each
    groups = (["a", "b", "c"], ["v"])

    def all_slots(gr: dict[str, jax.Array]) -> dict[str, jax.Array]:  # one slot's [4] each
        parts = [
            features_in_turn([thetas[p] for p in ps], [gr[p] for p in ps], SPEC) for ps in groups
        ]
        return {k: jnp.concatenate([f[k] for f in parts]) for k in parts[0]}

    got = jax.device_get(jax.jit(jax.vmap(all_slots))(grads))  # [5, 4] each
    one = jax.jit(lambda t, g: matrix_features(t, update_delta(t, g, SPEC), SPEC))
    names = [p for ps in groups for p in ps]
    for i in range(5):
        for j, p in enumerate(names):
            want = jax.device_get(one(thetas[p], grads[p][i]))
            delta = np.asarray(update_delta(jnp.asarray(thetas[p]), jnp.asarray(grads[p][i]), SPEC))
            exact = numpy_order_features(delta, SPEC)
            for f in matrix_feature_names(SPEC):
                where = f"slot {i}, {p}, {f}"
                if f in ORDER_BASED or f.startswith("n_"):
                    assert got[f][i, j] == want[f], (where, got[f][i, j], want[f])
                else:  # sums: the batched reduction may add in another order (the gaps of
                    # the empty slot, whose update is parallel to theta, are ~1e-30 noise)
                    np.testing.assert_allclose(
                        got[f][i, j], want[f], rtol=2e-6, atol=1e-20, err_msg=where
                    )
                if f in exact:  # interpolated quantiles: within an ulp (fma or not)
                    np.testing.assert_allclose(got[f][i, j], exact[f], rtol=2e-7, err_msg=where)
    assert len(set(got["q50_abs"][:, 0].tolist())) == 5  # the slots really differ


def test_feature_memory_is_what_the_microbatch_sizing_counts() -> None:
    """All examples at once (>= one copy of the matrix each), the matrices in turn and the
    passes in loops (<= feature_bytes each, plus the theta of the turn, shared)."""
    shape, k = (256, 192), 3
    spec = ResonanceSpec(params=tuple(f"m{j}" for j in range(k)))
    thetas = [jax.ShapeDtypeStruct(shape, jnp.float32)] * k
    n = int(np.prod(shape))
    for examples in (6,):  # per-example loop: 5 copies in all, fails the lower bound
        grads = [jax.ShapeDtypeStruct((examples, *shape), jnp.float32)] * k
        fn = jax.vmap(lambda gs, th: features_in_turn(th, gs, spec), in_axes=(0, None))
        stats = jax.jit(fn).lower(grads, thetas).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        temp = stats.temp_size_in_bytes
        bound = examples * feature_bytes([shape] * k, len(spec.quantiles)) + 4 * n
        assert examples * 4 * n <= temp <= bound, (examples, temp / (4 * n))


def _control_flow_above(jaxpr: Any, primitive: str, above: tuple = ()) -> set[tuple]:
    """The chains of control-flow equations (cond, while; scan as its length) around each
    ``primitive``."""
    found = set()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == primitive:
            found.add(above)
        here = {"cond": ("cond",), "while": ("while",), "scan": (eqn.params.get("length"),)}
        chain = above + here.get(name, ())
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _control_flow_above(inner, primitive, chain)
    return found


def test_packed_step_runs_slots_together_and_projects_once() -> None:
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg |= dict(num_attention_heads=4, num_key_value_heads=2, model_type="llama")
    model = build_model(config_from_hf(cfg), seed=0)  # random tiny Llama
    params = ("model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight")
    spec = ResonanceSpec(params=params, projection=ProjectionSpec(dim=8, block=100), micro=2)
    fn = make_resonance_fn(model, spec)
    seg = np.repeat([1, 2, 3, 0], [20, 16, 8, 4]).astype(np.int32)  # 3 examples in 4 slots
    pos = np.arange(48) - np.repeat([0, 20, 36, 44], [20, 16, 8, 4])
    ids = np.random.default_rng(0).integers(1, 64, (2, 48)).astype(np.int32)
    rows = {"input_ids": ids, "attention_mask": np.stack([seg, seg])}  # one step of 2 rows
    rows["positions"] = np.stack([pos, pos]).astype(np.int32)
    rows["labels"] = np.where(rows["attention_mask"] > 0, ids, IGNORE_INDEX).astype(np.int32)
    args = (fn._theta, fn._rest, fn._inputs(rows, 4))
    jaxpr = jax.make_jaxpr(lambda t, r, b: fn._batch(t, r, b, slots=4))(*args).jaxpr
    # The projection's random rows: in its block loop (or the last partial block), once for
    # the 8 slots of the step, never in a loop or a branch per slot or row.
    chains = _control_flow_above(jaxpr, "random_bits")
    assert chains and all(len(c) <= 1 and "cond" not in c for c in chains), chains
    # The features' order statistics (histograms on CPU): the 4 slots of a row at once,
    # the 2 rows in turn (a loop of 2, a branch skipping rows without an example), never
    # one slot at a time.
    # (A scatter-add outside the features' row branch is not theirs.)
    chains = {c for c in _control_flow_above(jaxpr, "scatter-add") if "cond" in c}
    assert chains and all(2 in c and 8 not in c and 4 not in c for c in chains), chains

"""Superfiltering.D: texts, embeddings, the facility-location kernel, greedy and the two stages."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resofilter_jax.data import Record, encode_truncated, iter_raw_rows, to_records
from resofilter_jax.parallel import make_mesh
from resofilter_jax.selection import embeddings as em
from resofilter_jax.selection import facility_location as dv
from resofilter_jax.selection.diversity import superfiltering_d, superfiltering_d_details


def _points(seed: int, n: int = 40, d: int = 8, dups: bool = True) -> np.ndarray:
    """Random points; with ``dups`` some exact duplicates (a pair, a triple) and two copies
    of the centroid (the most central point, so the copies tie for the first pick)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)  # [n, d]
    if dups:
        x[7] = x[3]
        x[30] = x[31] = x[12]
        x[20] = x[35] = x.mean(axis=0)
    return x


def _numpy_kernel(x: np.ndarray, metric: str) -> np.ndarray:
    """submodlib's dense kernel written out in float64."""
    x = x.astype(np.float64)
    if metric == "euclidean":
        dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # [n, n]
        sim = np.exp(-dist / x.shape[1])
    else:
        norm = np.linalg.norm(x, axis=1)
        denom = norm[:, None] * norm[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            sim = np.where(denom > 0, (x @ x.T) / denom, 0.0)
    np.fill_diagonal(sim, 1.0)
    return sim


# --- texts ------------------------------------------------------------------------------------


def test_diversity_text_follows_the_reference() -> None:
    with_input = Record(0, "Add", input="2 3", output="5")
    no_input = Record(1, "Hi", output="Hello")
    assert em.diversity_text(with_input) == "Add\n2 3\n5"
    assert em.diversity_text(no_input) == "Hi\n\nHello"  # Alpaca rows always have `input`
    assert em.diversity_text(no_input, input_line=False) == "Hi\nHello"
    assert em.diversity_text(with_input, "instruction") == "Add\n2 3\n"
    assert em.diversity_text(with_input, "response") == "5"
    assert em.diversity_texts([with_input, no_input], "response") == ["5", "Hello"]
    with pytest.raises(ValueError, match="emb_type"):
        em.diversity_text(with_input, "query")  # type: ignore[arg-type]


# --- kernel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kernel_matches_numpy_formula(metric: str) -> None:
    x = _points(0, n=70, d=12, dups=False)
    x[5] = 0.0  # a zero vector: cosine 0 off the diagonal, 1 on it
    want = _numpy_kernel(x, metric)
    ids = jnp.arange(70, dtype=jnp.int32)
    block = np.asarray(dv.similarity_block(jnp.asarray(x), jnp.asarray(x), ids, ids, metric=metric))
    np.testing.assert_allclose(block, want, rtol=0, atol=3e-7)
    dense = dv.SimilarityKernel(x, metric=metric, tile=32)  # several tiles, mirrored
    streamed = dv.SimilarityKernel(x, metric=metric, memory_budget=0, block_rows=16)
    assert dense.dense is not None and streamed.dense is None
    np.testing.assert_array_equal(dense.dense, dense.dense.T)  # exactly symmetric
    for kernel in (dense, streamed):
        got = kernel.rows(np.arange(70))
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
        assert (np.diag(got) == 1.0).all()
    if metric == "cosine":
        assert (want[5, np.arange(70) != 5] == 0).all()


def test_kernel_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="metric"):
        dv.SimilarityKernel(np.ones((3, 2)), metric="dot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        dv.SimilarityKernel.from_matrix(np.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="cannot pick"):
        dv.facility_location(np.ones((3, 2), np.float32), 4)


# --- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_lazy_equals_naive_greedy(seed: int, metric: str) -> None:
    x = _points(seed)
    n = x.shape[0]
    for kernel in (
        dv.SimilarityKernel(x, metric=metric),
        dv.SimilarityKernel(x, metric=metric, memory_budget=0, block_rows=8),
    ):
        for ties in ("low", "high"):
            # k = n runs into the zero-gain tail (duplicates of picked points, then all).
            naive = dv.naive_greedy(kernel, n, ties=ties)
            lazy = dv.lazy_greedy(kernel, n, ties=ties, refresh=3)
            np.testing.assert_array_equal(lazy.indices, naive.indices)
            np.testing.assert_array_equal(lazy.gains, naive.gains)
            assert sorted(lazy.indices.tolist()) == list(range(n))
            zero = lazy.gains == 0  # twins of picked points: stopIfZeroGain=False takes them
            assert zero.sum() == 4 and zero[-4:].all()
            assert lazy.evaluations < naive.evaluations / 3


def test_exact_ties_follow_the_rule() -> None:
    x = _points(3)
    kernel = dv.SimilarityKernel(x)
    # Rows 20 and 35 (the centroid) are identical and have the largest column sum.
    assert np.array_equal(kernel.fixed_rows([20])[0][[20, 35]], [dv.UNIT, dv.UNIT])
    assert np.array_equal(
        np.delete(kernel.fixed_rows([20])[0], [20, 35]),
        np.delete(kernel.fixed_rows([35])[0], [20, 35]),
    )
    sums = kernel.rows(np.arange(x.shape[0])).sum(axis=0)
    assert set(np.flatnonzero(sums == sums.max())) == {20, 35}
    low = dv.facility_location(kernel, 5, ties="low")
    high = dv.facility_location(kernel, 5, ties="high")
    assert low[0] == 20 and high[0] == 35
    assert 35 not in low and 20 not in high  # the twin's gain is 0 once one is in
    # A hand-made matrix: items 1 and 3 tie first, then 0 and 2; the last pick gains 0.
    s = np.array(
        [
            [1.0, 0.5, 0.0, 0.5],
            [0.5, 1.0, 0.5, 1.0],
            [0.0, 0.5, 1.0, 0.5],
            [0.5, 1.0, 0.5, 1.0],
        ]
    )
    m = dv.SimilarityKernel.from_matrix(s)
    assert dv.facility_location(m, 4, ties="low").tolist() == [1, 0, 2, 3]
    assert dv.facility_location(m, 4, ties="high").tolist() == [3, 2, 0, 1]
    assert dv.facility_location(m, 4, ties="low", optimizer="naive").tolist() == [1, 0, 2, 3]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_objective_monotone_and_first_pick(metric: str) -> None:
    x = _points(4, n=150, d=10, dups=False)
    kernel = dv.SimilarityKernel(x, metric=metric)
    res = dv.lazy_greedy(kernel, 40)
    # First pick: the row of maximal column sum (of the float64 formula, no near tie here).
    s = _numpy_kernel(x, metric)
    col = np.maximum(s, 0).sum(axis=0)
    assert np.sort(col)[-1] - np.sort(col)[-2] > 1e-4
    assert res.indices[0] == int(np.argmax(col))
    values = [dv.facility_location_value(kernel, res.indices[:t]) for t in range(41)]
    assert values[0] == 0.0
    assert np.all(np.diff(values) > 0)  # monotone (all gains positive here)
    np.testing.assert_allclose(np.diff(values), res.gains, rtol=0, atol=1e-9)
    assert np.all(np.diff(res.gains) <= 0)  # submodular: greedy gains never grow
    # Each pick's gain is the best marginal gain over all remaining items.
    chosen: list[int] = []
    for j, gain in zip(res.indices[:6], res.gains[:6], strict=True):
        base = dv.facility_location_value(kernel, chosen)
        best = max(
            dv.facility_location_value(kernel, [*chosen, c]) - base
            for c in range(150)
            if c not in chosen
        )
        assert gain == pytest.approx(best, abs=1e-9)
        chosen.append(int(j))


def test_streamed_kernel_picks_like_dense() -> None:
    x = _points(5, n=200, d=16, dups=False)
    dense = dv.facility_location(x, 30)
    streamed = dv.facility_location(x, 30, memory_budget=0, block_rows=16)
    np.testing.assert_array_equal(streamed, dense)


# --- Superfiltering.D -------------------------------------------------------------------------


def _ifd_order(ifd: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """The reference's IFD stage: IFD < threshold, descending, ties in file order."""
    ok = np.flatnonzero(np.isfinite(ifd) & (ifd < threshold))
    return ok[np.lexsort((ok, -ifd[ok]))]


def test_superfiltering_d_end_to_end() -> None:
    rng = np.random.default_rng(7)
    n = 300
    ifd = rng.uniform(0.2, 1.3, size=n)
    ifd[rng.choice(n, 20, replace=False)] = np.nan
    ifd[10], ifd[11] = 0.95, 0.95  # a tie: 10 comes first
    emb = rng.normal(size=(n, 12)).astype(np.float32)
    order = _ifd_order(ifd)
    top = order[:120]

    calls: list[np.ndarray] = []

    def embed(positions: np.ndarray) -> np.ndarray:
        calls.append(positions.copy())
        return emb[positions]

    got = superfiltering_d(order, embed, ifd_num=120, fla_num=25)
    assert len(calls) == 1 and np.array_equal(calls[0], top)  # only the IFD subset
    np.testing.assert_array_equal(got, superfiltering_d(order, emb, ifd_num=120, fla_num=25))
    want = top[dv.facility_location(emb[top], 25)]  # selection order, not file order
    np.testing.assert_array_equal(got, want)
    assert len(set(got.tolist())) == 25 and set(got.tolist()) <= set(top.tolist())
    assert not np.array_equal(got, np.sort(got))
    assert np.all(ifd[got] < 1.0)
    # ifd_num=None keeps the whole order; too large an fla_num is refused.
    all_rows = superfiltering_d(order, emb, ifd_num=None, fla_num=5)
    assert np.array_equal(all_rows, order[dv.facility_location(emb[order], 5)])
    with pytest.raises(ValueError, match="fla_num"):
        superfiltering_d(order, emb, ifd_num=10, fla_num=11)
    # The details: the same picks, their gains summing to f(S) over the IFD subset.
    res = superfiltering_d_details(order, emb, ifd_num=120, fla_num=25, ties="high")
    np.testing.assert_array_equal(res.candidates, top)
    np.testing.assert_array_equal(
        res.positions, top[dv.facility_location(emb[top], 25, ties="high")]
    )
    kernel = dv.SimilarityKernel(emb[top])
    row_of = {int(p): i for i, p in enumerate(top)}  # position -> row of emb[top]
    picked = [row_of[int(p)] for p in res.positions]
    assert res.objective == dv.facility_location_value(kernel, picked) > 0
    assert np.all(np.diff(res.gains) <= 0) and res.embed_seconds >= 0 <= res.greedy_seconds


# --- embeddings from the scoring model --------------------------------------------------------


def _sharegpt_texts(path, n: int) -> list[str]:
    rows = itertools.islice(iter_raw_rows(path, on_error="status", allow_truncated=True), 300)
    records = [r for r in to_records(rows, "sharegpt", on_error="status") if r.ok and r.output]
    records.sort(key=lambda r: len(r.instruction) + len(r.output))
    picked = records[:: max(1, len(records) // n)][:n]  # short and long ones
    return em.diversity_texts(picked)


def _pooled_one_by_one(model, ids: list[list[int]]) -> np.ndarray:
    """Mean of ``model.hidden_states`` over each unpadded sequence (one at a time), L2-normed."""
    graphdef, state = nnx.split(model)
    hidden_states = jax.jit(lambda st, x: nnx.merge(graphdef, st).hidden_states(x))
    out = []
    for seq in ids:
        h = hidden_states(state, jnp.asarray([seq], jnp.int32))  # [1, n, hidden]
        mean = np.asarray(h, np.float64)[0].mean(axis=0)  # [hidden]
        out.append(mean / np.linalg.norm(mean))
    return np.stack(out)  # [texts, hidden]


def test_embed_texts_matches_unpadded_model(smollm2, sharegpt_path) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    texts = _sharegpt_texts(sharegpt_path, 8)
    ids = encode_truncated(tok, texts, 32)
    lengths = sorted(len(s) for s in ids)
    assert lengths[0] < 20 and lengths[-1] == 32  # both padded and truncated rows
    want = _pooled_one_by_one(model, ids)
    # One bucket, batches of 8 rows split over 2 devices (data parallel; 8 virtual CPU
    # devices on 2 cores compile and run several times slower): one compiled shape.
    mesh = make_mesh(jax.devices()[:2])
    kw = {"max_length": 32, "token_budget": 8 * 32, "min_bucket": 32, "mesh": mesh}
    got = em.embed_texts(model, tok, texts, **kw)
    assert got.shape == (8, model.config.hidden_size) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    # Other batch compositions and row positions (reordered, with repeats): same rows.
    order = [5, 0, 7, 3, 0, 6, 2, 4, 1, 5, 6, 6, 2, 7, 3, 1]  # two full batches
    regrouped = em.embed_texts(model, tok, [texts[i] for i in order], progress=True, **kw)
    np.testing.assert_allclose(regrouped, got[order], rtol=1e-5, atol=2e-6)
    assert em.embed_texts(model, tok, [], max_length=32).shape == (0, model.config.hidden_size)

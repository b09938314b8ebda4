"""The chunked cross-entropy (`scoring.losses.chunked_token_ce`, `chunked_ce_sum`) and their
custom VJPs.

The VJP keeps each token's gradient with respect to its own hidden state from the forward
pass, so the gradient of the hidden states spends no recomputed logits; the weight's gradient
recomputes them only when the weight is differentiated. Checked against plain autodiff of
the unchunked CE (fp32, 1e-5) and by the FLOPs XLA counts for each gradient. The weighted
sum (the training loss) computes its whole gradient in the forward pass: no recomputed logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resofilter_jax.scoring.losses import chunked_ce_sum, chunked_token_ce

B, S, D, V = 2, 37, 16, 211  # S is not a multiple of the chunks below: the last one is padded


def _inputs() -> tuple[jax.Array, ...]:
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(k[0], (B, S, D))
    weight = jax.random.normal(k[1], (V, D)) * 0.5
    targets = jax.random.randint(k[2], (B, S), 0, V)
    cotangent = jax.random.normal(k[3], (B, S))
    return hidden, weight, targets, cotangent


def _reference_ce(h: jax.Array, w: jax.Array, t: jax.Array, softcap: float | None) -> jax.Array:
    logits = jnp.einsum("bsd,vd->bsv", h, w)  # [B, S, V] at once, plain autodiff
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _check_bf16_gradients(grad: Any, h: jax.Array, w: jax.Array, t: jax.Array, g: jax.Array):
    """``grad(bf16 hidden, fp32 head)`` gives a bf16 and an fp32 gradient, within 2% (of the
    largest entry) of fp32 autodiff of ``sum(g * CE)`` at the bf16-rounded hidden states."""
    dh, dw = grad(h.astype(jnp.bfloat16), w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda h, w: jnp.sum(g * _reference_ce(h, w, t, None)), argnums=(0, 1))(
            h.astype(jnp.bfloat16).astype(jnp.float32), w
        )
    for got, ref in zip((dh.astype(jnp.float32), dw), want, strict=True):
        assert float(jnp.max(jnp.abs(got - ref))) < 0.02 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [8, 64])
def test_gradients_equal_plain_autodiff(softcap: float | None, chunk: int) -> None:
    """Values and both gradients (hidden, weight; together and alone) equal autodiff's."""
    h, w, t, g = _inputs()

    def ours(h: jax.Array, w: jax.Array) -> jax.Array:
        ce = chunked_token_ce(h, w, t, dtype=jnp.float32, softcap=softcap, chunk=chunk)
        return jnp.sum(g * ce)

    def ref(h: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(g * _reference_ce(h, w, t, softcap))

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours(h, w), ref(h, w), rtol=1e-5)
        want = jax.grad(ref, argnums=(0, 1))(h, w)
        both = jax.jit(jax.grad(ours, argnums=(0, 1)))(h, w)
        alone = (jax.jit(jax.grad(ours, argnums=0))(h, w), jax.jit(jax.grad(ours, argnums=1))(h, w))
    for got in (both, alone):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_bf16_cotangents_keep_the_input_dtypes() -> None:
    """bf16 hidden states get a bf16 gradient; fp32 master weights an fp32 one."""
    h, w, t, g = _inputs()

    def loss(h: jax.Array, w: jax.Array) -> jax.Array:
        ce = chunked_token_ce(h, w, t, dtype=jnp.bfloat16, chunk=8)
        return jnp.sum(g * ce)

    _check_bf16_gradients(jax.grad(loss, argnums=(0, 1)), h, w, t, g)


def test_hidden_gradient_recomputes_no_logits() -> None:
    """FLOPs of the gradients, one chunk (no loop for the cost analysis to miss): the hidden
    states' alone costs the forward's logits plus one product of the same size (no third);
    with the weight's, the logits are recomputed once more and the weight product added."""
    h, w, t, g = _inputs()

    def loss(h: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(g * chunked_token_ce(h, w, t, dtype=jnp.float32, chunk=S))

    def flops(fn: object) -> float:
        return jax.jit(fn).lower(h, w).cost_analysis()["flops"]

    gemm = 2.0 * B * S * D * V  # one [B*S, D] x [D, V] product
    forward = flops(loss)
    hidden_only = flops(jax.grad(loss, argnums=0)) - forward
    both = flops(jax.grad(loss, argnums=(0, 1))) - forward
    assert forward >= gemm
    assert 0.9 * gemm < hidden_only < 1.5 * gemm, (hidden_only / gemm, forward / gemm)
    assert 2.9 * gemm < both < 3.5 * gemm, (both / gemm, forward / gemm)


def _weights() -> jax.Array:
    """[B, S] token weights: a 0/1 mask with some fractional weights (any weights must work)."""
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    keep = jax.random.bernoulli(k[0], 0.7, (B, S))
    return keep * jax.random.uniform(k[1], (B, S), minval=0.5, maxval=1.5)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [8, 64])
def test_weighted_sum_gradients_equal_plain_autodiff(softcap: float | None, chunk: int) -> None:
    """The weighted CE sum and its gradients (hidden, head, weights: every subset) equal
    autodiff of the unchunked CE, also under an outer scale (the cotangent is not 1)."""
    h, w, t, _ = _inputs()
    m = _weights()

    def ours(h: jax.Array, w: jax.Array, m: jax.Array) -> jax.Array:
        return 0.37 * chunked_ce_sum(h, w, t, m, dtype=jnp.float32, softcap=softcap, chunk=chunk)

    def ref(h: jax.Array, w: jax.Array, m: jax.Array) -> jax.Array:
        return 0.37 * jnp.sum(m * _reference_ce(h, w, t, softcap))

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(jax.jit(ours)(h, w, m), ref(h, w, m), rtol=1e-5)
        want = jax.grad(ref, argnums=(0, 1, 2))(h, w, m)
        for argnums in [(0, 1, 2), (0, 1), (0,), (1,), (2,)]:
            got = jax.jit(jax.grad(ours, argnums=argnums))(h, w, m)
            for i, a in zip(argnums, got, strict=True):
                b = want[i]
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("chunk", [8, 64])
def test_weighted_sum_bf16_dtypes(chunk: int) -> None:
    """bf16 hidden states get a bf16 gradient, the fp32 head an fp32 one, close to fp32's
    (also with one chunk, where XLA unrolls the loop around the head's gradient)."""
    h, w, t, _ = _inputs()
    m = _weights()

    def loss(h: jax.Array, w: jax.Array) -> jax.Array:
        return chunked_ce_sum(h, w, t, m, dtype=jnp.bfloat16, chunk=chunk)

    _check_bf16_gradients(jax.jit(jax.grad(loss, argnums=(0, 1))), h, w, t, m)


def test_weighted_sum_gradient_recomputes_no_logits() -> None:
    """FLOPs, one chunk: the gradient of hidden and head together costs the forward's logits
    plus two products of their size (hidden's and the head's), not three (no recomputed
    logits, as :func:`chunked_token_ce` needs for a per-token cotangent)."""
    h, w, t, _ = _inputs()
    m = _weights()

    def loss(h: jax.Array, w: jax.Array) -> jax.Array:
        return chunked_ce_sum(h, w, t, m, dtype=jnp.float32, chunk=S)

    def flops(fn: object) -> float:
        return jax.jit(fn).lower(h, w).cost_analysis()["flops"]

    gemm = 2.0 * B * S * D * V  # one [B*S, D] x [D, V] product
    forward = flops(loss)
    both = flops(jax.grad(loss, argnums=(0, 1))) - forward
    assert forward >= gemm
    assert 1.9 * gemm < both < 2.5 * gemm, (both / gemm, forward / gemm)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [8, 64])
def test_scored_tokens_equal_plain_autodiff(softcap: float | None, chunk: int) -> None:
    """With ``scored``, the scored tokens' CE and the gradients (hidden, weight) equal
    autodiff's of the masked CE; the other tokens are 0."""
    h, w, t, g = _inputs()
    scored = _weights() != 0

    def ours(h: jax.Array, w: jax.Array) -> jax.Array:
        return chunked_token_ce(
            h, w, t, dtype=jnp.float32, softcap=softcap, chunk=chunk, scored=scored
        )

    def ref(h: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.where(scored, _reference_ce(h, w, t, softcap), 0.0)

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(jax.jit(ours)(h, w), ref(h, w), rtol=1e-5, atol=1e-6)
        want = jax.grad(lambda h, w: jnp.sum(g * ref(h, w)), argnums=(0, 1))(h, w)
        got = jax.jit(jax.grad(lambda h, w: jnp.sum(g * ours(h, w)), argnums=(0, 1)))(h, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_unscored_tokens_are_not_computed() -> None:
    """Tokens of weight 0 (and unscored ones) are sorted behind the scored ones, in order, and
    the chunks holding none of these are skipped: NaN hidden states there reach no result
    (computed, they would make every sum NaN), while scored tokens placed at the rows' ends
    are sorted in front and come out as autodiff's."""
    h, w, t, _ = _inputs()
    scored = jnp.zeros((B, S), bool).at[:, S - 5 :].set(True)  # 10 tokens: one chunk of 16
    computed = scored.at[0, :6].set(True)  # ... and the first 6 unscored tokens fill it up
    h_nan = jnp.where(computed[..., None], h, jnp.nan)
    m = scored.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        ce = jax.jit(
            lambda h: chunked_token_ce(h, w, t, dtype=jnp.float32, chunk=8, scored=scored)
        )(h_nan)
        want = jnp.where(scored, _reference_ce(h, w, t, None), 0.0)
        np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-6)

        def total(h: jax.Array, w: jax.Array) -> jax.Array:
            return chunked_ce_sum(h, w, t, m, dtype=jnp.float32, chunk=8)

        value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(h_nan, w)
        ref_grads = jax.grad(lambda h, w: jnp.sum(m * _reference_ce(h, w, t, None)), (0, 1))(h, w)
    np.testing.assert_allclose(value, jnp.sum(want), rtol=1e-5)
    np.testing.assert_allclose(grads[0], jnp.where(scored[..., None], ref_grads[0], 0.0), atol=1e-6)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-5, atol=1e-6)


def test_tokens_are_sorted_per_device_of_the_traced_mesh() -> None:
    """Under ``parallel.traced_on`` the tokens are sorted within each device's rows (a sort
    across the sharded batch would gather it), with the same results as without a mesh."""
    from resofilter_jax.parallel import batch_sharding, make_mesh, traced_on
    from resofilter_jax.scoring.losses import _layout

    mesh = make_mesh(jax.devices()[:2])
    h, w, t, _ = _inputs()
    m = _weights()
    with traced_on(mesh):
        assert _layout(t.shape, 8, m != 0).groups == 2
    assert _layout(t.shape, 8, m != 0).groups == 1

    def total(h: jax.Array, w: jax.Array) -> jax.Array:
        return chunked_ce_sum(h, w, t, m, dtype=jnp.float32, chunk=8)

    fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    with jax.default_matmul_precision("highest"):
        want = fn(h, w)
        with traced_on(mesh):
            got = fn(jax.device_put(h, batch_sharding(mesh)), w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

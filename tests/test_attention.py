"""Attention backends (models/attention.py) against the reference, and how `auto` chooses.

Every backend that runs on CPU (xla; pallas_gpu and splash in Pallas interpret mode; cudnn's
argument plumbing through the XLA implementation) runs tiny random models of every family and
is compared with the reference backend on one batch holding a packed row (three segments,
positions restarting, trailing padding) and a right-padded unpacked row: logits at real
tokens, the masked token loss, and its gradient w.r.t. every parameter (the backward pass of
training and resonance). Tolerances (fp32): loss 1e-5 relative, logits 1e-5 x max |logit|,
gradients 1e-4 absolute (measured differences are ~1e-7 to 1e-6; see the lead's report).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resofilter_jax.models import attention
from resofilter_jax.models.attention import (
    configure_attention,
    model_features,
    resolve_attention,
    self_attention,
)
from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.registry import build_model

VOCAB, SEQ, WINDOW = 64, 24, 6
LOSS_RTOL, LOGIT_RTOL, GRAD_ATOL = 1e-5, 1e-5, 1e-4

_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_GEMMA = dict(_TINY, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW)
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        model_type="gpt2", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4
    ),
    "llama": dict(_TINY, model_type="llama"),  # GQA, no window
    # Llama architecture with a full layer, then a sliding one (and q/k/v biases)
    "qwen2_sliding": dict(
        _TINY,
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    "gemma2": dict(
        _GEMMA, model_type="gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=8.0
    ),
    "gemma3": dict(_GEMMA, model_type="gemma3_text", sliding_window_pattern=2),
}
# Backends that run on CPU, and the families whose features they can express.
CPU_CASES = [
    ("xla", "gpt2"),
    ("xla", "qwen2_sliding"),
    ("xla", "gemma3"),
    ("pallas_gpu", "gpt2"),
    ("pallas_gpu", "llama"),
    ("splash", "gpt2"),
    ("splash", "qwen2_sliding"),
    ("splash", "gemma2"),
    ("splash", "gemma3"),
]


def _batch() -> tuple[jax.Array, jax.Array, jax.Array]:
    """ids, segment-id mask, positions [2, SEQ]: row 0 packed (9 + 8 + 5 tokens, 2 padding),
    row 1 one sequence of 17 tokens, right-padded. Every segment is longer than WINDOW."""
    segs = np.zeros((2, SEQ), np.int32)
    pos = np.zeros((2, SEQ), np.int32)
    start = 0
    for sid, n in enumerate((9, 8, 5), 1):
        segs[0, start : start + n] = sid
        pos[0, start : start + n] = np.arange(n)
        start += n
    segs[1, :17] = 1
    pos[1] = np.arange(SEQ)
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, SEQ)) * (segs > 0)
    return jnp.asarray(ids), jnp.asarray(segs), jnp.asarray(pos)


@functools.cache
def _model(family: str) -> CausalLM:
    """A tiny random model with O(1) logits (weights scaled up, norm weights perturbed)."""
    model = build_model(config_from_hf(FAMILIES[family]), seed=0)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        x * 7.5 if x.ndim > 1 else x + 0.2 * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _loss_fn(model: CausalLM, ids: jax.Array, segs: jax.Array, pos: jax.Array) -> Any:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p: Any) -> tuple[jax.Array, jax.Array]:
        out = nnx.merge(graphdef, p, rest)(ids, segs, pos)
        logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))  # [b, s-1, vocab]
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [b, s-1]
        valid = (segs[:, 1:] > 0) & (segs[:, 1:] == segs[:, :-1])  # next token, same segment
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid), out.logits

    # LLVM -O0: these graphs are tiny, and compiling them is most of the test time.
    fast = {"xla_backend_optimization_level": 0}
    return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=fast), params


# Families whose layers all attend alike run scanned (one kernel instance to compile).
SCANNED = ("gpt2", "llama")


def _run(family: str, backend: str, *, scan: bool | None = None) -> tuple[Any, Any, Any]:
    """(loss, logits [b, s, vocab], grads) of `family` with `backend` on the test batch."""
    scan = family in SCANNED if scan is None else scan
    model = _model(family)
    model.attention, model.scan_layers = backend, scan
    try:
        fn, params = _loss_fn(model, *_batch())
        (loss, logits), grads = fn(params)
    finally:
        model.attention, model.scan_layers = "reference", False
    return loss, logits, grads


@functools.cache
def _reference(family: str) -> tuple[Any, Any, Any]:
    return _run(family, "reference")


def _assert_close(family: str, got: tuple[Any, Any, Any]) -> None:
    loss, logits, grads = got
    ref_loss, ref_logits, ref_grads = _reference(family)
    real = np.asarray(_batch()[1]) > 0
    assert np.isfinite(np.asarray(logits)).all()  # padding positions too
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=LOSS_RTOL)
    want = np.asarray(ref_logits)[real]
    np.testing.assert_allclose(
        np.asarray(logits)[real], want, rtol=0, atol=LOGIT_RTOL * np.abs(want).max()
    )
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        np.testing.assert_allclose(g, np.asarray(r), rtol=0, atol=GRAD_ATOL, err_msg=str(path))


@pytest.mark.parametrize(("backend", "family"), CPU_CASES)
def test_backend_matches_reference_forward_and_gradients(backend: str, family: str) -> None:
    _assert_close(family, _run(family, backend))


def test_cases_cover_every_family_and_feature() -> None:
    assert {f for _, f in CPU_CASES} == set(FAMILIES)
    qwen2 = config_from_hf(FAMILIES["qwen2_sliding"])
    assert qwen2.arch == "llama" and model_features(qwen2) == (WINDOW, None)
    assert [qwen2.is_sliding(i) for i in range(2)] == [False, True]
    assert model_features(config_from_hf(FAMILIES["gemma2"])) == (WINDOW, 2.0)
    gemma3 = config_from_hf(FAMILIES["gemma3"])
    assert model_features(gemma3) == (WINDOW, None)
    assert [gemma3.is_sliding(i) for i in range(2)] == [True, False]
    assert model_features(config_from_hf(FAMILIES["gpt2"])) == (None, None)


def test_scanned_layers_pick_the_window_per_layer() -> None:
    """With scan_layers the sliding flag is traced: the window is chosen by lax.cond."""
    _assert_close("gemma3", _run("gemma3", "xla", scan=True))


def test_cudnn_arguments_through_the_xla_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN cannot run on CPU: its call (causal, sequence lengths, window) goes to XLA."""
    calls = []
    original = jax.nn.dot_product_attention

    def fake(*args: Any, implementation: str, **kw: Any) -> jax.Array:
        assert implementation == "cudnn"
        calls.append(kw)
        return original(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(3, SEQ, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, SEQ, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray((np.arange(SEQ)[None] < np.array([[SEQ], [17], [0]])).astype(np.int32))
    real = np.asarray(mask) > 0
    for window in (None, WINDOW):
        kw = dict(scale=0.4, sliding_window=window)

        def loss(q: Any, k: Any, v: Any, backend: str, kw: Any = kw) -> jax.Array:
            out = self_attention(q, k, v, mask, backend=backend, **kw)
            return jnp.sum(jnp.where(mask[..., None, None] > 0, jnp.sin(out), 0.0)), out

        fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
        (_, got), g_got = fn(q, k, v, "cudnn")
        (_, want), g_want = fn(q, k, v, "reference")
        assert np.isfinite(np.asarray(got)).all()  # the all-padding row too
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
        for a, b in zip(g_got, g_want, strict=True):
            assert np.isfinite(np.asarray(a)).all()
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=GRAD_ATOL)
        self_attention(q, k, v, mask, backend="cudnn", **kw)  # eager: concrete arguments
        assert calls[-1]["is_causal"] is True
        assert calls[-1]["local_window_size"] == (None if window is None else (WINDOW - 1, 0))
        np.testing.assert_array_equal(calls[-1]["query_seq_lengths"], [SEQ, 17, 1])


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "case", "message"),
    [
        ("xla", dict(softcap=50.0), "soft-cap"),
        ("cudnn", dict(platform="cpu"), "needs a GPU"),
        ("cudnn", dict(platform="gpu", packed=True), "packed"),
        ("cudnn", dict(platform="gpu", softcap=50.0), "soft-cap"),
        ("cudnn", dict(platform="gpu", dtype=jnp.float32), "bf16/fp16"),
        ("pallas_gpu", dict(platform="gpu", sliding_window=4096), "sliding-window"),
        ("pallas_gpu", dict(platform="gpu", softcap=50.0), "soft-cap"),
        ("pallas_gpu", dict(platform="tpu"), "cannot run on TPU"),
        ("splash", dict(platform="gpu"), "cannot run on GPU"),
        ("flash", {}, "unknown attention backend"),
    ],
)
def test_explicit_backend_that_cannot_express_the_case_is_refused(
    name: str, case: dict[str, Any], message: str
) -> None:
    args = dict(platform="cpu", packed=False, sliding_window=None, softcap=None, dtype=None)
    with pytest.raises(ValueError, match=message):
        resolve_attention(name, **{**args, **case})


def test_entry_point_refuses_unsupported_features() -> None:
    q = jnp.zeros((1, 8, 2, 8))
    mask = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="soft-cap"):
        self_attention(q, q, q, mask, scale=1.0, softcap=5.0, backend="xla")
    with pytest.raises(ValueError, match="sliding-window"):
        self_attention(q, q, q, mask, scale=1.0, sliding_window=4, backend="pallas_gpu")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        self_attention(q, q, q, mask, scale=1.0, backend="auto")
    with pytest.raises(ValueError, match="sliding-window"):  # through a model
        _run("qwen2_sliding", "pallas_gpu")


def test_configure_attention_refuses_and_sets_the_model() -> None:
    model = build_model(config_from_hf(FAMILIES["gemma2"]), seed=0)
    with pytest.raises(ValueError, match="model.attention='xla'.*soft-cap"):
        configure_attention(model, "xla", packed=False, platform="cpu")
    assert model.attention == "reference"
    record = configure_attention(model, "splash", packed=True, platform="tpu")
    assert record["backend"] == "splash" and model.attention == "splash"
    record = configure_attention(model, "auto", packed=True, platform="cpu")
    assert record == {"requested": "auto", "backend": "reference", "reason": record["reason"]}
    assert model.attention == "reference"


# --------------------------------------------------------------------------- auto


@pytest.mark.parametrize(
    ("case", "backend"),
    [
        (dict(platform="cpu"), "reference"),
        (dict(platform="cpu", packed=True, sliding_window=4096, softcap=50.0), "reference"),
        (dict(platform="tpu"), "splash"),
        (dict(platform="tpu", packed=True, sliding_window=4096, softcap=50.0), "splash"),
        (dict(platform="gpu", dtype=jnp.bfloat16), "cudnn"),
        (dict(platform="cuda", dtype=jnp.bfloat16, sliding_window=4096), "cudnn"),
        (dict(platform="gpu", dtype=jnp.bfloat16, packed=True), "pallas_gpu"),
        (dict(platform="gpu", dtype=jnp.float32), "pallas_gpu"),  # cuDNN: bf16/fp16 only
        (dict(platform="gpu", dtype=jnp.bfloat16, packed=True, sliding_window=4096), "xla"),
        (dict(platform="gpu", dtype=jnp.float32, sliding_window=4096), "xla"),
        (dict(platform="gpu", dtype=jnp.bfloat16, softcap=50.0), "reference"),
        (dict(platform="gpu", packed=True, sliding_window=4096, softcap=50.0), "reference"),
    ],
)
def test_auto_choice(case: dict[str, Any], backend: str) -> None:
    args = dict(packed=False, sliding_window=None, softcap=None, dtype=None)
    got, reason = resolve_attention("auto", **{**args, **case})
    assert got == backend, reason
    assert reason


def test_auto_logs_its_choice_once(caplog: pytest.LogCaptureFixture) -> None:
    attention._LOGGED.clear()
    args = dict(platform="gpu", packed=True, sliding_window=4096, softcap=None, dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="resofilter_jax.attention"):
        for _ in range(3):
            assert resolve_attention("auto", **args)[0] == "xla"
    lines = [r.getMessage() for r in caplog.records if r.name == "resofilter_jax.attention"]
    assert len(lines) == 1, lines
    assert "auto -> xla" in lines[0] and "sliding-window" in lines[0]

"""The mixed-precision contract (`resofilter_jax.models.precision`), checked structurally.

Every dot_general that the bf16 forward (each model family), its gradient (training), the
packed resonance step and the SFT train step lower to must accumulate in fp32: its result is
fp32, or both operands are fp32. The check reads the lowered StableHLO, i.e. exactly what XLA
receives, custom_vjp backward passes and scans included. `model.matmul_precision` must reach
the HLO's dot precision config.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.models import reference
from support.scoring import packed_batch, tiny_batch

from resofilter_jax.data import SFTExample
from resofilter_jax.models import precision
from resofilter_jax.models.registry import build_model, load_state_dict
from resofilter_jax.scoring.losses import token_losses
from resofilter_jax.scoring.param_select import select_params
from resofilter_jax.scoring.resonance import ResonanceSpec, make_resonance_fn
from resofilter_jax.training.sft_data import collate_rows, packed_rows
from resofilter_jax.training.trainer import make_step_fn, split_model

FAMILIES = ["gpt2", "llama", "qwen2", "gemma2", "gemma3"]
_DOT = re.compile(
    r"stablehlo\.dot_general.*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)"
)


def _elem(tensor_type: str) -> str:
    return tensor_type[len("tensor<") : -1].split("x")[-1]


def dot_types(hlo: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every dot_general in StableHLO text."""
    found = [tuple(_elem(t) for t in m.groups()) for m in _DOT.finditer(hlo)]
    assert len(found) == hlo.count("stablehlo.dot_general"), "unparsed dot_general"
    return found


def assert_fp32_accumulation(hlo: str) -> int:
    """Every dot has an fp32 result or fp32 operands; returns how many low-precision dots."""
    dots = dot_types(hlo)
    assert dots, "no dot_general lowered"
    bad = [d for d in dots if d[2] != "f32" and not (d[0] == d[1] == "f32")]
    assert not bad, f"dots without fp32 accumulation: {bad}"
    mixed = [d for d in dots if d[0] != d[1]]
    assert not mixed, f"dots with mixed operand dtypes (run as fp32 GEMMs): {mixed}"
    return sum(d[0] == "bf16" for d in dots)


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract as a GPU, a TPU or a CPU with bf16 units runs it (whatever this CPU has)."""
    monkeypatch.setattr(precision, "native_low_precision_matmul", lambda: True)


def bf16_model(name: str):
    case = reference(name)
    model = build_model(case.config, dtype=jnp.bfloat16, param_dtype=jnp.float32, seed=None)
    load_state_dict(model, case.state_dict, ignore=case.ignore, strict=True)
    return model, case


def _loss(model, ids, mask) -> jax.Array:
    loss_mask = (mask > 0).astype(jnp.float32)
    return jnp.sum(token_losses(model, ids, mask, loss_mask, chunk=8))


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_forward_and_gradient_accumulate_in_fp32(name: str) -> None:
    model, case = bf16_model(name)
    ids, mask = jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)
    fwd = jax.jit(lambda m, i, a: (m(i, a).logits, _loss(m, i, a))).lower(model, ids, mask)
    assert assert_fp32_accumulation(fwd.as_text()) > 0
    grad = jax.jit(jax.grad(_loss)).lower(model, ids, mask)
    assert assert_fp32_accumulation(grad.as_text()) > 0


def test_packed_resonance_step_accumulates_in_fp32() -> None:
    model, _ = bf16_model("llama")
    names = select_params(model, param_type="mlp.up_proj.weight")
    fn = make_resonance_fn(model, ResonanceSpec(params=tuple(names), compute_dtype="bfloat16"))
    arrays, _ = packed_batch(tiny_batch("llama"), [[0, 1, 2]], 64)
    assert assert_fp32_accumulation(fn.lower(arrays, slots=4).as_text()) > 0


def test_train_step_accumulates_in_fp32() -> None:
    model, case = bf16_model("llama")
    parts, params = split_model(model)
    rng = np.random.default_rng(0)
    examples = []
    for i, n in enumerate((12, 20, 9)):
        ids = rng.integers(3, case.config.vocab_size, size=n).astype(np.int32)
        labels = ids.copy()
        labels[:3] = -100
        examples.append(SFTExample(index=i, ids=ids, labels=labels, status="ok"))
    rows = packed_rows(examples, max_length=32)
    batch = collate_rows(rows, np.arange(len(rows)), accum=1, length=32, pad_id=0)
    step = jax.jit(make_step_fn(parts, optax.adamw(1e-3), ce_chunk=16))
    opt_state = optax.adamw(1e-3).init(params)
    hlo = step.lower(params, opt_state, {k: jnp.asarray(v) for k, v in batch.items()}).as_text()
    assert assert_fp32_accumulation(hlo) > 0


def test_cpu_without_bf16_units_widens_the_operands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_low_precision_matmul", lambda: False)
    model, case = bf16_model("llama")
    ids, mask = jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)
    for fn in (lambda m, i, a: _loss(m, i, a), jax.grad(_loss)):
        dots = dot_types(jax.jit(fn).lower(model, ids, mask).as_text())
        assert dots and all(d == ("f32", "f32", "f32") for d in dots), dots
    with_native = jax.jit(_loss)
    monkeypatch.setattr(precision, "native_low_precision_matmul", lambda: True)
    native = float(jax.jit(_loss)(model, ids, mask))
    monkeypatch.setattr(precision, "native_low_precision_matmul", lambda: False)
    widened = float(with_native(model, ids, mask))
    assert widened == pytest.approx(native, rel=1e-4)  # same products, other summation order


@pytest.mark.parametrize("value", precision.MATMUL_PRECISIONS)
def test_matmul_precision_reaches_the_hlo(value: str) -> None:
    case = reference("llama")
    model = build_model(case.config, seed=0)
    ids = jnp.asarray(case.input_ids)
    with precision.matmul_precision_scope(value):
        hlo = jax.jit(lambda m, i: m(i).logits).lower(model, ids).as_text()
    configs = re.findall(r"stablehlo\.dot_general[^:]*?precision = \[(\w+), (\w+)\]", hlo)
    want = value.upper()  # DEFAULT may also be written as no attribute at all
    assert want == "DEFAULT" or len(configs) == hlo.count("stablehlo.dot_general") > 0
    assert all(c == (want, want) for c in configs)


def test_low_precision_operands_keep_the_native_path_under_highest() -> None:
    model, case = bf16_model("llama")
    with precision.matmul_precision_scope("highest"):
        hlo = jax.jit(lambda m, i: m(i).logits).lower(model, jnp.asarray(case.input_ids)).as_text()
    for line in hlo.splitlines():
        if "stablehlo.dot_general" in line and "xbf16>, tensor<" in line:
            assert "precision = [DEFAULT, DEFAULT]" in line, line


def test_unknown_matmul_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="matmul_precision"):
        precision.check_matmul_precision("tf32")


@pytest.mark.parametrize(
    "spec,shapes",
    [("ni,oi->no", ((5, 7), (3, 7))), ("bkqd,bktd->bkqt", ((2, 2, 5, 4), (2, 2, 6, 4)))],
)
def test_einsum_gradients(spec: str, shapes) -> None:
    """fp32: exactly autodiff of jnp.einsum; bf16: close to it (bf16-rounded operands)."""
    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    a, b = jax.random.normal(ka, shapes[0]), jax.random.normal(kb, shapes[1])
    out_shape = jnp.einsum(spec, a, b).shape
    w = jax.random.normal(kc, out_shape)

    def ref(a, b):
        return jnp.sum(w * jnp.einsum(spec, a, b, precision="highest"))

    def ours(a, b, dtype):
        return jnp.sum(w * precision.einsum(spec, a, b, dtype=dtype, out_dtype=jnp.float32))

    want = jax.grad(ref, argnums=(0, 1))(a, b)
    with precision.matmul_precision_scope("highest"):
        got32 = jax.grad(ours, argnums=(0, 1))(a, b, jnp.float32)
    got16 = jax.grad(ours, argnums=(0, 1))(a, b, jnp.bfloat16)
    for g, g32, g16 in zip(want, got32, got16, strict=True):
        np.testing.assert_allclose(g32, g, rtol=1e-6, atol=1e-6)
        assert g16.dtype == jnp.float32
        np.testing.assert_allclose(g16, g, rtol=0, atol=0.05 * float(jnp.abs(g).max()))


@pytest.mark.parametrize("transposed", [True, False])
def test_cpu_weight_gradients_do_not_contract_the_lhs_leading_index(transposed: bool) -> None:
    """XLA:CPU runs a bf16 dot that contracts its LHS's leading index as an fp32 dot; the
    contract's backward transposes an operand first (a row-major copy), so no compiled dot
    of a linear layer's gradient contracts LHS dimension 0, and the gradient is unchanged."""
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (32, 16))  # [n, in]
    w = jax.random.normal(kw, (24, 16) if transposed else (16, 24))

    def loss(x, w):
        y = precision.linear(x, w, transposed=transposed, dtype=jnp.bfloat16, out_dtype=jnp.float32)
        return jnp.sum(y * y)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = grad.lower(x, w).compile().as_text()
    dots = [line for line in compiled.splitlines() if " dot(" in line]
    assert dots and not [d for d in dots if "lhs_contracting_dims={0}" in d], dots
    _, gw = grad(x, w)
    xb, wb = (t.astype(jnp.bfloat16).astype(jnp.float32) for t in (x, w))
    y = xb @ (wb.T if transposed else wb)  # fp32 products of the bf16 operands
    ct = (2 * y).astype(jnp.bfloat16).astype(jnp.float32)
    want = ct.T @ xb if transposed else xb.T @ ct
    np.testing.assert_allclose(gw, want, rtol=0, atol=0.01 * float(jnp.abs(want).max()))


def compiled_dots(hlo: str) -> list[tuple[str, str, str, str]]:
    """(result, lhs, rhs element types, the dot's dimension attributes) of every dot in
    compiled HLO text (operand types looked up from their definitions)."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\), ([^m]*)", hlo)
    return [(res, types[a], types[b], dims) for res, a, b, dims in dots]


def test_cpu_attention_gradient_runs_bf16_dots() -> None:
    """The compiled bf16 attention (forward and gradient, several causal blocks) keeps every
    dot on bf16 operands: no transpose folded into a dot's operand (XLA:CPU then converts the
    operands to fp32), no contraction of the LHS's leading non-batch index (the key and value
    gradients); and its gradient matches fp32's to bf16 accuracy."""
    from resofilter_jax.models.layers import attention_mask_bias, dot_product_attention

    keys = jax.random.split(jax.random.key(2), 4)
    b, s, h, kv, d = 2, 64, 4, 2, 16
    q = jax.random.normal(keys[0], (b, s, h, d))
    k, v = (jax.random.normal(x, (b, s, kv, d)) for x in keys[1:3])
    ct = jax.random.normal(keys[3], (b, s, h, d))
    mask = attention_mask_bias(jnp.ones((b, s), jnp.int32))

    def loss(q, k, v, dtype):
        out = dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, scale=0.25, chunk=16
        )
        return jnp.sum(out.astype(jnp.float32) * ct)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    dots = compiled_dots(grad.lower(q, k, v, jnp.bfloat16).compile().as_text())
    assert len(dots) >= 12, dots  # 4 blocks x (2 forward + 4 backward) products, some fused
    assert all(lhs == rhs == "bf16" and res == "f32" for res, lhs, rhs, _ in dots), dots
    assert not [x for x in dots if "lhs_contracting_dims={2}" in x[3]], dots
    got = grad(q, k, v, jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        want = grad(q, k, v, jnp.float32)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=0.03 * float(jnp.abs(w).max()))

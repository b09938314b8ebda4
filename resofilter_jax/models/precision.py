"""The mixed-precision contract of resofilter_jax, and the one helper that implements it.

The contract, for models/, scoring/ and training/:

* Parameters are stored in ``param_dtype`` (fp32 by default) and cast to the compute ``dtype``
  where they are used.
* Every matmul / einsum (projections, both attention products, the LM head, the cross-entropy
  logits, the packed per-segment gradients) takes its operands in the compute dtype and
  **accumulates in fp32** (``preferred_element_type=float32``); the result is cast back to the
  compute dtype where the next op wants activations, and kept fp32 where the next op is a
  softmax, a logsumexp or a loss. All of them go through :func:`einsum` below.
* Softmax, norms, losses, the closed-form AdamW update and every resonance feature are fp32,
  and so are MLP activations: ``act(gate) * up`` takes the fp32 upcast of the projections'
  outputs and rounds once to the compute dtype (bf16 elementwise math on a CPU is a convert
  pair around every op: the SmolLM2 forward at [2, 1024] ran 7% faster on one AMX core).
* In the backward pass the same holds: the cotangent of a matmul output is cast to the compute
  dtype, and both transposed products run with compute-dtype operands and fp32 accumulation
  (:func:`einsum` carries a ``custom_vjp`` for this; plain autodiff would pair an fp32
  cotangent with a bf16 operand, which XLA runs as an fp32 GEMM).
* On a CPU the weight gradient of a 2-D product (``no,ni->oi``: the token index, contracted,
  leads both operands) is computed with one operand copied into its transpose first (see
  :func:`_operand_gradient`): XLA:CPU runs that contraction as an fp32 dot otherwise.
* On a CPU without bf16 units (no AVX512_BF16 / AMX-BF16) the bf16 operands are widened to
  fp32 before the matmul (:func:`native_low_precision_matmul`): bf16 values are exact in fp32,
  so the products and the fp32 sums are the same, at the speed of the fp32 kernels.

Why it matters: an einsum with bf16 operands and a bf16 *result* runs at fp32 speed on
XLA:CPU (measured on an AMX Xeon: 120-180 GFLOP/s, against 370-1020 GFLOP/s for the same GEMM
with fp32 accumulation), and fp32 accumulation is the standard contract on GPUs and TPUs.

The *matmul precision* (how fp32 operands are multiplied) is a run setting,
``model.matmul_precision``, applied with :func:`matmul_precision_scope` around the whole run:
``default`` is the backend's default (CPU: fp32; GPU: TF32 for fp32 operands; TPU: one bf16
pass), ``high`` (GPU: TF32; TPU: three bf16 passes) and ``highest`` (fp32 everywhere). Parity
recipes set ``highest`` so that "float32" means fp32 on every backend. The setting is about
fp32 operands: matmuls with bf16 operands always run the native bf16 path (their precision is
pinned to DEFAULT), so a bf16 run under ``highest`` is not slowed down.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from resofilter_jax.models.platform import target_platform

Array = jax.Array

MATMUL_PRECISIONS = ("default", "high", "highest")


def check_matmul_precision(name: str) -> str:
    """Returns ``name`` if it is a supported ``model.matmul_precision``, else raises."""
    if name not in MATMUL_PRECISIONS:
        raise ValueError(
            f"model.matmul_precision={name!r} is not one of {', '.join(MATMUL_PRECISIONS)}"
        )
    return name


@contextlib.contextmanager
def matmul_precision_scope(name: str) -> Iterator[None]:
    """Applies ``model.matmul_precision`` to everything traced inside (jit keys include it)."""
    with jax.default_matmul_precision(check_matmul_precision(name)):
        yield


def _transposed_specs(spec: str) -> tuple[str, str]:
    """Einsum specs of the two operand cotangents of ``spec`` (explicit letters only)."""
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    for operand, other in ((a, b), (b, a)):
        if any(c not in out and c not in other for c in operand):
            raise ValueError(f"einsum {spec!r}: an operand index is summed on its own")
    return f"{out},{b}->{a}", f"{out},{a}->{b}"


def _f32_acc(spec: str, a: Array, b: Array) -> Array:
    # The run's matmul precision is about fp32 operands; low-precision operands always take the
    # native path (an explicit DEFAULT is not overridden by jax.default_matmul_precision).
    prec = None if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=prec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, a: Array, b: Array) -> Array:
    """fp32-accumulated einsum of low-precision operands with a matching backward pass."""
    return _f32_acc(spec, a, b)


def _lp_fwd(spec: str, a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    return _f32_acc(spec, a, b), (a, b)


def _row_major(x: Array) -> Array:
    """x pinned to the row-major layout (XLA may not fold a neighbouring transpose into it)."""
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def _swap_last(x: Array) -> Array:
    """x [..., m, n] -> [..., n, m] as a real row-major copy."""
    return _row_major(jnp.swapaxes(x, -1, -2))


def materialized(x: Array) -> Array:
    """``x`` (typically a transpose) as a row-major copy on CPU; unchanged elsewhere.

    XLA:CPU folds a transpose into the layout of the dot that reads it, and runs a bf16 dot
    whose operand has a non-row-major layout as an fp32 dot (operands converted): attention's
    full-length key block did so, at about half the bf16 rate (BENCHMARKS.md). Only bf16 (or
    other low-precision) operands on the native path are copied: an fp32 dot is one either
    way, and its summation order (hence its rounding) stays the one XLA picks unpinned."""
    native = x.dtype != jnp.float32 and native_low_precision_matmul()
    return _row_major(x) if native and target_platform() == "cpu" else x


def _operand_gradient(spec: str, ct: Array, a: Array) -> Array:
    """``einsum(spec, ct, a)`` with fp32 accumulation: the gradient of the other operand.

    A product that contracts the leading non-batch index of both operands (a weight gradient
    ``no,ni->oi``, or attention's ``bkqt,bkqd->bktd``: batch indices first in both operands
    and the output) is computed on CPU with one operand transposed first. XLA:CPU runs a bf16
    dot whose LHS contracts its leading dimension as an fp32 dot (operands converted, fp32
    kernel): 100-140 GFLOP/s on an AMX core against 280-540 with a row-major transposed copy,
    copy included (BENCHMARKS.md); attention's key/value gradients at [4, 3, 384, 512] ran
    2.5-3.5x faster on a Zen 4. An explicit transpose alone is folded back into the dot; the
    layout constraint keeps the copy. In a 2-D product the operand transposed is the one
    whose free index leads the output, so the result needs no transpose (XLA folds one into
    the dot and then cannot run it: a bf16 DotThunk); in a batched one the smaller operand is,
    and the (small) result is then transposed from a pinned row-major dot output.
    """
    inputs, out = spec.split("->")
    p, q = inputs.split(",")
    nb = len(out) - 2  # batch indices lead both operands and the output
    batch, k = out[:nb], p[nb] if len(p) > nb else ""
    leading = (
        len(p) == len(q) == len(out) == nb + 2
        and p[:nb] == q[:nb] == batch
        and q[nb] == k
        and k not in out
    )
    if target_platform() != "cpu" or not leading:
        return _f32_acc(spec, ct, a)
    po, qo = p[nb + 1], q[nb + 1]
    if out[nb:] != po + qo:  # [.., qo, po]: the same product with the operands' roles swapped
        ct, a, po, qo = a, ct, qo, po
    if nb and a.size < ct.size:  # [B, qo, k] @ [B, k, po] -> [B, qo, po], then swapped
        y = _f32_acc(f"{batch}{qo}{k},{batch}{k}{po}->{batch}{qo}{po}", _swap_last(a), ct)
        return _swap_last(_row_major(y))
    return _f32_acc(f"{batch}{po}{k},{batch}{k}{qo}->{out}", _swap_last(ct), a)  # [B, po, qo]


def _lp_bwd(spec: str, res: tuple[Array, Array], ct: Array) -> tuple[Array, Array]:
    a, b = res
    spec_da, spec_db = _transposed_specs(spec)
    ct = ct.astype(a.dtype)  # the cotangent in the compute dtype, as the forward's operands
    da = _f32_acc(spec_da, ct, b).astype(a.dtype)
    db = _operand_gradient(spec_db, ct, a).astype(b.dtype)
    return da, db


_low_precision_einsum.defvjp(_lp_fwd, _lp_bwd)


def _native(dtype: jnp.dtype) -> bool:
    """Whether products in ``dtype`` run on low-precision units here: a dtype other than fp32
    on a machine that has them (elsewhere bf16 operands are widened to fp32)."""
    return dtype != jnp.float32 and native_low_precision_matmul()


def einsum(spec: str, a: Array, b: Array, *, dtype: jnp.dtype, out_dtype=None) -> Array:
    """``jnp.einsum(spec, a, b)`` under the contract: operands in ``dtype``, fp32 accumulation.

    Args:
        spec: a two-operand einsum with explicit index letters (no ``...``); every index of an
            operand must appear in the other operand or in the output.
        a, b: operands in any float dtype; they are cast to ``dtype``.
        dtype: the compute dtype.
        out_dtype: dtype of the result (default ``dtype``); pass ``jnp.float32`` where the next
            op is a softmax, logsumexp or loss.
    """
    dtype = jnp.dtype(dtype)
    if _native(dtype):
        y = _low_precision_einsum(spec, a.astype(dtype), b.astype(dtype))
    else:
        y = _contract(spec, a, b, dtype=dtype)  # plain autodiff is already exact here
    return y.astype(dtype if out_dtype is None else out_dtype)


def _contract(spec: str, a: Array, b: Array, *, dtype: jnp.dtype) -> Array:
    """The fp32 result of ``jnp.einsum(spec, a, b)`` under the contract, differentiated by plain
    autodiff: for products written by hand inside a custom rule (:func:`einsum` is the one for
    model code). On a CPU without bf16 units the bf16 operands are widened to fp32 (bf16
    values are exact in fp32: the same products, fp32 sums, the fp32 kernels' speed)."""
    dtype = jnp.dtype(dtype)
    wide = dtype if _native(dtype) else jnp.float32
    return _f32_acc(spec, a.astype(dtype).astype(wide), b.astype(dtype).astype(wide))


def _contract_gradient(spec: str, ct: Array, a: Array, *, dtype: jnp.dtype) -> Array:
    """:func:`_contract` for a gradient-shaped product that contracts the leading (token) index
    of both operands, a weight's ``ni,no->io`` or attention's ``bkqt,bkqd->bktd``: on a CPU
    with bf16 operands it runs in the fast form of :func:`_operand_gradient`, its result
    pinned row-major so that a later transpose cannot fold into the dot (XLA:CPU cannot run
    that dot: "Unsupported element type for DotThunk: BF16 x BF16 = F32"). fp32 result."""
    dtype = jnp.dtype(dtype)
    if not _native(dtype):
        return _contract(spec, ct, a, dtype=dtype)
    y = _operand_gradient(spec, ct.astype(dtype), a.astype(dtype))
    return _row_major(y) if target_platform() == "cpu" else y


def weight_gradient(x: Array, dy: Array, *, dtype: jnp.dtype) -> Array:
    """``x.T @ dy`` [in, out] in fp32 for x [n, in] and dy [n, out]: a weight's gradient, the
    token index contracted (:func:`_contract_gradient`)."""
    return _contract_gradient("ni,no->io", x, dy, dtype=dtype)


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # cpuinfo flags of CPU bf16 units


@functools.cache
def _cpu_has_bf16_units() -> bool:
    """Whether this host's CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16)."""
    override = os.environ.get("RESOFILTER_CPU_BF16", "")
    if override in ("0", "1"):
        return override == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in CPU_BF16_FLAGS)


def native_low_precision_matmul() -> bool:
    """Whether bf16-operand matmuls are fast here: always on GPUs and TPUs; on CPUs only with
    bf16 units. Elsewhere (e.g. an AVX2-only CPU, where a bf16 x bf16 -> fp32 GEMM ran at
    0.6-0.8x the fp32 rate: BENCHMARKS.md) the operands are widened to fp32 first: the same
    products, fp32 sums, fp32 speed (``RESOFILTER_CPU_BF16=0/1`` overrides the detection)."""
    return target_platform() != "cpu" or _cpu_has_bf16_units()


def linear(x: Array, w: Array, *, transposed: bool, dtype: jnp.dtype, out_dtype=None) -> Array:
    """x [..., in] times a weight [out, in] (``transposed``, torch Linear) or [in, out]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [n, in]
    y = einsum("ni,oi->no" if transposed else "ni,io->no", x2, w, dtype=dtype, out_dtype=out_dtype)
    return y.reshape(*lead, y.shape[-1])  # [..., out]


def run_matmul_precision(config: Any) -> str:
    """The run's ``model.matmul_precision`` (``default`` when the config has none), checked."""
    model = config.get("model", None) if hasattr(config, "get") else None
    name = model.get("matmul_precision", "default") if model is not None else "default"
    return check_matmul_precision(str(name))


def with_matmul_precision(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorates a command's ``run(config)``: everything it traces uses the run's precision."""

    @functools.wraps(run)
    def wrapped(config: Any) -> Any:
        with matmul_precision_scope(run_matmul_precision(config)):
            return run(config)

    return wrapped

"""Building blocks shared by the model families, with Hugging Face parameter layouts.

Weights keep the PyTorch layout of the checkpoint (`nn.Linear.weight` is [out, in], GPT-2's
`Conv1D.weight` is [in, out]) so that loading and export are plain renames with shape checks.
Parameters are stored in `param_dtype`; every op casts them to the compute `dtype` at use.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from resofilter_jax.models import precision
from resofilter_jax.models.config import RopeConfig

Array = jax.Array


def _init(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype: jnp.dtype, std: float) -> Array:
    if rngs is None:  # shapes only (loading overwrites every value)
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape)).astype(dtype)


class Linear(nnx.Module):
    """`torch.nn.Linear` layout: weight [out, in], optional bias [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.weight = nnx.Param(_init(rngs, (out_features, in_features), param_dtype, 0.02))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = precision.linear(x, self.weight[...], transposed=True, dtype=self.dtype)  # [..., out]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Conv1D(nnx.Module):
    """GPT-2's `Conv1D` layout: weight [in, out], bias [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs | None,
    ):
        self.weight = nnx.Param(_init(rngs, (in_features, out_features), param_dtype, 0.02))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = precision.linear(x, self.weight[...], transposed=False, dtype=self.dtype)  # [..., out]
        return y + self.bias[...].astype(self.dtype)


class Embedding(nnx.Module):
    """Token (or position) embedding table, weight [num, dim]."""

    def __init__(
        self, num: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs | None
    ):
        self.weight = nnx.Param(_init(rngs, (num, dim), param_dtype, 0.02))
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)  # [..., dim]

    def attend(self, x: Array) -> Array:
        """Tied output projection: x [..., dim] -> fp32 logits [..., num]."""
        return precision.linear(
            x, self.weight[...], transposed=True, dtype=self.dtype, out_dtype=jnp.float32
        )


class RMSNorm(nnx.Module):
    """RMS norm computed in fp32.

    Llama style (`gemma=False`): `w * cast(x * rsqrt(mean(x^2) + eps))`.
    Gemma style (`gemma=True`): `cast(x * rsqrt(mean(x^2) + eps) * (1 + w))`, all in fp32.
    """

    def __init__(
        self, dim: int, *, eps: float, gemma: bool, dtype: jnp.dtype, param_dtype: jnp.dtype
    ):
        init = jnp.zeros if gemma else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype))
        self.eps = eps
        self.gemma = gemma
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        in_dtype = x.dtype
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(in_dtype)
        return self.weight[...].astype(in_dtype) * normed.astype(in_dtype)


class LayerNorm(nnx.Module):
    """`torch.nn.LayerNorm` (weight, bias), computed in fp32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def activation(name: str, x: Array) -> Array:
    """Hugging Face activation by name."""
    if name in ("silu", "swish"):
        return jax.nn.silu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"activation {name!r} is not supported")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Array:
    """Inverse frequencies [head_dim // 2] in fp32, with linear or llama3 scaling."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: Array, inv_freq: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """cos/sin tables [batch, seq, head_dim] (computed in fp32, cast to `dtype`)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, seq, head_dim]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x [batch, seq, heads, head_dim] by the half-split convention of HF.

    Computed in fp32 from x and the tables as given and rounded once to x's dtype: in bf16
    each of the four ops rounded its result, and on a CPU each is a convert pair (the query
    rotation was 2.2% of the bf16 SFT step's op time on a Zen 4). fp32 inputs: unchanged."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    cos_f, sin_f = cos.astype(jnp.float32), sin.astype(jnp.float32)
    return (xf * cos_f[:, :, None, :] + rotated * sin_f[:, :, None, :]).astype(x.dtype)


def attention_mask_bias(attention_mask: Array, sliding_window: int | None = None) -> Array:
    """Boolean mask [batch, 1, q, k]: causal, key padding, optional sliding window, segments.

    Args:
        attention_mask: [batch, seq], 0 for padding and > 0 for real tokens. The positive
            value is the token's segment id: a real query only sees keys of its own segment,
            so several sequences packed in one row never attend to each other. A 0/1 mask
            (one segment per row, the HF meaning) gives exactly the plain causal mask.
        sliding_window: keys j with j <= i - window are hidden from query i (HF semantics).
    """
    seq = attention_mask.shape[-1]
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    allowed = k <= q  # [q, k]
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    seg_q = attention_mask[:, None, :, None]  # [batch, 1, q, 1]
    seg_k = attention_mask[:, None, None, :]  # [batch, 1, 1, k]
    same_segment = (seg_q == seg_k) | (seg_q <= 0)  # padding queries keep their old rows
    return allowed[None, None] & (seg_k > 0) & same_segment


@dataclasses.dataclass
class KVSlot:
    """One layer's key/value cache during a cached forward pass (generation).

    The attention layer hands its new keys and values to :meth:`update`, which writes them at
    slots ``[index, index + seq)`` and returns the whole cache to attend over. The slot is a
    plain Python holder, so the updated arrays are simply read back after the layer ran (this
    works inside `jit`; do not use it inside `lax.scan`).

    Attributes:
        k, v: [batch, max_len, kv_heads, head_dim] cached keys and values.
        index: int32 scalar, the first slot written by this forward pass.
    """

    k: Array
    v: Array
    index: Array

    def update(self, k_new: Array, v_new: Array) -> tuple[Array, Array]:
        """Writes k_new, v_new [batch, seq, kv_heads, head_dim]; returns the full k, v."""
        self.k = jax.lax.dynamic_update_slice_in_dim(
            self.k, k_new.astype(self.k.dtype), self.index, axis=1
        )
        self.v = jax.lax.dynamic_update_slice_in_dim(
            self.v, v_new.astype(self.v.dtype), self.index, axis=1
        )
        return self.k, self.v


def cache_attention_mask(
    key_mask: Array, index: Array, q_len: int, sliding_window: int | None = None
) -> Array:
    """Boolean mask [batch, 1, q_len, max_len] of queries at slots index.. over a KV cache.

    Query slot ``index + i`` sees key slot ``j`` when ``j <= index + i``, the key is a real
    token (``key_mask[:, j] > 0``) and, with a window, ``j > index + i - window``. Slot
    distances equal position distances because every row's real tokens are contiguous (prompts
    are left-padded, generated tokens follow them).

    Args:
        key_mask: [batch, max_len], > 0 where a real token has been written (this pass's
            tokens included).
        index: int32 scalar, the slot of the first query.
    """
    max_len = key_mask.shape[-1]
    q = index + jnp.arange(q_len)[:, None]  # [q, 1]
    k = jnp.arange(max_len)[None, :]  # [1, max_len]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return allowed[None, None] & (key_mask[:, None, None, :] > 0)


ATTENTION_CHUNK = 128  # query rows per causal block (see `dot_product_attention`)


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """Softmax over the last axis (x fp32), with the compact derivative ``y * (dx - <y, dx>)``.

    ``jax.nn.softmax`` without the ``jax_softmax_custom_jvp`` flag differentiates through the
    exponentials and the division; this form keeps only the probabilities for the backward pass
    and takes fewer passes over the [.., q, k] scores."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    y = softmax(primals[0])
    dx = tangents[0]
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    *,
    scale: float,
    softcap: float | None = None,
    chunk: int | None = ATTENTION_CHUNK,
) -> Array:
    """Causal grouped-query attention with an fp32 softmax, in causal query blocks.

    Queries are processed `chunk` rows at a time, and block c only sees keys [0, end of block c):
    the keys after it are masked anyway because `mask` is causal (every mask built by
    `attention_mask_bias` is), so skipping them changes nothing but saves about half of the
    attention work and keeps each block's scores small enough to stay in cache. Inside a block
    the heads of one KV group are folded into the query rows ([b, kv, groups * rows, d]) so both
    products are plain batched matmuls with no transposed copy of the scores.

    Args:
        q: [batch, q_seq, heads, head_dim]; k, v: [batch, k_seq, kv_heads, head_dim].
        mask: bool [batch, 1, q_seq, k_seq], causal (no query sees a later key) when
            q_seq == k_seq.
        chunk: query rows per block; None = one block over the whole sequence.
    Returns:
        [batch, seq, heads, head_dim] in q's dtype.
    """
    b, s, h, d = q.shape
    t, kv = k.shape[1], k.shape[2]
    groups = h // kv
    qt = q.reshape(b, s, kv, groups, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, s, d]
    # Row-major copies: the last block reads every key, and XLA:CPU would fold these
    # transposes into that block's dots and run them as fp32 dots (queries are sliced per
    # block, which copies them anyway).
    kt = precision.materialized(k.transpose(0, 2, 1, 3))  # [b, kv, t, d]
    vt = precision.materialized(v.transpose(0, 2, 1, 3))  # [b, kv, t, d]
    # Causal blocks need queries and keys at the same positions; otherwise (e.g. a decode step
    # against a cache) one block sees every key.
    step = s if chunk is None or chunk >= s or s != t else chunk
    starts = list(range(0, s, step))
    # split, not slices: the gradient of a split is one concatenation (of slices, a sum of
    # zero-padded full-length arrays: 3.5% of the SFT step's time on a Zen 4)
    q_blocks = jnp.split(qt, starts[1:], axis=3) if len(starts) > 1 else [qt]
    blocks = []
    for start, q_block in zip(starts, q_blocks, strict=True):
        stop = min(s, start + step)
        rows, keys = stop - start, (stop if step < s else t)
        qc = q_block.reshape(b, kv, groups * rows, d)  # [b, kv, g*rows, d]
        scores = precision.einsum(
            "bkqd,bktd->bkqt", qc, kt[:, :, :keys], dtype=q.dtype, out_dtype=jnp.float32
        )
        scores = scores.reshape(b, kv, groups, rows, keys) * scale  # [b, kv, g, rows, keys]
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap
        visible = mask[:, :, None, start:stop, :keys]  # [b, 1, 1, rows, keys]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = softmax(scores).astype(v.dtype)
        probs = probs.reshape(b, kv, groups * rows, keys)
        out = precision.einsum("bkqt,bktd->bkqd", probs, vt[:, :, :keys], dtype=v.dtype)
        # out: [b, kv, g*rows, d]
        blocks.append(out.reshape(b, kv, groups, rows, d))
    out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=3)  # [b, kv, g, s, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)

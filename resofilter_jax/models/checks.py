"""Load-time checks of a model against its weights, tokenizer and run settings.

:func:`resofilter_jax.models.loading.load_model` runs them before it returns, so a corrupt
checkpoint, a tokenizer that does not belong to the model or a `max_length` beyond the model's
positions stops a command with a clear error before any scoring or training starts.

Why at load: none of these fail by themselves on a device. A gather with an out-of-range index
does not raise under XLA: `jnp.take` (the embedding lookup) fills the row with NaN and plain
indexing clamps to the last row, so a token id >= `vocab_size` or a position beyond a learned
position table gives a NaN or a silently wrong score, and a NaN weight turns every score it
touches into NaN, all under status `ok`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resofilter_jax.models.config import ModelConfig
from resofilter_jax.models.registry import named_params
from resofilter_jax.models.stacking import is_stacked_name

MAX_NAMED = 5  # offending parameters listed in an error message


class BadModelError(ValueError):
    """A loaded model cannot be used as configured (the subclasses say why)."""


class BadWeightsError(BadModelError):
    """A parameter holds NaN or Inf values."""


class TokenizerMismatchError(BadModelError):
    """The tokenizer can emit token ids the model has no embedding row for."""


class MaxLengthError(BadModelError):
    """`max_length` is beyond the positions the model supports."""


# A float is NaN/Inf exactly when its exponent bits are all ones; for 2-byte floats testing
# the bits is ~10x faster on the host than numpy's (ml_dtypes) isfinite loop.
_EXPONENT_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    """True when every element of `x` is finite (one fused pass, a scalar result)."""
    return jnp.isfinite(x).all()


def _host_all_finite(a: np.ndarray) -> bool:
    mask = _EXPONENT_BITS.get(a.dtype.name)
    if mask is None:
        return bool(np.isfinite(a).all())
    return not bool(((a.view(np.uint16) & mask) == mask).any())


def _on_host(x: jax.Array) -> bool:
    """Whether `x` lives in this process's CPU memory (numpy can read it without a copy)."""
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())


def finite_flags(arrays: Sequence[jax.Array], *, host: bool | None = None) -> list[bool]:
    """Whether each array is free of NaN/Inf.

    CPU arrays are read in place by numpy (no compilation: ~0.1 s for SmolLM2's 135M fp32
    parameters, where one jitted reduction per shape costs ~1 s, mostly compiling); arrays on
    an accelerator get one jitted `isfinite(x).all()` each (compiled once per shape), all
    dispatched before the scalar flags are fetched together. `host` forces one path (tests).
    """
    out: dict[int, bool] = {}
    pending: dict[int, jax.Array] = {}
    for i, a in enumerate(arrays):
        if host if host is not None else _on_host(a):
            out[i] = _host_all_finite(np.asarray(a))
        else:
            pending[i] = _all_finite(a)
    out.update(zip(pending, (bool(f) for f in jax.device_get(list(pending.values()))), strict=True))
    return [out[i] for i in range(len(arrays))]


def check_finite(model: Any, source: str, *, host: bool | None = None) -> None:
    """Raises BadWeightsError naming the parameters of `model` that hold NaN or Inf.

    The scan is :func:`finite_flags`; NaN and Inf are counted only in failing parameters
    (for a stacked one, ``model.layers.*.x`` [L, ...], the message also lists the layers).
    """
    params = {
        name: value
        for name, value in named_params(model).items()
        if jnp.issubdtype(value.dtype, jnp.floating)
    }
    flags = finite_flags(list(params.values()), host=host)
    bad = [name for name, ok in zip(params, flags, strict=True) if not bool(ok)]
    if not bad:
        return
    details = []
    for name in bad[:MAX_NAMED]:
        value = params[name]
        n_nan, n_inf = int(jnp.isnan(value).sum()), int(jnp.isinf(value).sum())
        where = ""
        if is_stacked_name(name):  # [L, ...]: which layers
            finite = jnp.isfinite(value).reshape(value.shape[0], -1).all(axis=1)  # [L]
            where = f"layers {[int(i) for i in jnp.flatnonzero(~finite)]}: "
        details.append(f"{name} ({where}{n_nan} NaN, {n_inf} Inf of {value.size})")
    more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
    raise BadWeightsError(
        f"{source}: {len(bad)} of {len(params)} parameters hold NaN/Inf values: "
        f"{', '.join(details)}{more}. The checkpoint is corrupt or was saved from a diverged "
        "run; every score computed with it would be NaN. Re-download or re-export the model."
    )


def tokenizer_size(tokenizer: Any) -> int:
    """One more than the largest token id `tokenizer` can emit (added tokens included)."""
    n = len(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return max(n, max(added) + 1) if added else n


def check_tokenizer(tokenizer: Any, config: ModelConfig, source: str) -> None:
    """Raises TokenizerMismatchError when `tokenizer` can emit ids >= the embedding rows.

    A model vocabulary larger than the tokenizer's is normal (rows padded to a multiple of 64
    or 128, e.g. Qwen2); the other way round the extra ids have no embedding row (see the
    module docstring for what XLA then does).
    """
    rows = config.vocab_size
    n = tokenizer_size(tokenizer)
    if n > rows:
        raise TokenizerMismatchError(
            f"{source}: the tokenizer has {n} tokens (ids 0..{n - 1}, added tokens included) but "
            f"the model's embedding has only {rows} rows (vocab_size={rows}); ids >= {rows} "
            "have no embedding and would score NaN or wrong. Use the tokenizer the model was "
            "trained with, or resize the model's embeddings to the tokenizer "
            "(transformers' resize_token_embeddings) and save it again."
        )
    special = {
        f"{kind}_token": getattr(tokenizer, f"{kind}_token_id", None)
        for kind in ("bos", "eos", "pad", "unk")
    }
    wrong = {k: v for k, v in special.items() if isinstance(v, int) and not 0 <= v < rows}
    if wrong:
        listed = ", ".join(f"{k} id {v}" for k, v in wrong.items())
        raise TokenizerMismatchError(
            f"{source}: the tokenizer's {listed} is outside the model's vocabulary of {rows} "
            f"rows (vocab_size={rows}, tokenizer of {n} tokens); use the tokenizer the model "
            "was trained with."
        )


def position_key(config: ModelConfig, source: str) -> str:
    """The checkpoint setting that holds the model's position limit, for messages."""
    if str(source).endswith(".gguf"):
        return f"{config.model_type.removesuffix('_text')}.context_length (GGUF)"
    return "n_positions" if config.arch == "gpt2" else "max_position_embeddings"


def check_max_length(config: ModelConfig, max_length: int | None, source: str) -> None:
    """Raises MaxLengthError when `max_length` exceeds the model's position limit.

    GPT-2 has a learned table of `n_positions` rows (positions beyond it have no embedding);
    rotary models are only trained up to `max_position_embeddings` and extrapolate past it.
    """
    if max_length is None:
        return
    limit = int(config.max_position_embeddings)
    if int(max_length) > limit:
        raise MaxLengthError(
            f"max_length={max_length} is more than the {limit} positions of the model at "
            f"{source} ({position_key(config, source)}={limit}); lower it, e.g. "
            f"--config.max_length={limit} (select: --max_length={limit})."
        )

"""Model construction by architecture family, and HF-named state access."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.config import ModelConfig, UnsupportedArchitectureError
from resofilter_jax.models.stacking import (
    is_stacked,
    per_layer_params,
    stack_layers,
    unstack_layers,
)


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape or dtype."""


ModelT = TypeVar("ModelT", bound=nnx.Module)


def model_class(config: ModelConfig) -> type[CausalLM]:
    """The NNX class implementing `config.arch`."""
    if config.arch == "llama":
        from resofilter_jax.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if config.arch == "gpt2":
        from resofilter_jax.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel
    if config.arch in ("gemma2", "gemma3"):
        from resofilter_jax.models.gemma import GemmaForCausalLM

        return GemmaForCausalLM
    raise UnsupportedArchitectureError(f"architecture {config.arch!r} is not supported")


def build_model(
    config: ModelConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    seed: int | None = 0,
) -> CausalLM:
    """A randomly initialised model (`seed=None`: zeros, for loading into)."""
    rngs = nnx.Rngs(seed) if seed is not None else None
    return model_class(config)(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def abstract_model(
    config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32
) -> CausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory is allocated."""
    cls = model_class(config)
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=None))


def param_name(path: tuple) -> str:
    """NNX state path -> HF state-dict key (`model.layers.*.x` for a stacked [L, ...] one)."""
    return ".".join(str(p) for p in path)


def named_params(model: nnx.Module, *, per_layer: bool = False) -> dict[str, jax.Array]:
    """{name: array} for every parameter of `model`, as stored.

    Layers stored stacked (`stacking.set_scan_layers`) give one [L, ...] entry per layer
    parameter, named with `*` for the layer (`model.layers.*.mlp.up_proj.weight`); with
    `per_layer=True` those come back as their L HF-named slices (copies), as in a
    checkpoint.
    """
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    params = {param_name(path): var.get_value() for path, var in flat}
    return per_layer_params(params) if per_layer else params


def load_state_dict(
    model: ModelT,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    ignore: tuple[str, ...] = (),
    strict: bool = True,
    source: str = "checkpoint",
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
) -> ModelT:
    """Fills the parameters of `model` from HF-named tensors, cast to each parameter's dtype.

    The one way a model's state is filled from named tensors: :func:`load_model` fills an
    :func:`abstract_model` (its `jax.ShapeDtypeStruct` leaves are replaced) from tensors
    streamed one at a time, so a checkpoint is never held twice in host memory; tests fill a
    built model from a state dict. Every tensor is checked before the model changes: on any
    mismatch the model is left as it was.

    Args:
        model: a concrete or abstract NNX model, filled in place.
        tensors: HF state-dict keys -> arrays (numpy or jax), as a mapping or as an iterable
            of (name, array) pairs consumed once.
        ignore: suffixes of checkpoint keys that are buffers or tied aliases, not parameters
            (e.g. `.attn.bias`, `lm_head.weight`).
        strict: raise when a model parameter has no tensor or a tensor has no parameter
            (shape and dtype mismatches always raise).
        source: what the tensors came from, for error messages (a path).
        shardings: HF name -> the parameter's final sharding. Such a tensor is placed shard
            by shard from the host (``jax.make_array_from_callback``): no device ever holds
            more than its own shard, so a model larger than one device loads for fsdp.

    A model with stacked layers (`stacking.set_scan_layers`) takes the same HF names: it is
    unstacked for the load and stacked again after it (also when the load fails).

    Returns:
        `model`.

    Raises:
        CheckpointMismatchError: naming every tensor with the wrong shape (both shapes) or a
            non-floating dtype, and (strict) the missing and unexpected keys.
    """
    layers_path = getattr(model, "layers_path", None)
    if layers_path is not None and is_stacked(model):
        unstack_layers(model)
        try:
            return _load(model, tensors, ignore, strict, source, shardings)
        finally:
            stack_layers(model)
    return _load(model, tensors, ignore, strict, source, shardings)


def _load(
    model: ModelT,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    ignore: tuple[str, ...],
    strict: bool,
    source: str,
    shardings: Mapping[str, jax.sharding.Sharding] | None,
) -> ModelT:
    """:func:`load_state_dict` into a model with per-layer storage."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    by_name = {param_name(p): p for p in flat}
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    values: dict[str, jax.Array] = {}
    seen: set[str] = set()
    wrong: list[str] = []
    unexpected: list[str] = []
    for name, value in pairs:
        if name not in by_name:
            if not name.endswith(ignore):
                unexpected.append(name)
            continue
        seen.add(name)
        var = flat[by_name[name]]
        if tuple(value.shape) != tuple(var.shape):
            wrong.append(
                f"tensor {name!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(var.shape)}"
            )
        elif jnp.issubdtype(var.dtype, jnp.floating) and not jnp.issubdtype(
            value.dtype, jnp.floating
        ):
            wrong.append(
                f"tensor {name!r} has dtype {value.dtype} but the model expects floating point "
                f"({jnp.dtype(var.dtype).name})"
            )
        elif not wrong and shardings is not None and name in shardings:
            values[name] = _place(value, var.dtype, shardings[name])
        elif not wrong:  # after a mismatch only the checks go on
            values[name] = jnp.asarray(value, dtype=var.dtype)
    missing = sorted(set(by_name) - seen)
    problems = wrong[:6] + (
        [f"... ({len(wrong)} mismatched tensors in all)"] if len(wrong) > 6 else []
    )
    if strict and missing:
        problems.append(f"missing tensors {_some(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected tensors {_some(unexpected)}")
    if problems:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise CheckpointMismatchError(
            f"{source} does not match the {kind + ' ' if kind else ''}model: " + "; ".join(problems)
        )
    for name, value in values.items():
        flat[by_name[name]].set_value(value)
    nnx.update(model, state)
    return model


def _place(value: Any, dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``value`` (host or CPU array) cast to ``dtype`` and placed shard by shard."""
    host = np.asarray(value)  # [shape] on the host; zero-copy for numpy / CPU jax arrays
    return jax.make_array_from_callback(
        host.shape, sharding, lambda index: np.asarray(host[index], dtype=dtype)
    )


def _some(names: list[str], n: int = 6) -> str:
    """The first `n` names and the count, for error messages."""
    return f"{names[:n]}{' ...' if len(names) > n else ''} ({len(names)} in all)"

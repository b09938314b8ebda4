"""Model construction by architecture family, and HF-named state access."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.config import ModelConfig, UnsupportedArchitectureError


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape."""


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
    """NNX state path -> HF state-dict key."""
    return ".".join(str(p) for p in path)


def named_params(model: nnx.Module) -> dict[str, jax.Array]:
    """{HF name: array} for every parameter of `model`."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {param_name(path): var.get_value() for path, var in flat}


def load_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    *,
    ignore: tuple[str, ...] = (),
    strict: bool = True,
) -> None:
    """Copies HF-named tensors into `model` in place, cast to each parameter's dtype.

    Args:
        tensors: HF state-dict keys -> arrays (numpy or jax).
        ignore: suffixes of checkpoint keys that are buffers, not parameters (e.g. `attn.bias`).
        strict: raise when a model parameter has no tensor or a tensor has no parameter.

    Raises:
        CheckpointMismatchError: naming the tensor and both shapes, or the missing keys.
    """
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    by_name = {param_name(p): p for p in flat}
    unexpected = [k for k in tensors if k not in by_name and not k.endswith(ignore)]
    missing = [k for k in by_name if k not in tensors]
    if strict and (missing or unexpected):
        raise CheckpointMismatchError(
            f"checkpoint does not match the model: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    for name, path in by_name.items():
        if name not in tensors:
            continue
        var = flat[path]
        value = tensors[name]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointMismatchError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint but the model "
                f"expects {tuple(var.shape)}"
            )
        var[...] = jnp.asarray(value, dtype=var.dtype)
    nnx.update(model, state)

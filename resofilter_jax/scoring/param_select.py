"""Choosing the parameters whose one-step update ResoFilter measures, by their HF names.

Two ways to choose, both validated against the model's actual parameter names:

* a regular expression searched (``re.search``) in every HF name, e.g.
  ``r"layers\\.(27|28|29)\\.mlp\\.up_proj\\.weight$"``;
* a parameter *type* (the name after the decoder-layer prefix, e.g. ``mlp.up_proj.weight``)
  and ``last_k``: that parameter in each of the last ``k`` decoder layers. Decoder layers are
  ``model.layers.N.`` (Llama, Gemma) and ``transformer.h.N.`` (GPT-2).

Names come back sorted in layer order (embeddings first, then layers 0, 1, ..., then the
final norm / LM head), so the output columns of a run are stable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from flax import nnx

from resofilter_jax.models.registry import param_name

__all__ = ["layer_index", "layer_type", "param_names", "select_params", "sort_names"]

_LAYER = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.(.+)$")
_BOTTOM = re.compile(r"(^|\.)(embed_tokens|wte|wpe)\.")
_SAMPLE = 12  # names shown in an error message


def param_names(model_or_names: nnx.Module | Iterable[str]) -> list[str]:
    """All HF parameter names of a model (or the given names), in model order."""
    if isinstance(model_or_names, nnx.Module):
        flat = nnx.to_flat_state(nnx.state(model_or_names, nnx.Param))
        return [param_name(path) for path, _ in flat]
    if isinstance(model_or_names, str):
        raise TypeError("pass a model or an iterable of names, not a single string")
    return list(model_or_names)


def layer_index(name: str) -> int | None:
    """The decoder-layer number of a parameter name, or None outside the decoder layers."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def layer_type(name: str) -> str | None:
    """The name after the decoder-layer prefix (``mlp.up_proj.weight``), or None."""
    m = _LAYER.match(name)
    return m.group(2) if m else None


def _order(name: str) -> tuple[float, str]:
    idx = layer_index(name)
    if idx is not None:
        return (float(idx), name)
    return (-1.0 if _BOTTOM.search(name) else math.inf, name)


def sort_names(names: Iterable[str]) -> list[str]:
    """Names in layer order: embeddings, decoder layers 0..N-1, then everything else."""
    return sorted(set(names), key=_order)


def _sample(items: list[str]) -> str:
    shown = ", ".join(items[:_SAMPLE])
    more = f", ... ({len(items)} in all)" if len(items) > _SAMPLE else ""
    return f"[{shown}{more}]"


def _types(names: list[str]) -> list[str]:
    return sorted({t for t in (layer_type(n) for n in names) if t is not None})


def select_params(
    model_or_names: nnx.Module | Iterable[str],
    pattern: str | None = None,
    *,
    param_type: str | None = None,
    last_k: int | None = None,
) -> list[str]:
    """The HF names of the chosen parameters, sorted in layer order.

    Args:
        model_or_names: The model, or its parameter names.
        pattern: Regular expression searched in every name (``re.search``).
        param_type: A parameter type inside a decoder layer, e.g. ``mlp.up_proj.weight``
            (GPT-2: ``mlp.c_fc.weight``). Exclusive with ``pattern``.
        last_k: With ``param_type``: only the last ``k`` decoder layers (all layers when None).

    Returns:
        The matching names, at least one.

    Raises:
        ValueError: Neither or both of pattern/param_type, a bad regex, a ``last_k`` outside
            ``1..n_layers``, an unknown type, or no match; the message lists (a sample of)
            the available names or types.
    """
    names = param_names(model_or_names)
    if (pattern is None) == (param_type is None):
        raise ValueError(
            "choose parameters with exactly one of `pattern` or `param_type` (+ last_k)"
        )
    if pattern is not None:
        if last_k is not None:
            raise ValueError("last_k goes with `param_type`, not with `pattern`")
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"bad parameter pattern {pattern!r}: {err}") from None
        chosen = [n for n in names if regex.search(n)]
        if not chosen:
            raise ValueError(
                f"parameter pattern {pattern!r} matches none of the {len(names)} parameters; "
                f"available: {_sample(sort_names(names))}"
            )
        return sort_names(chosen)
    types = _types(names)
    if param_type not in types:
        raise ValueError(
            f"unknown parameter type {param_type!r}; the decoder layers have types {_sample(types)}"
        )
    layers = sorted({i for n in names if (i := layer_index(n)) is not None})
    if last_k is not None and not 1 <= last_k <= len(layers):
        raise ValueError(f"last_k must be in 1..{len(layers)} (the model's layers), got {last_k}")
    keep = set(layers[-last_k:] if last_k is not None else layers)
    chosen = [n for n in names if layer_type(n) == param_type and layer_index(n) in keep]
    if not chosen:  # a type present only in other layers (e.g. Gemma 3 layer kinds)
        raise ValueError(f"no parameter of type {param_type!r} in layers {sorted(keep)}")
    return sort_names(chosen)

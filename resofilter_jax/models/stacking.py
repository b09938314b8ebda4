"""Decoder layers stored stacked: one layer module whose parameters carry a leading [L] axis.

With ``scan_layers`` a model's decoder layers run under one ``lax.scan``, which needs every
layer parameter as one array [L, ...]. :func:`set_scan_layers` (the one switch) stores them
that way, so the forward pass scans straight over the stored arrays instead of stacking the
layers' weights again inside every call (an extra copy of all layer weights per call).

Names: a stacked parameter is named like its HF per-layer parameters with ``*`` for the layer
number, e.g. ``model.layers.*.mlp.up_proj.weight`` of shape [L, intermediate, hidden]
(``transformer.h.*.attn.c_attn.weight`` for GPT-2). HF names come back per layer where a
model meets the outside world: :func:`per_layer_params` (HF export),
:func:`~resofilter_jax.models.registry.load_state_dict` (loads HF names into a stacked model)
and :func:`set_scan_layers` with ``per_layer=True`` (code that selects parameters per layer
by HF name, e.g. resonance scoring, keeps the list form and today's stack-per-call scan).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

STACK_KEY = "*"  # the layer-number part of a stacked parameter's name
_MARK = f".{STACK_KEY}."


def is_stacked_name(name: str) -> bool:
    """Whether ``name`` names a stacked parameter [L, ...] (``...layers.*.xxx``)."""
    return _MARK in name


def layer_name(name: str, index: int) -> str:
    """The HF name of layer ``index``'s slice of the stacked parameter ``name``."""
    return name.replace(_MARK, f".{index}.", 1)


def per_layer_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of one layer's parameter: ``shape`` without the layer axis when stacked."""
    return tuple(shape[1:] if is_stacked_name(name) else shape)


def per_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: array}`` with every stacked entry split into its per-layer HF-named slices.

    The order is the unstacked model's: every run of stacked entries becomes layer 0's
    parameters, then layer 1's, ... (so an export writes the same files, shards included).
    Slices of numpy arrays are views; of jax arrays, copies.
    """
    out: dict[str, Any] = {}
    group: list[str] = []

    def flush() -> None:
        if group:
            for i in range(int(params[group[0]].shape[0])):
                out.update({layer_name(n, i): params[n][i] for n in group})
            group.clear()

    for name in params:
        if is_stacked_name(name):
            group.append(name)
        else:
            flush()
            out[name] = params[name]
    flush()
    return out


def _stack(values: Sequence[Any]) -> Any:
    """[L, ...] from L equal-shaped arrays or ``jax.ShapeDtypeStruct``s (abstract models)."""
    if isinstance(values[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
    return jnp.stack(values)


def _slice(value: Any, index: int) -> Any:
    """Layer ``index`` of a stacked array or ``jax.ShapeDtypeStruct``."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[index]


def _released(value: Any) -> Any:
    """A 0-size stand-in for a converted array, so its memory is freed with the last ref."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return value
    return jnp.zeros((0,), value.dtype)


def _rebuilt(graphdef: Any, flat: Mapping[tuple, nnx.Variable], fn: Callable[[Any], Any]):
    """``nnx.merge(graphdef, state)`` with every variable's value replaced by ``fn(value)``."""
    state = nnx.from_flat_state({p: v.replace(fn(v.get_value())) for p, v in flat.items()})
    return nnx.merge(graphdef, state)


class StackedLayers(nnx.Module):
    """L structurally identical layers as one template layer with [L, ...] variables.

    The template is the attribute ``*`` (so parameter paths read ``layers.*.mlp...``).
    ``len``, ``[i]`` and iteration give per-layer modules holding slices (copies outside jit;
    meant for non-hot paths such as the KV-cache loop); :func:`run_layers` scans the template
    directly.
    """

    def __init__(self, layers: Sequence[nnx.Module]):
        """Stacks ``layers`` leaf by leaf, releasing each layer's arrays once stacked (so at
        most one extra copy of one parameter is held at a time). ``layers`` are emptied.

        Raises:
            ValueError: If ``layers`` is empty or the layers differ in structure.
        """
        if not layers:
            raise ValueError("StackedLayers needs at least one layer")
        graphdef = nnx.graphdef(layers[0])
        if any(nnx.graphdef(layer) != graphdef for layer in layers[1:]):
            raise ValueError("stacked layers must be structurally identical")
        flats = [dict(nnx.to_flat_state(nnx.state(layer))) for layer in layers]
        stacked: dict[tuple, nnx.Variable] = {}
        for path, var in flats[0].items():
            parts = [flat[path] for flat in flats]  # the layers' own variables
            stacked[path] = var.replace(_stack([v.get_value() for v in parts]))  # [L, ...]
            for v in parts:
                v.set_value(_released(v.get_value()))
        self.num_layers = len(layers)
        setattr(self, STACK_KEY, nnx.merge(graphdef, nnx.from_flat_state(stacked)))

    @property
    def template(self) -> nnx.Module:
        """The layer module whose variables are the stacked [L, ...] arrays."""
        return getattr(self, STACK_KEY)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index: int) -> nnx.Module:
        """Layer ``index`` as a module of its own (slices of the stacked variables)."""
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} of {self.num_layers}")
        graphdef, state = nnx.split(self.template)
        return _rebuilt(graphdef, dict(nnx.to_flat_state(state)), lambda a: _slice(a, index))

    def __iter__(self) -> Iterator[nnx.Module]:
        return (self[i] for i in range(self.num_layers))

    def unstacked(self) -> list[nnx.Module]:
        """The per-layer modules, releasing each stacked array once sliced (this is emptied)."""
        graphdef, state = nnx.split(self.template)
        flat = dict(nnx.to_flat_state(state))
        layers: list[dict[tuple, nnx.Variable]] = [{} for _ in range(self.num_layers)]
        for path, var in flat.items():
            value = var.get_value()  # [L, ...]
            for i, layer in enumerate(layers):
                layer[path] = var.replace(_slice(value, i))
            var.set_value(_released(value))
        return [nnx.merge(graphdef, nnx.from_flat_state(layer)) for layer in layers]


def _home(model: Any) -> tuple[Any, str]:
    """(module, attribute) holding the decoder layers (``CausalLM.layers_path``)."""
    *owner_path, attr = model.layers_path
    owner = model
    for part in owner_path:
        owner = getattr(owner, part)
    return owner, attr


def decoder_layers(model: Any) -> Sequence[nnx.Module] | StackedLayers:
    """The decoder layers of a causal LM: an ``nnx.List`` or a :class:`StackedLayers`."""
    owner, attr = _home(model)
    return getattr(owner, attr)


def is_stacked(model: Any) -> bool:
    """Whether ``model``'s decoder layers are stored stacked."""
    return isinstance(decoder_layers(model), StackedLayers)


def stack_layers(model: Any) -> Any:
    """Stores ``model``'s decoder layers stacked, in place (no-op when already stacked)."""
    owner, attr = _home(model)
    layers = getattr(owner, attr)
    if not isinstance(layers, StackedLayers):
        setattr(owner, attr, StackedLayers(list(layers)))
    return model


def unstack_layers(model: Any) -> Any:
    """Stores ``model``'s decoder layers as a per-layer list, in place (no-op when a list)."""
    owner, attr = _home(model)
    layers = getattr(owner, attr)
    if isinstance(layers, StackedLayers):
        setattr(owner, attr, nnx.List(layers.unstacked()))
    return model


def set_scan_layers(model: Any, scan: bool, *, per_layer: bool = False) -> Any:
    """The ``scan_layers`` switch: sets ``model.scan_layers`` and the layer storage to match.

    ``scan=True`` stores the layers stacked (parameters named ``...layers.*...``), so every
    forward pass scans the stored arrays; ``scan=False`` stores them as a per-layer list (HF
    names). ``per_layer=True`` keeps the list (and HF names) even with ``scan=True``: the scan
    then stacks the layers inside each call, as before; for code that selects parameters per
    layer by HF name (resonance scoring).

    Returns:
        ``model``, converted in place.
    """
    model.scan_layers = bool(scan)
    if scan and not per_layer:
        return stack_layers(model)
    return unstack_layers(model)

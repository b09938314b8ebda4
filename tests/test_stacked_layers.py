"""Decoder layers stored stacked (`scan_layers`): same numbers, no stack per call, HF names
back at export, and the training machinery (partition rules, decay mask, train step,
checkpoints) on stacked names. Tiny random models of every family (support.models)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from support.models import reference
from support.training import random_examples, tiny_hf

from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.checks import BadWeightsError, check_finite
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.export import export_hf
from resofilter_jax.models.generate import left_pad, real_positions
from resofilter_jax.models.registry import build_model, load_state_dict, named_params
from resofilter_jax.models.stacking import is_stacked, set_scan_layers, unstack_layers
from resofilter_jax.parallel import make_train_mesh, partition_spec
from resofilter_jax.training.checkpoints import Checkpointer, LayerStorageMismatchError
from resofilter_jax.training.optim import decay_mask, make_optimizer
from resofilter_jax.training.sft_data import collate_rows, single_rows
from resofilter_jax.training.trainer import Trainer

FAMILIES = ("gpt2", "llama", "qwen2_sliding", "gemma2", "gemma3")


def fresh(name: str) -> CausalLM:
    """A new NNX model with the weights of parity case ``name`` (never the cached one: the
    tests here convert models in place)."""
    case = reference(name)
    model = build_model(case.config, seed=None)
    return load_state_dict(model, case.state_dict, ignore=case.ignore, strict=True)


def logits(model: CausalLM, name: str) -> np.ndarray:
    case = reference(name)
    return np.asarray(model(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)).logits)


def host(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in params.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_forward_names_and_round_trip(name: str) -> None:
    """Stacked storage: the forward equals the per-layer scan (and HF), names read
    `layers.*` with a leading [L] axis, HF-named tensors load into it, and stack -> unstack
    gives back the exact weights."""
    case = reference(name)
    model = fresh(name)
    before = host(named_params(model))
    set_scan_layers(model, True, per_layer=True)  # today's scan: stacks inside every call
    want = logits(model, name)
    assert not is_stacked(model)

    set_scan_layers(model, True)
    got = logits(model, name)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    valid = case.attention_mask > 0
    np.testing.assert_allclose(
        got[valid], case.logits[valid], rtol=1e-5, atol=1e-5 * np.abs(case.logits).max()
    )

    n = case.config.num_hidden_layers
    prefix = "transformer.h" if name == "gpt2" else "model.layers"
    stacked = {k: v.shape for k, v in named_params(model).items()}
    per_layer = {k: v.shape for k, v in before.items() if k.startswith(f"{prefix}.0.")}
    assert {k for k in stacked if ".*." in k} == {
        k.replace(f"{prefix}.0.", f"{prefix}.*.") for k in per_layer
    }
    for k, shape in per_layer.items():
        assert stacked[k.replace(f"{prefix}.0.", f"{prefix}.*.")] == (n, *shape)
    assert not any(k.startswith(f"{prefix}.") and ".*." not in k for k in stacked)
    assert list(named_params(model, per_layer=True)) == list(before)
    load_state_dict(model, case.state_dict, ignore=case.ignore, strict=True)  # HF names
    assert is_stacked(model)

    set_scan_layers(model, False)
    assert not is_stacked(model)
    after = host(named_params(model))
    assert list(after) == list(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_gemma3_layer_kinds_apart_scan_stacked() -> None:
    """Gemma 3 without a window (sliding layers keep their own rope table but attend fully):
    the scan over stacked layers takes both per-layer kinds as flags and computes what the
    KV-cache pass (its own per-layer code) computes."""
    case = reference("gemma3")
    config = dataclasses.replace(case.config, sliding_window=None)
    assert not config.is_sliding(0) and config.layer_types[0] == "sliding_attention"
    model = set_scan_layers(build_model(config), True)
    ids, mask = jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)
    valid = case.attention_mask > 0
    want, _ = model.hidden_states(ids, mask, cache=model.init_cache(*ids.shape))
    got = np.asarray(model.hidden_states(ids, mask))[valid]  # [tokens, hidden]
    want = np.asarray(want)[valid]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _concatenates(model: CausalLM, ids: jax.Array, mask: jax.Array) -> int:
    """`stack` and `concatenate` ops of the traced forward of ``model``, outside the bodies
    of scans (inside one, an op runs on one layer's slices)."""

    def count(jaxpr: Any) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                continue
            n += eqn.primitive.name in ("stack", "concatenate")
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        n += count(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        n += count(sub)
        return n

    return count(jax.make_jaxpr(lambda m: m(ids, mask).logits)(model).jaxpr)


def test_stacked_forward_stacks_no_layer_weights() -> None:
    """The traced forward of a stacked model stacks no layer weights: the per-layer scan
    has one more stack op per layer parameter than the stacked scan."""
    name = "llama"
    case = reference(name)
    ids, mask = jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)
    model = fresh(name)
    n_leaves = sum(k.startswith("model.layers.0.") for k in named_params(model))
    set_scan_layers(model, True, per_layer=True)
    per_call = _concatenates(model, ids, mask)
    set_scan_layers(model, True)
    assert _concatenates(model, ids, mask) == per_call - n_leaves


def test_kv_cache_pass_with_stacked_layers() -> None:
    """A cached pass (as generation runs: layer by layer, here on slices of the stacked
    weights) gives the unstacked model's hidden states and cache."""
    name = "gemma3"  # local/global rope tables and sliding windows per layer
    prompts = [[5, 9, 11], list(range(3, 22)), [7] * 7]
    ids, mask = (jnp.asarray(a) for a in left_pad(prompts, 20, 0))
    positions, valid = real_positions(mask), jnp.asarray(mask)[..., None] > 0

    @jax.jit
    def cached_pass(model: CausalLM) -> tuple[jax.Array, Any]:
        h, cache = model.hidden_states(ids, mask, positions, cache=model.init_cache(3, 24))
        return jnp.where(valid, h, 0.0), cache  # [b, s, hidden], the filled cache

    model = fresh(name)
    want = cached_pass(model)
    set_scan_layers(model, True)
    got = cached_pass(model)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_nan_check_names_the_layers_of_a_stacked_parameter() -> None:
    """The load-time NaN check on a stacked model names the stacked parameter and its layer."""
    model = set_scan_layers(build_model(reference("llama").config), True)
    weight = model.model.layers.template.mlp.up_proj.weight
    weight.set_value(weight.get_value().at[1, 3, 5].set(jnp.nan))  # [L, out, in]: layer 1
    with pytest.raises(
        BadWeightsError, match=r"model\.layers\.\*\.mlp\.up_proj\.weight \(layers \[1\]"
    ):
        check_finite(model, "test")


def test_partition_specs_and_decay_mask_of_stacked_names() -> None:
    """A stacked parameter gets its per-layer spec behind a never-sharded layer axis, and
    weight decay by its per-layer shape (stacked norms and biases are not decayed)."""
    mesh = make_train_mesh(2, 4, jax.devices()[:8])
    cases = {
        "model.layers.*.mlp.up_proj.weight": ((3, 128, 64), PartitionSpec(None, "fsdp", None)),
        "model.layers.*.self_attn.o_proj.weight": ((3, 64, 64), PartitionSpec(None, None, "fsdp")),
        "transformer.h.*.attn.c_attn.weight": ((3, 64, 192), PartitionSpec(None, None, "fsdp")),
        "model.layers.*.input_layernorm.weight": ((4, 64), PartitionSpec(None)),
        "model.layers.*.mlp.up_proj.weight@odd": ((4, 6, 64), PartitionSpec(None, None, None)),
    }
    for name, (shape, want) in cases.items():
        assert partition_spec(name.split("@")[0], shape, mesh) == want, name
    shapes = {name.split("@")[0]: shape for name, (shape, _) in cases.items()}
    shapes |= {"transformer.h.*.attn.c_attn.bias": (3, 192), "model.embed_tokens.weight": (8, 4)}
    assert decay_mask(shapes) == {
        "model.layers.*.mlp.up_proj.weight": True,
        "model.layers.*.self_attn.o_proj.weight": True,
        "transformer.h.*.attn.c_attn.weight": True,
        "model.layers.*.input_layernorm.weight": False,
        "transformer.h.*.attn.c_attn.bias": False,
        "model.embed_tokens.weight": True,
    }


def _trained(scan_stacked: bool, batches: list[dict[str, np.ndarray]]) -> tuple[Trainer, list]:
    hf = tiny_hf("llama")
    config = config_from_hf(hf.config.to_dict())
    model = build_model(config, seed=None)
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    load_state_dict(model, state, strict=True)
    set_scan_layers(model, True, per_layer=not scan_stacked)
    shapes = {n: tuple(v.shape) for n, v in named_params(model).items()}
    tx, sched = make_optimizer(
        shapes=shapes, lr=1e-2, total_steps=len(batches), warmup=0, weight_decay=0.1
    )
    trainer = Trainer(model, tx, make_train_mesh(1, 2, jax.devices()[:2]), ce_chunk=16)
    losses = [float(trainer.step(b)["loss"]) for b in batches]
    return trainer, losses


def test_stacked_train_step_checkpoint_and_export(tmp_path: Path) -> None:
    """Training with stacked storage equals training per layer (loss and updated weights);
    its export equals the per-layer model's export file for file; a checkpoint written with
    one storage refuses to resume with the other, naming the setting."""
    rows = single_rows(random_examples(8, seed=3))
    batches = [
        collate_rows(rows, np.arange(s, s + 4), accum=2, length=32, pad_id=0) for s in (0, 4)
    ]
    t_list, l_list = _trained(False, batches)
    t_stack, l_stack = _trained(True, batches)
    assert any(".*." in k for k in t_stack.params) and not any(".*." in k for k in t_list.params)
    np.testing.assert_allclose(l_stack, l_list, rtol=1e-6)
    model = t_stack.model()
    got = host(named_params(model, per_layer=True))
    want = host(t_list.params)
    assert list(got) == list(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6 * np.abs(v).max(), err_msg=k)

    # export: the stacked model's files are byte-identical to its unstacked copy's
    small = 40_000  # several shards: the per-layer order decides what goes where
    export_hf(model, tmp_path / "stacked", max_shard_bytes=small)
    export_hf(unstack_layers(t_stack.model()), tmp_path / "list", max_shard_bytes=small)
    files = sorted(p.name for p in (tmp_path / "list").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert sorted(p.name for p in (tmp_path / "stacked").iterdir()) == files
    for f in files:
        assert (tmp_path / "stacked" / f).read_bytes() == (tmp_path / "list" / f).read_bytes(), f
    index = json.loads((tmp_path / "list" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.up_proj.weight" in index["weight_map"]

    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=0, use_async=False)
    ckpt.save(1, t_stack.state(), {"step": 1})
    with pytest.raises(LayerStorageMismatchError, match=r"scan_layers=True"):
        ckpt.restore(1, t_list.abstract_state())
    state, data = ckpt.restore(1, t_stack.abstract_state())  # the same storage resumes
    assert data == {"step": 1}
    ckpt.close()

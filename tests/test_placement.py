"""Parameters are placed on the mesh once: steady-state calls move only the batch.

On 8 CPU devices (conftest), a second call with a batch already on the mesh runs under
`jax.transfer_guard("disallow")`: any weight copied between devices or from the host per call
would raise.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from support.models import loaded
from support.scoring import packed_batch, tiny_batch

from resofilter_jax.parallel import make_mesh, replicate, shard_batch
from resofilter_jax.scoring.ifd import make_batch_fn
from resofilter_jax.scoring.param_select import select_params
from resofilter_jax.scoring.resonance import ResonanceSpec, make_resonance_fn


def _steady(call) -> None:
    jax.block_until_ready(call())  # compiles, places constants
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(call())


def test_resonance_weights_are_placed_once() -> None:
    model, _ = loaded("llama")
    mesh = make_mesh()
    n = mesh.devices.size
    spec = ResonanceSpec(params=tuple(select_params(model, param_type="mlp.up_proj.weight")))
    fn = make_resonance_fn(model, spec, data_shards=n).place(mesh)
    unpacked = shard_batch(tiny_batch("llama", dummy_rows=n - 3), mesh)  # [n, 24]
    _steady(lambda: fn(unpacked))
    arrays, _ = packed_batch(tiny_batch("llama"), [[0, 1], [2]], 48, dummy_rows=n - 2)
    packed = shard_batch({k: np.asarray(v, np.int32) for k, v in arrays.items()}, mesh)
    _steady(lambda: fn(packed, slots=2))


def test_ifd_batch_fn_with_replicated_state_moves_only_the_batch() -> None:
    model, _ = loaded("llama")
    mesh = make_mesh()
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)
    fn = make_batch_fn(graphdef, chunk=8)
    n = mesh.devices.size
    batch = tiny_batch("llama", dummy_rows=n - 3)
    arrays = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "loss_mask": (batch["labels"] >= 0).astype(np.float32),
    }
    on_mesh = shard_batch(arrays, mesh)
    _steady(lambda: fn(state, on_mesh))


def test_loading_places_each_tensor_straight_to_its_fsdp_shards(tmp_path, monkeypatch) -> None:
    """On a (data 2, fsdp 4) mesh every matrix arrives split over fsdp: each device holds only
    its shard, no tensor is ever put whole on a device (the default-device path is never
    taken), and the values equal a plain load."""
    from support.data import build_tokenizer
    from support.models import save_tiny_model

    from resofilter_jax.models import registry
    from resofilter_jax.models.loading import load_model
    from resofilter_jax.parallel import make_train_mesh, param_shardings

    save_tiny_model("llama", build_tokenizer("bos"), tmp_path / "llama")
    mesh = make_train_mesh(2, 4, jax.devices()[:8])
    whole = []
    plain_asarray = registry.jnp.asarray

    def watched(value, *args, **kw):
        whole.append(tuple(value.shape))
        return plain_asarray(value, *args, **kw)

    monkeypatch.setattr(registry.jnp, "asarray", watched)
    lm = load_model(tmp_path / "llama", shardings=lambda shapes: param_shardings(shapes, mesh))
    monkeypatch.setattr(registry.jnp, "asarray", plain_asarray)
    assert whole == []  # nothing went whole to the default device
    params = registry.named_params(lm.model)
    want = param_shardings({n: tuple(p.shape) for n, p in params.items()}, mesh)
    split = 0
    for name, p in params.items():
        assert p.sharding.is_equivalent_to(want[name], p.ndim), name
        for shard in p.addressable_shards:
            assert shard.data.shape == want[name].shard_shape(p.shape), name
        split += want[name].shard_shape(p.shape) != p.shape
    assert split >= 8  # the matrices are split, not replicated
    ref = registry.named_params(load_model(tmp_path / "llama").model)
    for name, p in params.items():
        np.testing.assert_array_equal(np.asarray(p), np.asarray(ref[name]), err_msg=name)

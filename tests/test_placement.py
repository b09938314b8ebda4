"""Parameters are placed on the mesh once: steady-state calls move only the batch.

On 8 CPU devices (conftest), a second call with a batch already on the mesh runs under
`jax.transfer_guard("disallow")`: any weight copied between devices or from the host per call
would raise.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
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


def _tiny_llama(tmp_path) -> tuple[object, object]:
    """A saved tiny llama (a vocabulary that fits the test tokenizer) and that tokenizer."""
    from support.data import build_tokenizer
    from support.models import save_tiny_model

    tok = build_tokenizer("bos")
    save_tiny_model("llama", tok, tmp_path / "llama")
    return tmp_path / "llama", tok


def test_train_step_takes_over_the_loaded_shards_and_moves_only_the_batch(tmp_path) -> None:
    """Training as the train pipeline builds it: the model loaded straight to its fsdp shards
    is handed to the Trainer without a copy (same device buffers), and a steady-state step on
    (data 2, fsdp 4) moves nothing between devices and nothing back to the host: only the
    batch goes host -> device."""
    import optax

    from resofilter_jax.data import SFTExample
    from resofilter_jax.models.loading import load_model
    from resofilter_jax.models.registry import named_params
    from resofilter_jax.parallel import make_train_mesh, param_shardings
    from resofilter_jax.training.sft_data import collate_rows, single_rows
    from resofilter_jax.training.trainer import Trainer

    path, _ = _tiny_llama(tmp_path)
    mesh = make_train_mesh(2, 4, jax.devices()[:8])
    lm = load_model(path, shardings=lambda shapes: param_shardings(shapes, mesh))
    loaded_buffers = {
        n: [s.data.unsafe_buffer_pointer() for s in p.addressable_shards]
        for n, p in named_params(lm.model).items()
    }
    schedule = optax.linear_schedule(1e-3, 0.0, 10)
    trainer = Trainer(lm.model, optax.adamw(schedule), mesh, schedule=schedule, copy_params=False)
    for name, p in trainer.params.items():
        assert [s.data.unsafe_buffer_pointer() for s in p.addressable_shards] == loaded_buffers[
            name
        ], name  # taken over, not copied
        assert p.sharding.is_equivalent_to(trainer.param_sharding[name], p.ndim), name
    again = load_model(path, shardings=lambda shapes: param_shardings(shapes, mesh)).model
    copied = Trainer(again, optax.adamw(schedule), mesh)  # the default: a copy on the devices
    for name, p in named_params(again).items():
        mine = [s.data.unsafe_buffer_pointer() for s in copied.params[name].addressable_shards]
        assert mine != [s.data.unsafe_buffer_pointer() for s in p.addressable_shards], name
    rng = np.random.default_rng(0)
    examples = [
        SFTExample(i, ids, ids.copy(), "ok")
        for i, ids in enumerate(rng.integers(3, 60, size=(16, 20)).astype(np.int32))
    ]
    batch = collate_rows(single_rows(examples), np.arange(16), accum=2, length=32, pad_id=0)
    jax.block_until_ready(trainer.step(batch))  # compiles
    with jax.transfer_guard_device_to_device("disallow"):
        with jax.transfer_guard_device_to_host("disallow"):
            metrics = jax.block_until_ready(trainer.step(batch))
    assert float(metrics["lr"]) == pytest.approx(float(schedule(1)))


def test_heldout_loss_generation_and_embeddings_place_the_weights_once(tmp_path) -> None:
    """The evaluation runners (held-out loss on the mesh, greedy generation) and select's
    embedder, on 8 devices with the model on one: every per-batch call runs with implicit
    device-to-device transfers disallowed, so the weights are placed once per run, explicitly,
    not moved next to each batch."""
    from resofilter_jax.data import Record
    from resofilter_jax.models.generate import generate
    from resofilter_jax.models.loading import load_model
    from resofilter_jax.parallel import make_mesh
    from resofilter_jax.selection.embeddings import embed_texts
    from resofilter_jax.training.evaluation import heldout_loss

    path, tok = _tiny_llama(tmp_path)
    lm = load_model(path)
    records = [Record(i, f"add {i} and {i + 1}", "", f"{2 * i + 1}") for i in range(12)]
    with jax.transfer_guard_device_to_device("disallow"):
        got = heldout_loss(lm.model, tok, records, template="none", max_length=64, batch_rows=8)
        assert got["examples"] == 12 and np.isfinite(got["loss"])
        out = generate(lm.model, [[1, 5, 6], [1, 7]], max_new_tokens=3, stop_ids=[2], batch_size=2)
        assert len(out) == 2
        emb = embed_texts(lm.model, tok, [r.instruction for r in records], mesh=make_mesh())
        assert emb.shape[0] == 12

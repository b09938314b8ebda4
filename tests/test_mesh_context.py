"""Every runner traces its step with its mesh in context (`parallel.traced_on`).

Splash attention's Mosaic kernel is not partitioned by XLA: on a multi-device TPU mesh it
runs per device under `shard_map`, over the mesh it reads from the tracing context
(`models/attention.py`), and without one it is refused. So each runner that calls a jitted
model step (IFD and resonance scoring, the train step, held-out loss, periodic held-out
loss, select's embeddings) must trace it inside `traced_on(mesh)`. On 8 CPU devices a spy in
place of the decoder layer's attention records the abstract mesh each trace sees.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

import resofilter_jax.models.llama as llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def traced_meshes(monkeypatch) -> list[Any]:
    """The abstract mesh in context at every trace of a llama layer's attention."""
    seen: list[Any] = []
    real = llama.attend

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(jax.sharding.get_abstract_mesh())
        return real(*args, **kwargs)

    monkeypatch.setattr(llama, "attend", spy)
    return seen


def _check(seen: list[Any], axes: dict[str, int]) -> None:
    assert seen, "the step was not traced (cached from elsewhere?)"
    for mesh in seen:
        assert not mesh.empty, "traced without the mesh in context"
        assert dict(mesh.shape) == axes


def _tiny_llama(tmp_path) -> tuple[Any, Any]:
    from support.data import build_tokenizer
    from support.models import save_tiny_model

    tok = build_tokenizer("bos")
    save_tiny_model("llama", tok, tmp_path / "llama")
    return tmp_path / "llama", tok


def _records(n: int) -> list[Any]:
    from resofilter_jax.data import Record

    return [Record(i, f"add {i} and {i + 1}", "", f"{2 * i + 1} is the sum") for i in range(n)]


def test_scoring_runners_trace_on_their_mesh(tmp_path, traced_meshes) -> None:
    from resofilter_jax.models.loading import load_model
    from resofilter_jax.scoring.param_select import select_params
    from resofilter_jax.scoring.reso_runner import score_resonance
    from resofilter_jax.scoring.resonance import ResonanceSpec
    from resofilter_jax.scoring.runner import score_ifd

    path, tok = _tiny_llama(tmp_path)
    model = load_model(path).model
    score_ifd(model, tok, _records(10), max_length=64, min_bucket=16, progress=False)
    _check(traced_meshes, {"data": 8})
    traced_meshes.clear()
    spec = ResonanceSpec(params=tuple(select_params(model, param_type="mlp.up_proj.weight")))
    for pack in (False, True):
        score_resonance(
            model, tok, _records(6), spec, max_length=64, min_bucket=16, pack=pack, progress=False
        )
    _check(traced_meshes, {"data": 8})


def test_training_and_evaluation_trace_on_their_mesh(tmp_path, traced_meshes) -> None:
    import optax

    from resofilter_jax.data import SFTExample
    from resofilter_jax.models.loading import load_model
    from resofilter_jax.parallel import make_mesh, make_train_mesh
    from resofilter_jax.selection.embeddings import embed_texts
    from resofilter_jax.training.evaluation import heldout_loss
    from resofilter_jax.training.sft_data import collate_rows, single_rows
    from resofilter_jax.training.trainer import Trainer

    path, tok = _tiny_llama(tmp_path)
    model = load_model(path).model
    mesh = make_train_mesh(2, 4, jax.devices()[:8])
    trainer = Trainer(model, optax.adamw(1e-3), mesh)
    rng = np.random.default_rng(0)
    examples = [
        SFTExample(i, ids, ids.copy(), "ok")
        for i, ids in enumerate(rng.integers(3, 60, size=(8, 20)).astype(np.int32))
    ]
    trainer.step(collate_rows(single_rows(examples), np.arange(8), accum=1, length=32, pad_id=0))
    _check(traced_meshes, {"data": 2, "fsdp": 4})
    traced_meshes.clear()
    model = load_model(path).model  # the trainer donated the first one's buffers
    heldout_loss(model, tok, _records(12), template="none", max_length=48, batch_rows=8)
    _check(traced_meshes, {"data": 8})
    traced_meshes.clear()
    embed_texts(model, tok, [r.instruction for r in _records(12)], mesh=make_mesh())
    _check(traced_meshes, {"data": 8})

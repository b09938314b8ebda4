"""Resonance on packed rows (several examples per row, one backward pass) against the loop.

The packed engine (`resofilter_jax.scoring.segment_grads`) must give every example exactly
the gradient it has alone: checked against the float64 torch AdamW loop with the allowances
of `test_resonance` (every feature of every matrix, tiny Llama / GPT-2 / Gemma 2, matrices
and vectors) and across slot counts, microbatches and data shards. The real SmolLM2 check
and the backward-work count of packed rows are in `test_resonance` (shared fixtures).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from support.models import loaded
from support.scoring import (
    TINY,
    assert_matches_loop,
    packed_batch,
    per_example,
    tiny,
    tiny_batch,
    tiny_run,
)

from resofilter_jax.data import segment_slots
from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.scoring.projection import ProjectionSpec
from resofilter_jax.scoring.reso_features import histogram_bytes
from resofilter_jax.scoring.resonance import (
    ResonanceSpec,
    example_bytes,
    make_resonance_fn,
    max_slots,
    microbatch_size,
)
from resofilter_jax.scoring.segment_grads import unsupported


@pytest.mark.parametrize(
    "name",
    [
        "llama",
        pytest.param("gpt2", marks=pytest.mark.slow),
        pytest.param("gemma2", marks=pytest.mark.slow),
    ],
)
def test_packed_rows_match_the_float64_torch_adamw_loop(name: str) -> None:
    """All three samples in one row (slots 4: one empty slot), then two rows + a dummy row."""
    spec, _, ref = tiny_run(name)  # matrices of every layer + attention + a norm / bias vector
    model, _ = loaded(name)
    fn = make_resonance_fn(model, spec)
    assert fn.packable
    batch = tiny_batch(name)
    for rows, length, dummy, slots in (([[0, 1, 2]], 64, 0, 4), ([[2, 0], [1]], 48, 1, 2)):
        arrays, where = packed_batch(batch, rows, length, dummy)
        assert segment_slots(arrays) <= slots
        out = jax.device_get(fn(arrays, slots=slots))
        assert out["score"].shape == (len(rows) + dummy, slots)
        assert_matches_loop(spec, per_example(out, where), ref)
        used = np.zeros(out["score"].shape, bool)
        used[tuple(np.asarray(where).T)] = True
        assert np.isnan(out["score"][~used]).all() and (out["n_tokens"][~used] == 0).all()
        assert (out["n_abs_le_1e-05"][~used] == -1).all()


@pytest.mark.slow  # invariance sweep
def test_slots_microbatches_and_data_shards_give_the_same_results() -> None:
    spec, _, ref = tiny_run("llama")
    model, _ = loaded("llama")
    proj = ProjectionSpec(dim=16, seed=3, block=100)
    spec = ResonanceSpec(params=spec.params, projection=proj)
    batch = tiny_batch("llama")
    arrays, where = packed_batch(batch, [[1], [0, 2]], 48, dummy_rows=2)  # [4, 48]
    runs = {}
    for slots, micro, shards in ((2, None, 1), (4, 1, 1), (2, 1, 2), (8, 2, 4)):
        s = ResonanceSpec(params=spec.params, projection=proj, micro=micro)
        out = make_resonance_fn(model, s, data_shards=shards)(arrays, slots=slots)
        runs[(slots, micro, shards)] = per_example(jax.device_get(out), where)
    base = runs[(2, None, 1)]
    unpacked = jax.device_get(make_resonance_fn(model, spec)(batch))
    for key, out in runs.items():
        assert_matches_loop(spec, out, ref)  # each run against the float64 loop
        np.testing.assert_allclose(out["loss"], base["loss"], rtol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(out["score"], base["score"], rtol=1e-6, err_msg=str(key))
        p, q = out["projection"], unpacked["projection"]
        err = np.linalg.norm(p - q, axis=1) / np.linalg.norm(q, axis=1)
        assert err.max() < 1e-5, (key, err)


def test_a_label_on_a_segment_start_is_not_predicted_from_the_previous_segment() -> None:
    spec, _, ref = tiny_run("llama")
    model, _ = loaded("llama")
    arrays, where = packed_batch(tiny_batch("llama"), [[0, 1, 2]], 64)
    starts = np.nonzero(np.diff(arrays["attention_mask"][0]))[0] + 1  # segments 2 and 3
    arrays["labels"][0, starts] = arrays["input_ids"][0, starts]  # would cross segments
    out = per_example(jax.device_get(make_resonance_fn(model, spec)(arrays, slots=4)), where)
    assert_matches_loop(spec, out, ref)


def test_embeddings_and_the_lm_head_need_unpacked_rows() -> None:
    model, _ = loaded("llama")
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert unsupported(model, names) == ["model.embed_tokens.weight"]
    fn = make_resonance_fn(model, ResonanceSpec(params=tuple(names)))
    assert not fn.packable
    arrays, _ = packed_batch(tiny_batch("llama"), [[0, 1, 2]], 64)
    with pytest.raises(ValueError, match="embed_tokens"):
        fn(arrays, slots=4)
    gpt2, _ = loaded("gpt2")
    assert unsupported(gpt2, ["transformer.wte.weight", "transformer.wpe.weight"]) == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
    ]
    assert unsupported(gpt2, ["transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight"]) == []
    fn = make_resonance_fn(model, ResonanceSpec(params=("model.layers.0.mlp.up_proj.weight",)))
    with pytest.raises(ValueError, match="more than slots=2"):
        fn(arrays, slots=2)


def test_row_memory_counts_every_packed_example() -> None:
    model, _ = loaded("llama")
    # Without quantiles: their histograms (a fixed ~5 MB per example, checked below) would
    # dwarf this tiny model's gradients and activations that the sizing is checked on here.
    spec = ResonanceSpec(params=("model.layers.1.mlp.up_proj.weight",), quantiles=())
    one, four = (
        example_bytes(model, spec, 64, segments=2),
        example_bytes(model, spec, 64, segments=4),
    )
    assert four - one >= 2 * 4 * 64 * 128  # two more examples' fp32 gradients
    with_quantiles = ResonanceSpec(params=spec.params)  # the 5 default quantiles
    histograms = example_bytes(model, with_quantiles, 64, segments=4) - four
    assert histograms == 4 * histogram_bytes(5)  # every packed example's histograms
    tight = ResonanceSpec(params=spec.params, quantiles=(), memory_budget_bytes=four - 1)
    assert microbatch_size(model, tight, 64, rows=8) == 1
    assert max_slots(model, tight, 64, 8) == 3 and max_slots(model, spec, 64, 8) == 8
    with pytest.raises(ValueError, match="one row of 4 packed examples"):
        microbatch_size(model, tight, 64, rows=8, segments=4)


def test_padding_rows_and_unused_slots_cost_no_examples() -> None:
    """A batch of only dummy rows: every slot empty, NaN scores, no NaN leaking into counts."""
    model, _ = loaded("llama")
    spec = ResonanceSpec(params=(TINY["llama"][1][0],))
    arrays, _ = packed_batch(tiny_batch("llama"), [], 24, dummy_rows=2)
    assert (arrays["labels"] == IGNORE_INDEX).all() and segment_slots(arrays) == 0
    out = jax.device_get(make_resonance_fn(model, spec)(arrays, slots=1))
    assert np.isnan(out["score"]).all() and (out["n_tokens"] == 0).all()


@pytest.mark.slow  # family sweep
def test_gemma3_head_norm_vectors_pack_like_unpacked(tmp_path) -> None:
    """q_norm / k_norm act on [b, s, heads, d]: per-token copies take the input's rank."""
    lm, _, _ = tiny("gemma3", "bos", str(tmp_path))
    names = ["model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"]
    names += [
        "model.layers.1.pre_feedforward_layernorm.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    rng = np.random.default_rng(0)
    ids = np.zeros((3, 24), np.int32)
    mask = np.zeros((3, 24), np.int32)
    labels = np.full((3, 24), IGNORE_INDEX, np.int32)
    for i, n in enumerate((20, 13, 9)):
        ids[i, :n] = rng.integers(3, lm.config.vocab_size, n)
        mask[i, :n] = 1
        labels[i, 3:n] = ids[i, 3:n]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fn = make_resonance_fn(lm.model, ResonanceSpec(params=tuple(names)))
    assert fn.packable
    want = jax.device_get(fn(batch))
    arrays, where = packed_batch(batch, [[0, 1, 2]], 48)
    got = per_example(jax.device_get(fn(arrays, slots=4)), where)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    for f in ("score", "mean_abs", "l2", "max", "min", "q10_abs", "q99_abs"):
        np.testing.assert_allclose(got[f], want[f], rtol=1e-5, err_msg=f)

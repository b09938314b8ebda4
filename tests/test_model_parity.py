"""Numerical parity of every model family with the transformers PyTorch reference.

Each case builds a tiny random HF model (fp32, eager attention), copies its state dict into the
NNX model with `load_state_dict(strict=True)` and compares logits and final hidden states at
every non-padded position of a right-padded batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from support.models import GEMMA_KWARGS, GPT2_KWARGS, HF_CONFIGS, SEQ, loaded, reference

from resofilter_jax.models import layers
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.gpt2 import GPT2_IGNORED_KEYS
from resofilter_jax.models.registry import (
    CheckpointMismatchError,
    build_model,
    load_state_dict,
)


def _assert_parity(actual: Any, expected: np.ndarray, mask: np.ndarray) -> None:
    valid = mask > 0
    want = expected[valid]
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float32)[valid],
        want,
        rtol=1e-5,
        atol=1e-5 * float(np.abs(want).max()),
    )


# Sweeps over every family: the fast tier keeps one of each architecture (gpt2, llama with
# GQA, gemma3 with sliding windows); the slow tier runs them all.
FAST_TIER_FAMILIES = ("gpt2", "llama", "gemma3")
FAST_TIER_SWEEP = [
    n if n in FAST_TIER_FAMILIES else pytest.param(n, marks=pytest.mark.slow) for n in HF_CONFIGS
]


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_hidden_match_transformers(name: str) -> None:
    case = reference(name)
    assert np.abs(case.logits).max() > 1.0, "reference logits are trivially small"
    _, out = loaded(name)
    assert out.logits.shape == case.logits.shape
    _assert_parity(out.logits, case.logits, case.attention_mask)
    _assert_parity(out.hidden, case.hidden, case.attention_mask)


def test_cases_exercise_sliding_windows_and_both_gemma3_layer_types() -> None:
    for name in ("mistral", "qwen2_sliding", "gemma2", "gemma3"):
        cfg = reference(name).config
        assert cfg.sliding_window is not None and cfg.sliding_window < SEQ
        assert any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)), name
    gemma3 = reference("gemma3").config
    assert set(gemma3.layer_types) == {"sliding_attention", "full_attention"}
    assert gemma3.rope.rope_type == "linear" and gemma3.rope.factor == 4.0
    assert gemma3.rope_local is not None and gemma3.rope_local.theta == 1e4
    gemma2 = reference("gemma2").config
    assert gemma2.attn_logit_softcapping == 5.0 and gemma2.final_logit_softcapping == 8.0
    assert gemma2.attention_scale() == pytest.approx(24**-0.5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "gemma3"])
def test_logits_at_equals_gathered_logits(name: str) -> None:
    model, out = loaded(name)
    index = jnp.asarray([[0, 5, 23], [16, 2, 9], [10, 10, 0]])  # [batch, k]
    picked = model.logits_at(out.hidden, index)  # [batch, k, vocab]
    want = jnp.take_along_axis(out.logits, index[..., None], axis=1)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(picked), np.asarray(want), rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "gemma2", "gemma3"])
def test_bfloat16_runs_close_to_float32(name: str) -> None:
    """Smoke check of bf16 params and compute, not parity."""
    case = reference(name)
    _, ref = loaded(name)
    _, out = loaded(name, jnp.bfloat16)
    # The precision contract: activations in the compute dtype, logits accumulated and kept fp32.
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    valid = case.attention_mask > 0
    lo = np.asarray(out.logits, dtype=np.float32)[valid]  # [tokens, vocab]
    hi = np.asarray(ref.logits)[valid]
    assert np.isfinite(lo).all()
    bound = 0.05 * np.abs(hi).max()
    assert np.abs(lo - hi).max() <= bound
    agree = lo.argmax(-1) == hi.argmax(-1)  # [tokens]
    assert agree.mean() >= 0.95
    top2 = np.sort(hi, axis=-1)[:, -2:]  # [tokens, 2]
    assert agree[top2[:, 1] - top2[:, 0] > 2 * bound].all()  # clear winners never flip


@pytest.mark.parametrize("name", ["gpt2", "llama3_rope", "gemma3"])
def test_explicit_positions_match_transformers(name: str) -> None:
    """Per-row positions reach the learned (GPT-2) or rotary position encodings."""
    case = reference(name)
    model, _ = loaded(name)
    # Row 1 is stretched (changes relative distances, so rope sees it), row 2 shifted.
    positions = np.arange(SEQ)[None, :] * np.array([[1], [2], [1]]) + np.array([[0], [1], [3]])
    with torch.no_grad():
        want = case.hf(
            input_ids=torch.from_numpy(case.input_ids),
            attention_mask=torch.from_numpy(case.attention_mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    assert not np.allclose(want, case.logits, atol=1e-3)  # the offsets change the output
    out = model(
        jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask), jnp.asarray(positions)
    )
    _assert_parity(out.logits, want, case.attention_mask)


def test_gpt2_legacy_checkpoint_buffers_are_ignored() -> None:
    case = reference("gpt2")
    state = dict(case.state_dict)
    n_pos = case.config.max_position_embeddings
    for i in range(case.config.num_hidden_layers):  # buffers of pre-v4.x GPT-2 checkpoints
        state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, n_pos, n_pos), np.uint8))
        state[f"transformer.h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    assert "lm_head.weight" in state  # HF's tied alias of transformer.wte.weight
    model = build_model(case.config, seed=None)
    with pytest.raises(CheckpointMismatchError, match=r"transformer\.h\.0\.attn\.bias"):
        load_state_dict(model, state, strict=True)
    load_state_dict(model, state, ignore=GPT2_IGNORED_KEYS, strict=True)
    out = model(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask))
    _assert_parity(out.logits, case.logits, case.attention_mask)


def test_gpt2_rejects_unsupported_attention_options() -> None:
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        hf = transformers.GPT2Config(**GPT2_KWARGS, **{option: True}).to_dict()
        with pytest.raises(NotImplementedError, match=option):
            build_model(config_from_hf(hf), seed=None)


def test_load_state_dict_names_shape_mismatch_and_missing_keys() -> None:
    case = reference("llama")
    model = build_model(case.config, seed=None)
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = dict(case.state_dict)
    bad[name] = np.zeros((3, 64), np.float32)
    with pytest.raises(CheckpointMismatchError, match=name.replace(".", r"\.")):
        load_state_dict(model, bad, strict=True)
    missing = dict(case.state_dict)
    del missing["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        load_state_dict(model, missing, strict=True)


def test_gemma_configs_use_hf_defaults_for_absent_keys() -> None:
    """Legacy/minimal config.json files parse to what transformers itself would run."""
    gemma2 = dict(GEMMA_KWARGS, model_type="gemma2")
    for key in ("query_pre_attn_scalar", "head_dim", "sliding_window"):
        del gemma2[key]
    gemma3 = dict(
        GEMMA_KWARGS,
        model_type="gemma3_text",
        num_hidden_layers=6,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        rope_local_base_freq=10000.0,
    )
    for hf_dict, cls in (
        (gemma2, transformers.Gemma2Config),
        (gemma3, transformers.Gemma3TextConfig),
    ):
        ours = config_from_hf(hf_dict)
        theirs = config_from_hf(cls(**hf_dict).to_dict())
        for field in (
            "head_dim",
            "hidden_act",
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "sliding_window",
            "layer_types",
            "rope",
            "rope_local",
        ):
            assert getattr(ours, field) == getattr(theirs, field), (cls.__name__, field)


def test_jit_matches_eager() -> None:
    model, out = loaded("gemma3")
    case = reference("gemma3")

    @jax.jit
    def run(ids: jax.Array, mask: jax.Array) -> jax.Array:
        return model(ids, mask).logits

    jitted = run(jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask))
    _assert_parity(jitted, np.asarray(out.logits), case.attention_mask)


@pytest.mark.parametrize("name", FAST_TIER_SWEEP)
def test_scanned_layers_match_transformers(name: str) -> None:
    """`scan_layers=True` (one lax.scan over stacked layer params) computes the same model."""
    case = reference(name)
    model = build_model(case.config, seed=None)
    load_state_dict(model, case.state_dict, ignore=case.ignore, strict=True)
    model.scan_layers = True
    out = jax.jit(lambda m, i, a: m(i, a))(
        model, jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)
    )
    _assert_parity(out.logits, case.logits, case.attention_mask)
    _assert_parity(out.hidden, case.hidden, case.attention_mask)


@pytest.mark.parametrize("name", FAST_TIER_SWEEP)
def test_causal_attention_blocks_match_transformers(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention in causal query blocks (here 5 rows, so blocks end mid-sequence and the last
    one is short) computes the same model as one block: the keys it skips are all masked."""
    assert SEQ % 5 != 0 and SEQ > 10
    monkeypatch.setitem(layers.dot_product_attention.__kwdefaults__, "chunk", 5)
    case = reference(name)
    model = build_model(case.config, seed=None)
    load_state_dict(model, case.state_dict, ignore=case.ignore, strict=True)
    out = jax.jit(lambda m, i, a: m(i, a))(
        model, jnp.asarray(case.input_ids), jnp.asarray(case.attention_mask)
    )
    _assert_parity(out.logits, case.logits, case.attention_mask)
    _assert_parity(out.hidden, case.hidden, case.attention_mask)


@pytest.mark.slow  # block-size sweep
def test_attention_blocks_equal_one_block_with_softcap_window_and_gqa() -> None:
    """Block-wise attention equals the one-block computation for every block size, also with
    a soft-cap, a sliding window and 3 query heads per KV head; rows of padding included."""
    rng = np.random.default_rng(0)
    b, s, h, kv, d = 2, 11, 6, 2, 8
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    real = jnp.asarray([[1] * s, [1] * 7 + [0] * 4])
    for window in (None, 4):
        mask = layers.attention_mask_bias(real, window)
        want = layers.dot_product_attention(q, k, v, mask, scale=0.3, softcap=2.0, chunk=None)
        for chunk in (1, 2, 4, 5, 10, 11, 64):
            got = layers.dot_product_attention(q, k, v, mask, scale=0.3, softcap=2.0, chunk=chunk)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

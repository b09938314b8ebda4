"""Greedy generation: the KV-cache loop equals the cache-free loop and transformers' generate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.models import HF_CONFIGS, VOCAB, WINDOW, loaded, reference

from resofilter_jax.models.generate import (
    cut_at_stop,
    generate,
    greedy_tokens,
    left_pad,
    real_positions,
)

MAX_NEW = 10
STOP = 2  # the tiny configs' eos id
# Different lengths, one longer than the sliding window so that decoding crosses it.
PROMPT_LENGTHS = (3, 2 * WINDOW + 3, 7)


def _prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(name: str, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy generate on the left-padded batch, cut at the stop token."""
    hf = reference(name).hf
    width = max(map(len, prompts))
    ids, mask = left_pad(prompts, width, 0)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=STOP,
            pad_token_id=0,
        )
    return [cut_at_stop(row[width:].tolist(), [STOP]) for row in out.numpy()]


# The fast tier keeps gpt2 and llama; the other families run in the slow tier.
@pytest.mark.parametrize(
    "name",
    [
        n if n in ("gpt2", "llama") else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(HF_CONFIGS)
    ],
)
def test_cached_generate_equals_uncached_and_transformers(name: str) -> None:
    model, _ = loaded(name)
    prompts = _prompts(seed=len(name))
    kw = dict(max_new_tokens=MAX_NEW, stop_ids=[STOP], batch_size=4, prompt_bucket=8)
    cached = generate(model, prompts, use_cache=True, **kw)
    uncached = generate(model, prompts, use_cache=False, **kw)
    assert cached == uncached
    assert cached == _hf_greedy(name, prompts)
    assert any(len(c) > 1 for c in cached)  # the comparison covers real decode steps


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("llama", marks=pytest.mark.slow),
        pytest.param("gemma2", marks=pytest.mark.slow),
        "gpt2",
    ],
)
def test_cached_logits_equal_full_forward(name: str) -> None:
    """Each cached decode step's hidden state equals a full forward over the sequence."""
    model, _ = loaded(name)
    prompts = _prompts(seed=1)
    width = 2 * WINDOW + 8
    ids, mask = left_pad(prompts, width, 0)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    tokens = greedy_tokens(
        model, ids, mask, jnp.asarray([-1]), max_new_tokens=6, pad_id=0, use_cache=True
    )  # [b, 6] (no stop id can match)
    full_ids = jnp.concatenate([ids, tokens], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones_like(tokens)], axis=1)
    positions = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
    hidden = model.hidden_states(full_ids, full_mask, positions)
    want = np.asarray(jnp.argmax(model.logits(hidden[:, width - 1 : -1]), axis=-1))
    np.testing.assert_array_equal(np.asarray(tokens), want)

    cache = model.init_cache(len(prompts), width + 6)
    h_pre, cache = model.hidden_states(ids, mask, real_positions(mask), cache=cache)
    valid = np.asarray(mask) > 0
    np.testing.assert_allclose(
        np.asarray(h_pre)[valid], np.asarray(hidden[:, :width])[valid], rtol=1e-5, atol=1e-5
    )
    for t in range(3):
        pos = positions[:, width + t : width + t + 1]
        h_step, cache = model.hidden_states(
            tokens[:, t : t + 1], jnp.ones_like(pos), pos, cache=cache
        )
        np.testing.assert_allclose(
            np.asarray(h_step[:, 0]), np.asarray(hidden[:, width + t]), rtol=1e-5, atol=1e-5
        )


def test_generate_rejects_empty_prompts_and_missing_stop_ids() -> None:
    model, _ = loaded("llama")
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[5, 6], []], max_new_tokens=2, stop_ids=[STOP])
    with pytest.raises(ValueError, match="stop"):
        generate(model, [[5, 6]], max_new_tokens=2, stop_ids=[])


def test_generate_keeps_prompt_order_across_batches() -> None:
    model, _ = loaded("llama")
    prompts = _prompts(seed=3) + _prompts(seed=4)
    kw = dict(max_new_tokens=4, stop_ids=[STOP], prompt_bucket=8)
    together = generate(model, prompts, batch_size=2, **kw)
    alone = [generate(model, [p], batch_size=1, **kw)[0] for p in prompts]
    assert together == alone

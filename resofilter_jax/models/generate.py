"""Greedy decoding: a jit-compiled KV-cache loop, and a cache-free loop to check it against.

Prompts are left-padded to a bucketed length P so that every row's last prompt token sits in
slot P - 1 and generated tokens follow in lockstep; positions count real tokens only (as
transformers' `generate` does with left padding). The whole decode (prefill, then a
`lax.while_loop` that stops when every row has produced a stop token or `max_new_tokens`
tokens) is one compiled function per (batch, P).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from resofilter_jax.models.base import CausalLM

Array = jax.Array


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """ids, mask [len(prompts), length] int32 with every prompt right-aligned."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if p:
            ids[i, length - len(p) :] = p
            mask[i, length - len(p) :] = 1
    return ids, mask


def real_positions(mask: Array) -> Array:
    """Positions [b, s] counting real tokens only (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def _decode_loop(
    first: Array,
    step: Callable[[Any, Array, Array], tuple[Any, Array]],
    carry0: Any,
    next_pos: Array,
    stop_ids: Array,
    max_new_tokens: int,
    pad_id: int,
) -> Array:
    """Runs `step(carry, token [b], t) -> (carry, next token [b])` until all rows stopped.

    Returns tokens [b, max_new_tokens]; after a row's stop token it holds `pad_id`.
    """
    b = first.shape[0]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state: tuple) -> Array:
        t, _, _, _, _, done = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        t, carry, token, pos, out, done = state
        carry, new = step(carry, token, pos)
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], t, axis=1)
        return t + 1, carry, new, pos + 1, out, done | jnp.isin(new, stop_ids)

    state = (jnp.asarray(1, jnp.int32), carry0, first, next_pos, out, done)
    return jax.lax.while_loop(cond, body, state)[4]


def greedy_tokens(
    model: CausalLM,
    ids: Array,
    mask: Array,
    stop_ids: Array,
    *,
    max_new_tokens: int,
    pad_id: int,
    use_cache: bool = True,
) -> Array:
    """Greedy continuation tokens [b, max_new_tokens] of left-padded prompts ids, mask [b, P].

    `use_cache=False` recomputes the whole sequence at every step (the reference the cached
    loop is tested against).
    """
    b, p = ids.shape
    total = p + max_new_tokens
    pos = real_positions(mask)  # [b, P]
    next_pos = pos[:, -1] + 1  # [b]
    if use_cache:
        cache = model.init_cache(b, total)
        hidden, cache = model.hidden_states(ids, mask, pos, cache=cache)  # [b, P, d]
        first = jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)  # [b]

        def step(cache: Any, token: Array, pos: Array) -> tuple[Any, Array]:
            ones = jnp.ones((b, 1), jnp.int32)
            hidden, cache = model.hidden_states(token[:, None], ones, pos[:, None], cache=cache)
            return cache, jnp.argmax(model.logits(hidden[:, 0]), axis=-1).astype(jnp.int32)

        return _decode_loop(first, step, cache, next_pos, stop_ids, max_new_tokens, pad_id)

    buf = jnp.concatenate([ids, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
    buf_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)

    def last_logits(buf: Array, buf_mask: Array, slot: Array) -> Array:
        hidden = model.hidden_states(buf, buf_mask, real_positions(buf_mask))  # [b, T, d]
        picked = jax.lax.dynamic_slice_in_dim(hidden, slot, 1, axis=1)[:, 0]  # [b, d]
        return jnp.argmax(model.logits(picked), axis=-1).astype(jnp.int32)

    first = last_logits(buf, buf_mask, jnp.asarray(p - 1))

    def step_full(carry: Any, token: Array, pos: Array) -> tuple[Any, Array]:
        buf, buf_mask, slot = carry  # slot: where `token` goes
        buf = jax.lax.dynamic_update_slice_in_dim(buf, token[:, None], slot, axis=1)
        ones = jnp.ones((b, 1), jnp.int32)
        buf_mask = jax.lax.dynamic_update_slice_in_dim(buf_mask, ones, slot, axis=1)
        return (buf, buf_mask, slot + 1), last_logits(buf, buf_mask, slot)

    carry = (buf, buf_mask, jnp.asarray(p, jnp.int32))
    return _decode_loop(first, step_full, carry, next_pos, stop_ids, max_new_tokens, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_id", "use_cache"))
def _greedy_jit(
    graphdef: Any,
    state: Any,
    ids: Array,
    mask: Array,
    stop_ids: Array,
    *,
    max_new_tokens: int,
    pad_id: int,
    use_cache: bool,
) -> Array:
    model = nnx.merge(graphdef, state)
    return greedy_tokens(
        model,
        ids,
        mask,
        stop_ids,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        use_cache=use_cache,
    )


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    stops = set(stop_ids)
    out: list[int] = []
    for t in tokens:
        if t in stops:
            break
        out.append(int(t))
    return out


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int = 0,
    batch_size: int = 16,
    prompt_bucket: int = 64,
    use_cache: bool = True,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, cut before the first stop token.

    Prompts are sorted by length and run `batch_size` at a time (the last batch is padded
    with empty rows), each batch left-padded to a multiple of `prompt_bucket`, so a handful of
    shapes compile. Results come back in the prompts' order.

    Raises:
        ValueError: For an empty prompt or no stop ids.
    """
    if not stop_ids:
        raise ValueError("generate needs at least one stop token id")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty")
    graphdef, state = nnx.split(model)
    stops = jnp.asarray(sorted(set(stop_ids)), jnp.int32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), unit="prompt", desc="generate", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [prompts[i] for i in chunk]
        length = -(-max(len(p) for p in batch) // prompt_bucket) * prompt_bucket
        ids, mask = left_pad([*batch, *[[pad_id]] * (batch_size - len(batch))], length, pad_id)
        out = _greedy_jit(
            graphdef,
            state,
            jnp.asarray(ids),
            jnp.asarray(mask),
            stops,
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            use_cache=use_cache,
        )
        out = np.asarray(out)  # [batch_size, max_new_tokens]
        for row, i in enumerate(chunk):
            results[i] = cut_at_stop(out[row].tolist(), stop_ids)
        bar.update(len(chunk))
    bar.close()
    return results

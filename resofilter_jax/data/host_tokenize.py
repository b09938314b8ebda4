"""How the host tokenizes fast without changing a token: worker threads, and building
``encode(prompt + output)`` from the parts where the split pattern provably splits at the
join (used by :mod:`resofilter_jax.data.encoding`; its tests hold both to the full path)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from resofilter_jax.data.records import Record

if TYPE_CHECKING:
    from resofilter_jax.data.encoding import SpecialLayout


def host_workers(workers: int = 0) -> int:
    """Host threads for tokenization: ``workers`` if > 0, else every core this process may
    use (its CPU affinity)."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def map_chunks(
    fn: Callable[[Sequence[Record]], list[Any]],
    records: Sequence[Record],
    batch: int,
    workers: int,
) -> list[Any]:
    """``fn`` over consecutive chunks of ``batch`` records, concatenated in order.

    With ``workers > 1`` the chunks run on a thread pool: the fast tokenizer's batched encode
    releases the GIL, so the tokenization of several chunks runs on several cores (measured:
    2.0x with 2 threads on 2 cores, ShareGPT under SmolLM2's tokenizer). Callers pass one
    worker for tokenizers without a known special-token layout: their fallback path calls
    ``encode(..., truncation=True)``, which changes the tokenizer's truncation setting, and
    that must not race with another thread's batch.
    """
    if workers > 1:  # enough chunks to keep every worker busy, none below 64 records
        batch = min(batch, max(64, -(-len(records) // workers)))
    chunks = [records[s : s + batch] for s in range(0, len(records), batch)]
    if workers <= 1 or len(chunks) <= 1:
        return [x for chunk in chunks for x in fn(chunk)]
    with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
        return [x for part in pool.map(fn, chunks) for x in part]


def joins_exactly(tokenizer: Any, layout: SpecialLayout | None) -> bool:
    """Whether :func:`clean_join` pairs of this tokenizer encode as the join of their parts.

    True for a byte-level BPE with the GPT-2 split pattern and no normalizer (GPT-2,
    SmolLM2): the regex splits text into pre-tokens left to right and BPE runs on each
    pre-token alone, so where the split falls exactly at the join, ``encode(prompt + output)``
    is ``encode(prompt)`` and ``encode(output)`` joined (special tokens per ``layout``).
    Added tokens that contain whitespace could span the join: they turn the shortcut off.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or layout is None or backend.normalizer is not None:
        return False
    from tokenizers import pre_tokenizers

    pre = backend.pre_tokenizer
    if type(pre) is not pre_tokenizers.ByteLevel or pre.add_prefix_space or not pre.use_regex:
        return False
    if type(backend.model).__name__ != "BPE":
        return False
    added = backend.get_added_tokens_decoder().values()
    return not any(any(c.isspace() for c in a.content) for a in added)


def clean_join(prompt: str, output: str) -> bool:
    """Whether the GPT-2 split pattern always splits ``prompt + output`` at the join.

    The prompt ends with one newline after a non-space character and the output starts with
    a non-space character: the newline is a pre-token of its own in both texts (only a
    plain space attaches to the following word, and a longer whitespace run would split
    differently when followed by text), and the output's pre-tokens start at the join with
    the same text ahead of them. Python's ``isspace`` covers every Unicode White_Space
    character the pattern's ``\\s`` matches, so the check errs on the side of "no".
    """
    return (
        prompt.endswith("\n")
        and (len(prompt) == 1 or not prompt[-2].isspace())
        and output != ""
        and not output[0].isspace()
    )


def joined_ids(prompt_ids: list[int], output_ids: list[int], layout: SpecialLayout) -> list[int]:
    """``encode(prompt + output)`` from the parts' encodings (see :func:`joins_exactly`)."""
    return prompt_ids[: len(prompt_ids) - len(layout.suffix)] + output_ids[len(layout.prefix) :]

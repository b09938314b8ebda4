"""Exact token encodings for IFD scoring (Superfiltering), reverse IFD (Selective
Reflection-Tuning) and SFT/resonance (ResoFilter).

Both encoders batch-encode whole lists of texts with the (fast) tokenizer and reproduce
``tokenizer.encode(text, truncation=True, max_length=L)`` exactly by cutting the
untruncated encodings with the tokenizer's special-token layout (see :func:`truncate_ids`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from resofilter_jax.data.host_tokenize import (
    clean_join,
    host_workers,
    joined_ids,
    joins_exactly,
    map_chunks,
)
from resofilter_jax.data.records import Record
from resofilter_jax.data.templates import Template, get_template

__all__ = [
    "host_workers",
    "IGNORE_INDEX",
    "IFDPair",
    "SFTExample",
    "SpecialLayout",
    "REVERSE_INSTRUCTION",
    "encode_ifd_pairs",
    "encode_rifd_pairs",
    "encode_sft_examples",
    "encode_texts",
    "encode_truncated",
    "num_scored",
    "special_layout",
    "truncate_ids",
]

IGNORE_INDEX = -100
_PROBES = ("a", "Hello world", "0 1 2")


@dataclass(frozen=True)
class SpecialLayout:
    """Special tokens a tokenizer puts around a single sequence.

    Attributes:
        prefix: Token ids added before the content (e.g. BOS).
        suffix: Token ids added after the content (e.g. EOS).
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @property
    def n_special(self) -> int:
        """Number of added special tokens."""
        return len(self.prefix) + len(self.suffix)

    def matches(self, ids: Sequence[int]) -> bool:
        """Whether ``ids`` (encoded with special tokens) has exactly this prefix and suffix."""
        p, s = len(self.prefix), len(self.suffix)
        return (
            len(ids) >= p + s
            and tuple(ids[:p]) == self.prefix
            and tuple(ids[len(ids) - s :]) == self.suffix
        )


@dataclass(frozen=True)
class IFDPair:
    """Token sequences for one record's IFD score (or r-IFD's: the instruction as target).

    Scored positions of a sequence ``ids`` with start ``s`` are ``t`` with
    ``max(s, 1) <= t < len(ids)`` (token ``t`` predicted from the logits at ``t - 1``).

    Attributes:
        index: The record's index.
        direct_ids: [n_d] int32, the output alone.
        direct_start: First scored position of ``direct_ids``.
        cond_ids: [n_c] int32, prompt + output.
        cond_start: First scored position of ``cond_ids``.
        status: ``ok``, ``empty_output``, ``no_response_tokens`` (r-IFD:
            ``no_instruction_tokens``) or the record's error status.
        turn: The record's turn.
    """

    index: int
    direct_ids: np.ndarray
    direct_start: int
    cond_ids: np.ndarray
    cond_start: int
    status: str
    turn: int = 0


@dataclass(frozen=True)
class SFTExample:
    """Token ids and labels for one record's SFT loss / gradient.

    Attributes:
        index: The record's index.
        ids: [n] int32 token ids.
        labels: [n] int32 target ids, ``IGNORE_INDEX`` (-100) on prompt positions.
        status: ``ok``, ``no_response_tokens`` or the record's error status.
        turn: The record's turn.
    """

    index: int
    ids: np.ndarray
    labels: np.ndarray
    status: str
    turn: int = 0


def num_scored(n: int, start: int) -> int:
    """Number of scored tokens in a sequence of length ``n`` with first label ``start``."""
    return max(0, n - max(start, 1))


def _empty() -> np.ndarray:
    return np.zeros((0,), np.int32)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool = True, batch: int = 1024
) -> list[list[int]]:
    """Encodes texts with batched tokenizer calls, without truncation."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(
            list(texts[i : i + batch]),
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _find(hay: list[int], needle: list[int]) -> int:
    """Start of the first occurrence of ``needle`` in ``hay``, or -1."""
    for i in range(len(hay) - len(needle) + 1):
        if hay[i : i + len(needle)] == needle:
            return i
    return -1


def special_layout(tokenizer: Any) -> SpecialLayout | None:
    """Finds the special tokens the tokenizer adds around one sequence.

    Encodes a few probe texts with and without special tokens; returns ``None`` if they
    do not agree on one prefix/suffix (then callers fall back to per-text encoding).
    """
    layouts = set()
    for probe in _PROBES:
        full = encode_texts(tokenizer, [probe])[0]
        bare = encode_texts(tokenizer, [probe], add_special_tokens=False)[0]
        at = _find(full, bare) if bare else -1
        if at < 0:
            return None
        layouts.add(SpecialLayout(tuple(full[:at]), tuple(full[at + len(bare) :])))
    if len(layouts) != 1:
        return None
    layout = layouts.pop()
    if tuple(encode_texts(tokenizer, [""])[0]) != layout.prefix + layout.suffix:
        return None
    return layout


def truncate_ids(
    ids: Sequence[int], layout: SpecialLayout, max_length: int, side: str = "right"
) -> list[int]:
    """Cuts an untruncated encoding as ``encode(text, truncation=True, max_length=...)`` does.

    The content between the special tokens is cut to ``max_length - n_special`` tokens
    (from the right, or the left for ``side="left"``) and the special tokens are kept.
    Like the Rust tokenizer, nothing is cut when ``max_length < n_special``.
    ``ids`` must match ``layout`` (see :meth:`SpecialLayout.matches`).
    """
    ids = list(ids)
    n = layout.n_special
    if max_length < n or len(ids) <= max_length:
        return ids
    keep = max_length - n
    content = ids[len(layout.prefix) : len(ids) - len(layout.suffix)]
    content = content[:keep] if side == "right" else content[len(content) - keep :]
    return [*layout.prefix, *content, *layout.suffix]


def _cut(
    tokenizer: Any,
    layout: SpecialLayout | None,
    text: str,
    ids: list[int],
    max_length: int,
) -> list[int]:
    """Truncates one untruncated encoding, falling back to the tokenizer if it is unusual."""
    if layout is not None and layout.matches(ids):
        side = getattr(tokenizer, "truncation_side", "right")
        return truncate_ids(ids, layout, max_length, side)
    return list(tokenizer.encode(text, truncation=True, max_length=max_length))


def encode_truncated(
    tokenizer: Any,
    texts: Sequence[str],
    max_lengths: int | Sequence[int],
    *,
    layout: SpecialLayout | None = None,
) -> list[list[int]]:
    """Batched equivalent of ``[tokenizer.encode(t, truncation=True, max_length=L) ...]``.

    Args:
        tokenizer: A HF tokenizer.
        texts: Texts to encode (with special tokens).
        max_lengths: One limit for all texts, or one per text.
        layout: The tokenizer's :func:`special_layout` (computed if not given).
    """
    if isinstance(max_lengths, int):
        max_lengths = [max_lengths] * len(texts)
    if len(max_lengths) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(max_lengths)} max_lengths")
    layout = layout if layout is not None else special_layout(tokenizer)
    full = encode_texts(tokenizer, texts)
    return [
        _cut(tokenizer, layout, t, ids, m)
        for t, ids, m in zip(texts, full, max_lengths, strict=True)
    ]


def _check_room(tokenizer: Any, layout: SpecialLayout | None, max_length: int) -> None:
    """Raises if ``max_length`` leaves no room for text next to the special tokens."""
    n_special = layout.n_special if layout is not None else len(encode_texts(tokenizer, [""])[0])
    if max_length <= n_special:
        raise ValueError(
            f"max_length={max_length} leaves no room for text next to the tokenizer's "
            f"{n_special} special tokens"
        )


def encode_ifd_pairs(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_length: int,
    template: str | Template = "none",
    batch: int = 1024,
    workers: int = 1,
) -> list[IFDPair]:
    """Encodes records for IFD scoring with Superfiltering's exact tokenization.

    For ``prompt = template.prompt(r)``, ``output = r.output``, ``whole = prompt + output``
    (``encode`` = ``tokenizer.encode`` with special tokens):

    * ``ins_len = len(encode(prompt, truncation=True, max_length=max_length))``
    * direct: ``encode(output, truncation=True, max_length=max_length - ins_len + 1)``
      with start 0 (the reference scores the output alone with ``labels = input_ids``).
    * conditioned: ``encode(whole, truncation=True, max_length=max_length)`` with start
      ``len(encode(whole[:whole.rfind(output)]))`` (not truncated, as in the reference).

    Note the reference quirk kept here: when ``max_length - ins_len + 1`` is smaller than
    the number of special tokens, the tokenizer does not truncate at all, so the direct
    sequence can be longer than ``max_length``.

    Args:
        records: Records to encode.
        tokenizer: A HF (fast) tokenizer.
        max_length: The reference's ``max_length``.
        template: Prompt template (default ``none``, Superfiltering's).
        batch: Records tokenized per batched tokenizer call (bounds memory).
        workers: Host threads tokenizing chunks of ``batch`` records concurrently (see
            :func:`host_workers`); the result does not depend on it.

    Raises:
        ValueError: If ``max_length`` is not larger than the number of special tokens.

    Returns:
        One :class:`IFDPair` per record, in order. Records with an error status pass
        through with empty ids; an empty output gives ``empty_output``; a pair with no
        scored token in either sequence gives ``no_response_tokens``.
    """
    return _encode_pairs(
        records, tokenizer, template, max_length, batch, workers, _ifd_texts, "no_response_tokens"
    )


def _ifd_texts(record: Record, tmpl: Template) -> tuple[str, str, str]:
    """``(prompt, target, span)`` of a record for IFD: the template's prompt and the output."""
    return tmpl.prompt(record), record.output, record.output


def _encode_pairs(
    records: Sequence[Record],
    tokenizer: Any,
    template: str | Template,
    max_length: int,
    batch: int,
    workers: int,
    texts: Callable[[Record, Template], tuple[str, str, str]],
    no_tokens: str,
) -> list[IFDPair]:
    """:func:`_pair_chunk` over chunks of ``batch`` records on ``workers`` threads."""
    tmpl = get_template(template, tokenizer)
    layout = special_layout(tokenizer) if records else None
    if records:
        _check_room(tokenizer, layout, max_length)
    joinable = joins_exactly(tokenizer, layout)
    return map_chunks(
        lambda chunk: _pair_chunk(
            chunk, tokenizer, lambda r: texts(r, tmpl), layout, max_length, joinable, no_tokens
        ),
        records,
        batch,
        workers if layout is not None else 1,  # see map_chunks
    )


def _pair_chunk(
    records: Sequence[Record],
    tokenizer: Any,
    texts: Callable[[Record], tuple[str, str, str]],
    layout: SpecialLayout | None,
    max_length: int,
    joinable: bool,
    no_tokens: str,
) -> list[IFDPair]:
    """Superfiltering's two-sequence encoding of one batch of records.

    ``texts(r)`` gives ``(prompt, target, span)``: the target is scored alone (direct) and
    after the prompt (conditioned), whose labels start at ``whole.rfind(span)`` (IFD: span =
    target = the output). The whole text is tokenized only where the join shortcut does not
    apply (:func:`joins_exactly`, :func:`clean_join`): every record of Superfiltering's
    prompt under GPT-2 / SmolLM2 needs two tokenizer passes over its text instead of three.
    ``no_tokens`` is the status of a pair with no scored token in a sequence.
    """
    todo = [i for i, r in enumerate(records) if r.ok and r.output != ""]
    parts = [texts(records[i]) for i in todo]
    prompts = [p for p, _, _ in parts]
    targets = [t for _, t, _ in parts]
    wholes = [p + t for p, t in zip(prompts, targets, strict=True)]
    prompt_ids = encode_texts(tokenizer, prompts)
    target_ids = encode_texts(tokenizer, targets)
    whole_ids: list[list[int]] = [[] for _ in todo]
    slow = []
    for k in range(len(todo)):
        if (
            joinable
            and clean_join(prompts[k], targets[k])
            and layout.matches(prompt_ids[k])
            and layout.matches(target_ids[k])
        ):
            whole_ids[k] = joined_ids(prompt_ids[k], target_ids[k], layout)
        else:
            slow.append(k)
    for k, ids in zip(slow, encode_texts(tokenizer, [wholes[k] for k in slow]), strict=True):
        whole_ids[k] = ids
    pairs: dict[int, IFDPair] = {}
    for k, i in enumerate(todo):
        prompt, target, whole = prompts[k], targets[k], wholes[k]
        ins_len = len(_cut(tokenizer, layout, prompt, prompt_ids[k], max_length))
        direct = _cut(tokenizer, layout, target, target_ids[k], max_length - ins_len + 1)
        cond = _cut(tokenizer, layout, whole, whole_ids[k], max_length)
        cut = whole.rfind(parts[k][2])
        # whole ends with the target, so rfind usually finds the span right after the prompt.
        head_len = len(prompt_ids[k]) if cut == len(prompt) else len(tokenizer.encode(whole[:cut]))
        ok = num_scored(len(direct), 0) > 0 and num_scored(len(cond), head_len) > 0
        r = records[i]
        pairs[i] = IFDPair(
            r.index,
            np.asarray(direct, np.int32),  # [n_d]
            0,
            np.asarray(cond, np.int32),  # [n_c]
            head_len,
            "ok" if ok else no_tokens,
            r.turn,
        )
    out = []
    for i, r in enumerate(records):
        if i in pairs:
            out.append(pairs[i])
        else:
            status = r.status if not r.ok else "empty_output"
            out.append(IFDPair(r.index, _empty(), 0, _empty(), 0, status, r.turn))
    return out


# Selective Reflection-Tuning's reverse question (Li et al., 2024): the response is put into
# this instruction, which the prompt template then wraps like any no-input instruction.
REVERSE_INSTRUCTION = (
    "Below is the response to an instruction, please guess the corresponding instruction "
    "for the given response.\n{output}\nGenerate the instruction for the above response."
)


def rifd_texts(record: Record, tmpl: Template) -> tuple[str, str, str]:
    """``(reverse prompt, instruction text, span)`` of a record for reverse IFD.

    The reverse prompt is the template's prompt for the no-input instruction
    :data:`REVERSE_INSTRUCTION` (which holds the response; no system prompt); the target is
    ``instruction + input`` joined without a separator and the scored span starts at the last
    occurrence of ``instruction`` in the whole text, both as in the reference.
    """
    reverse = Record(record.index, REVERSE_INSTRUCTION.format(output=record.output))
    return tmpl.prompt(reverse), record.instruction + record.input, record.instruction


def encode_rifd_pairs(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_length: int,
    template: str | Template = "none",
    batch: int = 1024,
    workers: int = 1,
) -> list[IFDPair]:
    """Encodes records for reverse IFD (r-IFD, Selective Reflection-Tuning).

    The instruction plays the response's part of :func:`encode_ifd_pairs`, under the reverse
    prompt of :func:`rifd_texts` (``rprompt``), with ``query = instruction + input`` and
    ``whole = rprompt + query``:

    * ``r = len(encode(rprompt, truncation=True, max_length=max_length))``
    * direct: ``encode(query, truncation=True, max_length=max_length - r + 1)``, start 0;
    * conditioned: ``encode(whole, truncation=True, max_length=max_length)`` with start
      ``len(encode(whole[:whole.rfind(instruction)]))``.

    Statuses: ``empty_output`` (the reverse prompt needs the response), ``no_instruction_tokens``
    (a sequence kept no scored token, e.g. a response that fills ``max_length``) or the
    record's error status; ``ok`` otherwise. Arguments as :func:`encode_ifd_pairs`.
    """
    return _encode_pairs(
        records, tokenizer, template, max_length, batch, workers, rifd_texts,
        "no_instruction_tokens",
    )  # fmt: skip


def encode_sft_examples(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_length: int,
    template: str | Template = "alpaca",
    batch: int = 1024,
    workers: int = 1,
) -> list[SFTExample]:
    """Encodes records as SFT examples with ResoFilter's tokenization.

    ``source = template.prompt(r)``, ``target = template.response(r)``, both encoded with
    special tokens. ``ids = encode(source) + target_ids + [eos]`` where ``target_ids`` is
    ``encode(target)`` without its first token when the tokenizer adds a BOS prefix (its
    special layout has a prefix and the encoding starts with it). Labels are -100 on the
    ``len(encode(source))`` source positions and equal to the ids elsewhere (the appended
    EOS is a label). Both are then right-truncated to ``max_length``.

    Args:
        records: Records to encode.
        tokenizer: A HF (fast) tokenizer with an EOS token.
        max_length: Right-truncation length.
        template: Prompt template (default ``alpaca``).
        batch: Records tokenized per batched tokenizer call (bounds memory).
        workers: Host threads tokenizing chunks concurrently (the result does not depend
            on it).

    Returns:
        One :class:`SFTExample` per record, in order. Error records pass through with
        empty arrays; ``no_response_tokens`` when no label survives truncation.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; SFT examples append EOS")
    tmpl = get_template(template, tokenizer)
    layout = special_layout(tokenizer) if records else None
    return map_chunks(
        lambda chunk: _sft_chunk(chunk, tokenizer, tmpl, layout, max_length, eos),
        records,
        batch,
        workers if layout is not None else 1,  # see map_chunks
    )


def without_added_bos(ids: list[int], layout: SpecialLayout | None, bos: int | None) -> list[int]:
    """A separately encoded target without the BOS the tokenizer put in front of it.

    With a known special layout, its prefix counts as added when the ids start with it; else
    a leading ``bos`` does. (A template text that itself starts with the BOS token, like
    SmolLM2's ``<|im_start|>``, keeps it when the tokenizer adds no prefix.)
    """
    if layout is not None:
        added = bool(layout.prefix) and tuple(ids[: len(layout.prefix)]) == layout.prefix
    else:
        added = bos is not None and bool(ids) and ids[0] == bos
    return ids[1:] if added else ids


def _sft_chunk(
    records: Sequence[Record],
    tokenizer: Any,
    tmpl: Template,
    layout: SpecialLayout | None,
    max_length: int,
    eos: int,
) -> list[SFTExample]:
    """:func:`encode_sft_examples` for one batch of records."""
    todo = [i for i, r in enumerate(records) if r.ok]
    bos = tokenizer.bos_token_id
    src_ids = encode_texts(tokenizer, [tmpl.prompt(records[i]) for i in todo])
    tgt_ids = encode_texts(tokenizer, [tmpl.response(records[i]) for i in todo])
    done: dict[int, SFTExample] = {}
    for k, i in enumerate(todo):
        src, tgt = src_ids[k], without_added_bos(tgt_ids[k], layout, bos)
        ids = np.asarray([*src, *tgt, eos][:max_length], np.int32)  # [n]
        labels = np.asarray(([IGNORE_INDEX] * len(src) + [*tgt, eos])[:max_length], np.int32)  # [n]
        status = "ok" if bool(np.any(labels != IGNORE_INDEX)) else "no_response_tokens"
        r = records[i]
        done[i] = SFTExample(r.index, ids, labels, status, r.turn)
    return [
        done[i] if i in done else SFTExample(r.index, _empty(), _empty(), r.status, r.turn)
        for i, r in enumerate(records)
    ]

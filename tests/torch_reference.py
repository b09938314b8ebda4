"""Literal batch-of-one PyTorch implementations of Superfiltering's IFD loop (docs/DESIGN.md
§3.1) and of Selective Reflection-Tuning's reverse IFD (docs/METHODS.md).

Used as the parity references of the JAX scorer: one sample at a time, ``tokenizer.encode``
with truncation, ``model(input_ids, labels=labels).loss`` and ``exp``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def prompt_of(instruction: str, input_text: str) -> str:
    """Superfiltering's "none" prompt."""
    if input_text == "":
        return f"{instruction}\n"
    return f"{instruction}\n{input_text}\n"


def _loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(input_ids, labels=labels)
    return float(out.loss)


def ppl_whole_text(tokenizer: Any, model: Any, text: str, max_length: int) -> tuple[float, float]:
    """(ppl, loss) of ``text`` alone (labels = input_ids)."""
    ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    loss = _loss(model, ids, ids.contiguous())
    return math.exp(loss), loss


def ppl_part_text(
    tokenizer: Any, model: Any, text: str, target_span: str, max_length: int
) -> tuple[float, float]:
    """(ppl, loss) of the ``target_span`` at the end of ``text`` given what precedes it."""
    ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    start_index = text.rfind(target_span)
    start_token = len(tokenizer.encode(text[:start_index]))
    labels = ids.clone()
    labels[0, :start_token] = -100
    loss = _loss(model, ids, labels)
    return math.exp(loss), loss


def ifd_one(
    tokenizer: Any, model: Any, instruction: str, input_text: str, output: str, max_length: int
) -> dict[str, float] | None:
    """The reference's per-sample computation; None for an empty output (the reference's {}).

    A sequence with no scored token gives HF's NaN loss.
    """
    prompt = prompt_of(instruction, input_text)
    whole = prompt + output
    ins_ids = tokenizer.encode(prompt, return_tensors="pt", truncation=True, max_length=max_length)
    ins_len = ins_ids.shape[1]
    if output == "":
        return None
    ppl_alone, loss_alone = ppl_whole_text(tokenizer, model, output, max_length - ins_len + 1)
    ppl_cond, loss_cond = ppl_part_text(tokenizer, model, whole, output, max_length)
    return {
        "loss_direct": loss_alone,
        "loss_condition": loss_cond,
        "ppl_direct": ppl_alone,
        "ppl_condition": ppl_cond,
        "ifd": ppl_cond / ppl_alone,
    }


def ifd_reference(
    tokenizer: Any, model: Any, samples: list[dict[str, str]], max_length: int
) -> list[dict[str, float] | None]:
    """Runs :func:`ifd_one` over ``samples`` (dicts with instruction, input, output)."""
    model.eval()
    return [
        ifd_one(
            tokenizer, model, s["instruction"], s.get("input", "") or "", s["output"], max_length
        )
        for s in samples
    ]


# The reverse question of Selective Reflection-Tuning's analysis script, written out here
# independently of the package's copy (resofilter_jax.data.encoding.REVERSE_INSTRUCTION).
REVERSE_HEAD = (
    "Below is the response to an instruction, please guess the corresponding instruction "
    "for the given response.\n"
)
REVERSE_TAIL = "\nGenerate the instruction for the above response."
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def reverse_prompt(output: str, template: str) -> str:
    """The reverse prompt: the no-input prompt of ``template`` (``none`` | ``alpaca``)
    around the reverse question that holds ``output``."""
    question = REVERSE_HEAD + output + REVERSE_TAIL
    if template == "alpaca":
        return ALPACA_NO_INPUT.format_map({"instruction": question})
    if template == "none":
        return prompt_of(question, "")
    raise ValueError(template)


def rifd_one(
    tokenizer: Any,
    model: Any,
    instruction: str,
    input_text: str,
    output: str,
    max_length: int,
    template: str = "none",
) -> dict[str, float] | None:
    """The reference's reverse direction of one sample; None for an empty output.

    ``ppl(instruction + input alone)`` truncated to ``max_length - len(reverse prompt) + 1``
    and ``ppl(instruction + input | reverse prompt)`` with labels from the last occurrence of
    the instruction; a sequence with no scored token gives HF's NaN loss.
    """
    if output == "":
        return None
    prompt = reverse_prompt(output, template)
    whole = prompt + instruction + input_text
    rev_ids = tokenizer.encode(prompt, return_tensors="pt", truncation=True, max_length=max_length)
    rev_len = rev_ids.shape[1]
    query = instruction + input_text
    ppl_alone, loss_alone = ppl_whole_text(tokenizer, model, query, max_length - rev_len + 1)
    ppl_cond, loss_cond = ppl_part_text(tokenizer, model, whole, instruction, max_length)
    return {
        "loss_direct": loss_alone,
        "loss_condition": loss_cond,
        "ppl_direct": ppl_alone,
        "ppl_condition": ppl_cond,
        "rifd": ppl_cond / ppl_alone,
        "rifd_loss_ratio": loss_cond / loss_alone,
    }


def rifd_reference(
    tokenizer: Any,
    model: Any,
    samples: list[dict[str, str]],
    max_length: int,
    template: str = "none",
) -> list[dict[str, float] | None]:
    """Runs :func:`rifd_one` over ``samples`` (dicts with instruction, input, output)."""
    model.eval()
    return [
        rifd_one(
            tokenizer,
            model,
            s["instruction"],
            s.get("input", "") or "",
            s["output"],
            max_length,
            template,
        )
        for s in samples
    ]

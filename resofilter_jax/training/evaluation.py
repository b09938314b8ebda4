"""Evaluation of a causal LM (the evaluate command's ``run(config)``, and the trainer's
periodic held-out loss): held-out loss/perplexity, GSM8K exact match by greedy decoding.

Tasks (``--config.tasks=loss,gsm8k``):
  loss   the next-token cross-entropy of the response tokens with the training encoding (the
         template's prompt is masked, EOS appended; the same encoding the trainer and the
         resonance scorer use): token-mean loss, its perplexity, and the mean per example.
  gsm8k  greedy decoding (jit-compiled KV-cache loop) from the template's prompt plus the
         response's opening (e.g. ``<|im_start|>assistant\\n``); the answer is the text after
         the last ``####``, or else the last number; exact match against the reference's
         ``####`` answer after normalisation (commas, ``$``, trailing ``.``; numbers compared
         as numbers).
Writes OUTPUT_DIR/eval.json (metrics, config, timings) and, for gsm8k, predictions.jsonl.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from resofilter_jax import assets
from resofilter_jax.configuration import check_config
from resofilter_jax.data import (
    Record,
    SFTExample,
    encode_sft_examples,
    encode_texts,
    status_counts,
)
from resofilter_jax.data.encoding import special_layout, without_added_bos
from resofilter_jax.data.sources import read_records
from resofilter_jax.data.templates import get_template
from resofilter_jax.models.attention import configure_attention
from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.generate import generate
from resofilter_jax.models.loading import load_model
from resofilter_jax.models.precision import with_matmul_precision
from resofilter_jax.parallel import make_mesh, num_devices, replicate, shard_batch, traced_on
from resofilter_jax.runtime import enable_compilation_cache, versions
from resofilter_jax.training.sft_data import Row, collate_rows, row_length, single_rows
from resofilter_jax.training.trainer import row_loss_sums

TASKS = ("loss", "gsm8k")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_SENTINEL = "\u2063RESOFILTER_RESPONSE\u2063"


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: no commas/``$``/trailing ``.``; numbers as numbers."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(s)
    except ValueError:
        return s
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def extract_answer(text: str) -> str | None:
    """The answer of a GSM8K-style solution: after the last ``####``, else the last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        numbers = _NUMBER.findall(tail)
        return normalize_answer(numbers[0] if numbers else tail.split("\n")[0])
    numbers = _NUMBER.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def response_opening(template: Any, tokenizer: Any) -> tuple[str, str]:
    """(text the response starts with before the output, text that follows the output).

    E.g. chatml: ("<|im_start|>assistant\\n", "<|im_end|>"); alpaca/none: ("", "").
    """
    probe = Record(index=0, instruction="q", input="", output=_SENTINEL)
    text = get_template(template, tokenizer).response(probe)
    head, _, tail = text.partition(_SENTINEL)
    return head, tail


def generation_prompts(
    records: Sequence[Record], tokenizer: Any, template: str
) -> tuple[list[list[int]], list[int]]:
    """Prompt token ids (encoded as in training) for every record, and the stop token ids.

    The ids are ``encode(prompt) + encode(response opening)`` without the opening's BOS, the
    way ``encode_sft_examples`` joins source and target. Stop ids: EOS, plus the token the
    template closes a response with when that is one special token (``<|im_end|>``).
    """
    tmpl = get_template(template, tokenizer)
    head, tail = response_opening(template, tokenizer)
    sources = encode_texts(tokenizer, [tmpl.prompt(r) for r in records])
    layout = special_layout(tokenizer)
    opening = encode_texts(tokenizer, [head])[0] if head else []
    opening = without_added_bos(opening, layout, tokenizer.bos_token_id)
    stops = {tokenizer.eos_token_id}
    if tail:
        closing = encode_texts(tokenizer, [tail], add_special_tokens=False)[0]
        if closing and closing[0] in set(tokenizer.all_special_ids) | set(
            tokenizer.added_tokens_decoder
        ):
            stops.add(closing[0])
    return [[*s, *opening] for s in sources], sorted(s for s in stops if s is not None)


def heldout_examples(
    records: Sequence[Record], tokenizer: Any, *, template: str, max_length: int
) -> tuple[list[SFTExample], dict[str, int]]:
    """The training encoding of ``records``: the examples with a target token, and the number
    of the others per status."""
    examples = encode_sft_examples(records, tokenizer, max_length=max_length, template=template)
    kept = [ex for ex in examples if ex.status == "ok"]
    return kept, status_counts(ex.status for ex in examples if ex.status != "ok")


def loss_batches(
    rows: Sequence[Row], *, batch_rows: int, max_length: int, min_bucket: int, pad_id: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The held-out batches: rows by length, ``batch_rows`` at a time, each padded to its
    length bucket (a handful of compiled shapes), collated as they are consumed.

    Yields:
        (picks [batch_rows]: row indices, -1 for an all-padding dummy row; host arrays
        [1, batch_rows, length] of :func:`collate_rows`) per batch.
    """
    order = np.argsort([len(r) for r in rows], kind="stable")
    for start in range(0, len(order), batch_rows):
        picks = order[start : start + batch_rows]
        picks = np.concatenate([picks, -np.ones(batch_rows - picks.size, np.int64)])  # [rows]
        length = row_length(max(len(rows[i]) for i in picks if i >= 0), max_length, min_bucket)
        yield picks, collate_rows(rows, picks, accum=1, length=length, pad_id=pad_id)


def heldout_loss(
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    template: str,
    max_length: int,
    batch_rows: int = 16,
    min_bucket: int = 64,
    ce_chunk: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Response-token cross-entropy of `records` (the training encoding).

    Returns:
        ``loss`` (token mean), ``ppl`` (exp of it), ``loss_example_mean``, ``examples``,
        ``tokens``, ``skipped`` (statuses of examples without a target token), and
        ``per_example`` (index -> mean loss).
    """
    kept, skipped = heldout_examples(records, tokenizer, template=template, max_length=max_length)
    rows = single_rows(kept)
    mesh = make_mesh()
    n_dev = num_devices(mesh)
    batch_rows = -(-batch_rows // n_dev) * n_dev
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)

    @jax.jit
    def row_sums(state: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return row_loss_sums(nnx.merge(graphdef, state), batch, ce_chunk=ce_chunk)  # [rows] x2

    sums = np.zeros(len(rows))
    counts = np.zeros(len(rows), np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(rows), unit="example", desc="loss", disable=not progress)
    batches = loss_batches(
        rows, batch_rows=batch_rows, max_length=max_length, min_bucket=min_bucket, pad_id=pad_id
    )
    for picks, batch in batches:
        batch = shard_batch({k: v[0] for k, v in batch.items()}, mesh)
        with traced_on(mesh):
            sums_counts = row_sums(state, batch)  # [rows] x2
        s, c = (np.asarray(x) for x in sums_counts)
        real = picks >= 0
        sums[picks[real]], counts[picks[real]] = s[real], c[real]
        bar.update(int(real.sum()))
    bar.close()
    total_tokens = int(counts.sum())
    loss = float(sums.sum() / max(total_tokens, 1))
    per_example = sums / np.maximum(counts, 1)
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "loss_example_mean": float(per_example.mean()) if len(rows) else float("nan"),
        "examples": len(rows),
        "tokens": total_tokens,
        "skipped": skipped,
        "per_example": {int(kept[i].index): float(per_example[i]) for i in range(len(kept))},
    }


def gsm8k_accuracy(
    model: CausalLM,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    template: str,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    prompt_bucket: int = 64,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy-decoding exact match on GSM8K-style records (the reference answer after ``####``).

    Returns:
        (metrics: ``accuracy``, ``correct``, ``examples``, ``no_answer``; one prediction dict
        per record: index, gold, predicted, correct, generated text).
    """
    usable = [r for r in records if r.ok]
    prompts, stops = generation_prompts(usable, tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    outputs = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        pad_id=pad_id,
        batch_size=batch_size,
        prompt_bucket=prompt_bucket,
        progress=progress,
    )
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    rows = []
    for r, text in zip(usable, texts, strict=True):
        gold = extract_answer(r.output)
        pred = extract_answer(text)
        rows.append(
            {
                "index": r.index,
                "gold": gold,
                "predicted": pred,
                "correct": pred is not None and pred == gold,
                "generated": text,
            }
        )
    correct = sum(row["correct"] for row in rows)
    metrics = {
        "accuracy": correct / len(rows) if rows else float("nan"),
        "correct": correct,
        "examples": len(rows),
        "no_answer": sum(row["predicted"] is None for row in rows),
        "skipped": len(records) - len(usable),
        "max_new_tokens": max_new_tokens,
    }
    return metrics, rows


@with_matmul_precision
def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs the configured tasks; writes OUTPUT_DIR/eval.json (and predictions.jsonl).

    Raises:
        ValueError: For an unknown task.
    """
    check_config(config)
    tasks = [t.strip() for t in str(config.tasks).split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
    t0 = time.perf_counter()
    enable_compilation_cache(config.get("compilation_cache_dir", ""))
    model_path = config.model.path or str(assets.smollm2_gguf())
    data_path = config.data.path or str(assets.gsm8k_test())
    lm = load_model(
        model_path,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        max_length=config.max_length,
    )
    # Held-out loss rows are unpacked; generation (KV cache) always uses the reference.
    attention = configure_attention(lm.model, config.model.get("attention", "auto"), packed=False)
    records, _ = read_records(config, data_path, limit=config.data.limit)
    out_dir = Path(config.output_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": model_path, "data": data_path, "rows": len(records)}
    seconds: dict[str, float] = {"load": time.perf_counter() - t0}
    if "loss" in tasks:
        t = time.perf_counter()
        loss = heldout_loss(
            lm.model,
            lm.tokenizer,
            records,
            template=config.template,
            max_length=config.max_length,
            batch_rows=config.loss.batch_rows,
            min_bucket=config.min_bucket,
            progress=config.progress,
        )
        per_example = loss.pop("per_example")
        result["loss"] = loss
        seconds["loss"] = time.perf_counter() - t
        (out_dir / "loss_per_example.json").write_text(json.dumps(per_example))
    if "gsm8k" in tasks:
        t = time.perf_counter()
        metrics, rows = gsm8k_accuracy(
            lm.model,
            lm.tokenizer,
            records,
            template=config.template,
            max_new_tokens=config.generate.max_new_tokens,
            batch_size=config.generate.batch_size,
            prompt_bucket=config.generate.prompt_bucket,
            progress=config.progress,
        )
        result["gsm8k"] = metrics
        seconds["gsm8k"] = time.perf_counter() - t
        with open(out_dir / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    result["seconds"] = seconds
    record = {**result, "config": config.to_dict(), "devices": [str(d) for d in jax.devices()]}
    record["versions"] = versions()
    record["attention"] = attention  # the backend `model.attention` resolved to, and why
    (out_dir / "eval.json").write_text(json.dumps(record, indent=2, default=str))
    logging.info("eval: %s", json.dumps(result, default=str))
    return result

"""Scoring helpers: IFD parity inputs and checks, the tiny-model resonance runs against the
float64 torch AdamW loop (with the allowances explained in ``test_resonance``), packed rows
of a resonance batch, and the resonance job's config on Alpaca rows.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from torch_resonance_reference import resonance_loop

from resofilter_jax.configuration import load_config
from resofilter_jax.data import BatchPlan, Record, collate_packed, to_records
from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.models.loading import load_model
from resofilter_jax.scoring.param_select import select_params
from resofilter_jax.scoring.resonance import (
    ResonanceSpec,
    make_resonance_fn,
    matrix_feature_names,
)
from support.data import build_tokenizer, random_texts
from support.models import loaded, reference, save_tiny_model

ROOT = Path(__file__).resolve().parents[2]

# --- IFD: Alpaca rows, tiny saved models, parity with the batch-of-one torch loop ----------

MAX_LENGTH = 48
KEYS = ("loss_direct", "loss_condition", "ppl_direct", "ppl_condition", "ifd")


def alpaca_rows(n: int = 24, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of mixed lengths, incl. truncation cases, empty and 1-token outputs."""
    rng = np.random.default_rng(seed)
    words = iter(random_texts(4 * n + 16, seed=seed + 7, max_words=14))
    longs = iter(random_texts(n // 3 + 4, seed=seed + 8, max_words=90))
    rows = []
    for i in range(n):
        inp = next(words) if rng.random() < 0.4 else ""
        rows.append({"instruction": next(words) or "x", "input": inp, "output": next(words)})
        if i % 6 == 1:
            rows[-1]["output"] = next(longs)  # long output: both sequences truncated
        if i % 8 == 3:
            rows[-1]["instruction"] = next(longs)  # long prompt: few/no response tokens
    rows += [
        {"instruction": "say hello world", "input": "", "output": "hello world"},
        {"instruction": "empty", "input": "", "output": ""},
        {"instruction": "one token", "input": "", "output": "a"},
        {"instruction": " ".join(["the"] * 40), "input": "data", "output": "model score"},
        {"instruction": " ".join(["of and"] * 30), "input": "", "output": "answer " * 12},
    ]
    return rows


def records_of(rows: list[dict[str, str]]) -> list[Record]:
    """Alpaca dicts -> records (as the alpaca format reader makes them)."""
    return list(to_records(enumerate(rows), "alpaca"))


@functools.cache
def tiny(name: str, layout: str, root: str) -> tuple[Any, Any, Path]:
    """(JAX LoadedModel, torch model, dir) of a tiny random model saved to ``root``."""
    tok = build_tokenizer(layout)
    path = Path(root) / f"{name}-{layout}"
    hf = save_tiny_model(name, tok, path)
    return load_model(path), hf, path


def assert_matches_reference(
    cols: dict[str, Any], ref: list[dict[str, float] | None], rtol: float
) -> int:
    """Checks every loss/ppl/ifd against the torch loop; returns the number of ok rows."""
    n_ok = 0
    for i, want in enumerate(ref):
        status = cols["status"][i]
        if want is None:
            assert status == "empty_output", (i, status)
            continue
        if math.isnan(want["loss_direct"]) or math.isnan(want["loss_condition"]):
            assert status == "no_response_tokens", (i, status, want)
            assert all(math.isnan(cols[k][i]) for k in KEYS)
            continue
        assert status == "ok", (i, status, want)
        n_ok += 1
        for k in KEYS:
            np.testing.assert_allclose(cols[k][i], want[k], rtol=rtol, err_msg=f"row {i} {k}")
    return n_ok


# --- resonance: the tiny parity batches and the float64 torch AdamW loop -------------------

LR, EPS, WD = 1e-5, 1e-8, 0.01
# fp32 gradient errors relative to the median |g|, measured against the float64 loop on the
# tiny models (llama, gemma2, gpt2) on an AMD EPYC (AVX2, no AVX512), unpacked and packed
# alike: p99 over elements 0.7-1.1e-5 and max 2.3e-5 for transformers' own fp32 gradients,
# p99 0.5-1.1e-5 and max 3.2e-5 for ours. (The earlier 3e-6, from ~1e-6 on AVX512 Xeons, made
# three checks fail on that CPU with the same code.) GRAD_ERR is the typical scale behind
# std_abs's first-order allowance (a sum over all elements, so below the p99; it must stay
# < 1e-3 of std_abs, which 1e-5 breaks); GRAD_ERR_MAX decides which single elements a count
# or the score may place differently. The excused elements stay under 1e-3 of all.
GRAD_ERR = 5e-6
GRAD_ERR_MAX = 4e-5
PROMPTS = (5, 3, 4)  # masked prompt positions of the rows of the tiny batches
# Per tiny model: a layer type (all layers) and extra parameters (attention, a norm vector).
TINY = {
    "llama": (
        "mlp.up_proj.weight",
        [
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ],
    ),
    "gpt2": (
        "mlp.c_fc.weight",
        ["transformer.h.1.attn.c_attn.weight", "transformer.h.0.ln_2.bias"],
    ),
    "gemma2": ("mlp.up_proj.weight", ["model.layers.1.self_attn.o_proj.weight"]),
}


def tiny_batch(name: str, dummy_rows: int = 0) -> dict[str, np.ndarray]:
    """The right-padded parity batch of case `name` with masked prompts (+ all-padding rows)."""
    case = reference(name)
    ids = case.input_ids.astype(np.int32)  # [3, 24]
    mask = case.attention_mask.astype(np.int32)
    labels = np.where(mask > 0, ids, IGNORE_INDEX).astype(np.int32)
    for i, k in enumerate(PROMPTS):
        labels[i, :k] = IGNORE_INDEX
    pad = ((0, dummy_rows), (0, 0))
    return {
        "input_ids": np.pad(ids, pad),
        "attention_mask": np.pad(mask, pad),
        "labels": np.pad(labels, pad, constant_values=IGNORE_INDEX),
    }


def unpadded(batch: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    lens = batch["attention_mask"].sum(1)
    return [(batch["input_ids"][i, :n], batch["labels"][i, :n]) for i, n in enumerate(lens) if n]


@functools.cache
def tiny_run(name: str) -> tuple[ResonanceSpec, dict[str, np.ndarray], list[dict[str, Any]]]:
    """Our fp32 results on the tiny batch and the float64 torch loop's, per sample."""
    model, _ = loaded(name)
    kind, extra = TINY[name]
    names = select_params(model, param_type=kind) + extra
    spec = ResonanceSpec(params=tuple(names))
    batch = tiny_batch(name)
    out = jax.device_get(make_resonance_fn(model, spec)(batch))
    ref = resonance_loop(reference(name).hf, unpadded(batch), names, keep=True)
    return spec, out, ref


def sensitivity(grad: np.ndarray) -> np.ndarray:
    """|d|delta|/dg| times the gradient error scale, per element (AdamW)."""
    g = np.abs(grad).ravel()
    return LR * EPS / (g + EPS) ** 2 * (GRAD_ERR * np.median(g))


def max_sensitivity(grad: np.ndarray) -> np.ndarray:
    """|d|delta|/dg| times the largest per-element gradient error (GRAD_ERR_MAX), per element."""
    return sensitivity(grad) * (GRAD_ERR_MAX / GRAD_ERR)


def std_abs_allowance(delta: np.ndarray, sens: np.ndarray) -> float:
    """First-order change of std(|delta|) under per-element changes `sens` of |delta|."""
    a = np.abs(delta).ravel()
    sigma = a.std(ddof=1)
    return float(np.sum(np.abs(a - a.mean()) * sens) / ((a.size - 1) * sigma))


def near_bound(delta: np.ndarray, grad: np.ndarray, bound: float) -> int:
    """Elements that may fall on either side of `bound`: float64 |delta| within 1e-6 relative
    plus the gradient effect of the bound, or a gradient so small that its sign is uncertain."""
    g = np.abs(grad).ravel()
    close = np.abs(np.abs(delta).ravel() - bound) <= 1e-6 * bound + max_sensitivity(grad)
    return int(np.sum(close | (g <= GRAD_ERR_MAX * np.median(g))))


def assert_matches_loop(spec: ResonanceSpec, out: dict[str, Any], ref: list[dict]) -> None:
    """Every feature of every matrix of our results [n, ...] vs the float64 torch loop's."""
    np.testing.assert_allclose(out["loss"], [r["loss"] for r in ref], rtol=1e-5)
    np.testing.assert_array_equal(out["n_tokens"], [r["n_tokens"] for r in ref])
    want_score = [np.mean([r["features"][p]["mean_abs"] for p in spec.params]) for r in ref]
    for i, r in enumerate(ref):
        # 1e-5 relative plus the first-order effect on mean |delta| of a GRAD_ERR_MAX gradient
        # error per element (elements with |g| ~ eps are steep); the allowance itself must stay
        # small (< 1e-3, as for std_abs below; measured up to 1.3e-4 on gemma2, where the
        # actual difference was 1.0e-5 on an AMD EPYC).
        extra = np.mean([np.mean(max_sensitivity(r["grad"][p])) for p in spec.params])
        assert extra < 1e-3 * want_score[i], (i, extra, want_score[i])
        assert abs(out["score"][i] - want_score[i]) <= 1e-5 * want_score[i] + extra, (
            i,
            out["score"][i],
            want_score[i],
            extra,
        )
    excused = n_counted = 0
    for i, r in enumerate(ref):
        for j, p in enumerate(spec.params):
            want, delta = r["features"][p], r["delta"][p]
            sens = sensitivity(r["grad"][p])
            for f in matrix_feature_names(spec):
                got, exp = out[f][i, j], want[f]
                if f.startswith("n_"):
                    near = near_bound(delta, r["grad"][p], float(f.rsplit("_", 1)[1]))
                    excused, n_counted = excused + near, n_counted + delta.size
                    assert abs(int(got) - exp) <= near, (i, p, f, got, exp, near)
                    continue
                tol = 1e-4 * abs(exp)
                if f == "std_abs":
                    extra = std_abs_allowance(delta, sens)
                    if np.abs(r["grad"][p]).min() > 100 * EPS:  # not vacuous
                        assert extra < 1e-3 * abs(exp), (i, p, extra, exp)
                    tol += extra
                assert abs(got - exp) <= tol, (i, p, f, got, exp)
    assert excused <= 1e-3 * n_counted  # counts are compared on all but a handful of elements


# --- packed rows of a resonance batch -------------------------------------------------------


def packed_batch(
    batch: dict[str, np.ndarray], rows: list[list[int]], length: int, dummy_rows: int = 0
) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """The real rows of an unpacked batch packed as ``rows`` (lists of its row indices).

    Returns the packed arrays [len(rows) + dummy_rows, length] and, per original row, its
    (packed row, slot).
    """
    lens = batch["attention_mask"].sum(1)
    seqs = [batch["input_ids"][i, :n] for i, n in enumerate(lens)]
    labels = [batch["labels"][i, :n] for i, n in enumerate(lens)]
    plan = BatchPlan(length, np.r_[np.arange(len(rows)), -np.ones(dummy_rows, np.int64)])
    arrays, segments = collate_packed(plan, rows, seqs, [1] * len(seqs), 0, labels)
    where = [(0, 0)] * len(seqs)
    for g in segments:
        where[g.seq] = (g.row, int(arrays["attention_mask"][g.row, g.offset]) - 1)
    return arrays, where


def per_example(out: dict[str, Any], where: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Packed results [B, S, ...] -> [n, ...] in the original row order."""
    return {k: np.stack([np.asarray(v)[r, s] for r, s in where]) for k, v in out.items()}


# --- the resonance scoring job on Alpaca rows ------------------------------------------------


def data_rows() -> list[Any]:
    """Alpaca rows + a duplicate query (row 21 repeats row 2), a bad row (row 7)."""
    rows: list[Any] = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(20, seed=3))]
    rows = rows[:20]
    rows.insert(7, '{"instruction": "cut off", ')  # bad_json
    rows.append(dict(rows[2], output="another answer", id="dup"))  # same query as row 2
    rows.append({"instruction": "empty", "input": "", "output": "", "id": "empty"})
    rows.append({"instruction": " ".join(["the"] * 60), "input": "", "output": "x", "id": "long"})
    rows += [dict(r, id=f"t{i}") for i, r in enumerate(alpaca_rows(2, seed=9))]
    return rows


def make_config(model_dir: Path, data_path: Path, out: Path, **over: Any) -> Any:
    """The SmolLM2 / GSM8K resonance config, shrunk for a tiny model and Alpaca rows."""
    return load_config(
        ROOT / "configs/reso_smollm2_gsm8k.py",
        {
            "model.path": str(model_dir),
            "data.path": str(data_path),
            "data.format": "alpaca",
            "output_dir": str(out),
            "max_length": 48,
            "min_bucket": 16,
            "token_budget": 256,
            "shard_size": 8,
            "progress": False,
            "compilation_cache_dir": "",
            "resonance.last_k": 2,
            **over,
        },
    )

"""Real weights: SmolLM2-135M-Instruct from the shipped GGUF vs transformers on ShareGPT text
(logits, config, export, and the reverse IFD against its batch-of-one PyTorch loop)."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from torch_reference import rifd_reference

from resofilter_jax.data import iter_raw_rows, load_records, to_records
from resofilter_jax.scoring.runner import score_records


def _sharegpt_texts(path, n: int) -> list[str]:
    records, _ = load_records(path, "sharegpt", allow_truncated=True, on_error="status")
    good = [r for r in records if r.status == "ok" and r.output][: 4 * n]
    # A spread of lengths: short and long samples.
    good.sort(key=lambda r: len(r.instruction) + len(r.output))
    picked = good[:: max(1, len(good) // n)][:n]
    return [f"{r.instruction}\n{r.output}" for r in picked]


def test_logits_match_transformers_on_sharegpt(smollm2, smollm2_torch, sharegpt_path) -> None:
    tok = smollm2.tokenizer
    texts = _sharegpt_texts(sharegpt_path, 6)
    enc = tok(texts, max_length=192, truncation=True, padding="longest", return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    assert tok.padding_side == "right" or (mask[:, 0] == 1).all()
    assert mask.sum(1).min() < ids.shape[1] // 2  # padding really occurs
    with torch.no_grad():
        want = smollm2_torch(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    got = np.asarray(smollm2.model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    valid = mask > 0
    diff = np.abs(got - want)[valid]
    assert diff.max() < 2e-3, diff.max()
    np.testing.assert_array_equal(got.argmax(-1)[valid], want.argmax(-1)[valid])


def test_gguf_config_matches_transformers(smollm2, smollm2_torch) -> None:
    ours, theirs = smollm2.config, smollm2_torch.config
    assert ours.model_type == "llama" and ours.tie_word_embeddings
    assert (ours.hidden_size, ours.num_hidden_layers) == (
        theirs.hidden_size,
        theirs.num_hidden_layers,
    )
    assert ours.num_key_value_heads == theirs.num_key_value_heads == 3
    assert ours.rope.theta == theirs.rope_parameters["rope_theta"] == 100000.0
    assert abs(ours.norm_eps - theirs.rms_norm_eps) < 1e-12


def test_exported_directory_loads_in_transformers(smollm2, smollm2_torch, smollm2_hf_dir) -> None:
    back = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_hf_dir, attn_implementation="eager"
    ).eval()
    ids = smollm2.tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_allclose(
            back(ids).logits.numpy(), smollm2_torch(ids).logits.numpy(), rtol=1e-5, atol=1e-4
        )
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert tok("Hello world").input_ids == smollm2.tokenizer("Hello world").input_ids


def test_rifd_matches_torch_on_sharegpt(smollm2, smollm2_torch, sharegpt_path) -> None:
    """r-IFD of 5 ShareGPT rows at max_length 128 (one 8 x 128 batch): short responses (one
    instruction cut by truncation, one of a single token: nothing to score alone) and a long
    one (the reverse prompt fills max_length: no instruction token)."""
    max_length = 128
    rows = iter_raw_rows(sharegpt_path, allow_truncated=True, on_error="status")
    recs = [
        r
        for r in to_records(itertools.islice(rows, 200), "sharegpt", on_error="status")
        if r.ok and r.output
    ]
    short = sorted((r for r in recs if len(r.output) < 300), key=lambda r: len(r.instruction))
    records = short[:: len(short) // 4][:4] + [r for r in recs if len(r.output) > 1500][:1]
    cols, stats = score_records(
        smollm2.model,
        smollm2.tokenizer,
        records,
        method="rifd",
        max_length=max_length,
        min_bucket=max_length,  # one bucket: one compiled shape
        token_budget=max_length * 40,
        progress=False,
    )
    samples = [
        {"instruction": r.instruction, "input": r.input, "output": r.output} for r in records
    ]
    ref = rifd_reference(smollm2.tokenizer, smollm2_torch, samples, max_length)
    keys = ("loss_direct", "loss_condition", "ppl_direct", "ppl_condition", "rifd")
    for i, want in enumerate(ref):
        if math.isnan(want["loss_condition"]) or math.isnan(want["loss_direct"]):
            assert cols["status"][i] == "no_instruction_tokens", (i, want)
            continue
        assert cols["status"][i] == "ok", (i, cols["status"][i])
        for k in keys:
            np.testing.assert_allclose(cols[k][i], want[k], rtol=1e-4, err_msg=f"row {i} {k}")
    assert cols["status"] == ["no_instruction_tokens", "ok", "ok", "ok", "no_instruction_tokens"]
    assert stats.shapes == [(8, max_length)]
    query = [len(smollm2.tokenizer.encode(r.instruction)) for r in records]
    assert any(q > n for q, n in zip(query, cols["n_tokens_condition"], strict=True) if n > 0)

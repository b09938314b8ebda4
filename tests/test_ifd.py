"""IFD parity of the JAX scorer with a batch-of-one PyTorch Superfiltering loop.

Tiny random GPT-2 / Llama models (fp32) with small offline tokenizers at max_length 48 (so
the truncation rules and the no-response cases occur), and the real SmolLM2 weights on
ShareGPT at max_length 128 (long samples truncated); plus invariance of the scores to the
device count and the token budget.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from support.scoring import (
    KEYS,
    MAX_LENGTH,
    alpaca_rows,
    assert_matches_reference,
    records_of,
    tiny,
)
from torch_reference import ifd_reference

from resofilter_jax.data import Record, iter_raw_rows, to_records
from resofilter_jax.parallel import make_mesh
from resofilter_jax.scoring.ifd import ifd_scores, ifd_sequences
from resofilter_jax.scoring.runner import score_records


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tiny_models"))


@pytest.mark.parametrize(("name", "layout"), [("gpt2", "none"), ("llama", "bos")])
def test_tiny_models_match_torch_loop(name: str, layout: str, tiny_root: str) -> None:
    lm, hf, _ = tiny(name, layout, tiny_root)
    rows = alpaca_rows()
    cols, stats = score_records(
        lm.model,
        lm.tokenizer,
        records_of(rows),
        max_length=MAX_LENGTH,
        token_budget=256,
        min_bucket=16,
        shard_size=10,
        progress=False,
    )
    ref = ifd_reference(lm.tokenizer, hf, rows, MAX_LENGTH)
    n_ok = assert_matches_reference(cols, ref, rtol=1e-5)
    statuses = set(cols["status"])
    assert {"ok", "empty_output", "no_response_tokens"} <= statuses, statuses
    assert n_ok >= 15
    assert list(cols["index"]) == list(range(len(rows)))
    ok = np.asarray(cols["status"]) == "ok"
    assert (cols["n_tokens_condition"][ok] > 0).all() and (cols["n_tokens_direct"][ok] > 0).all()
    assert stats.batches > 2 and stats.sequences == 2 * int(ok.sum())


def test_truncation_cases_are_exercised(tiny_root: str) -> None:
    lm, _, _ = tiny("gpt2", "none", tiny_root)
    from resofilter_jax.data import encode_ifd_pairs

    pairs = encode_ifd_pairs(records_of(alpaca_rows()), lm.tokenizer, max_length=MAX_LENGTH)
    ok = [p for p in pairs if p.status == "ok"]
    assert any(len(p.cond_ids) == MAX_LENGTH for p in ok)  # conditioned cut at max_length
    full = [len(lm.tokenizer.encode(r["output"])) for r in alpaca_rows()]
    assert any(len(p.direct_ids) < full[p.index] for p in ok)  # direct cut by the prompt


@pytest.mark.parametrize(("name", "layout"), [("llama", "bos")])
def test_scores_do_not_depend_on_devices_or_budget(name: str, layout: str, tiny_root: str) -> None:
    lm, _, _ = tiny(name, layout, tiny_root)
    records = records_of(alpaca_rows(40, seed=3))
    kw = dict(max_length=MAX_LENGTH, min_bucket=16, progress=False)
    one, s1 = score_records(
        lm.model, lm.tokenizer, records, mesh=make_mesh(jax.devices()[:1]), token_budget=128, **kw
    )
    assert len(jax.devices()) == 8
    eight, s8 = score_records(
        lm.model, lm.tokenizer, records, mesh=make_mesh(), token_budget=1024, shard_size=16, **kw
    )
    assert s1.shapes != s8.shapes and all(rows % 8 == 0 for rows, _ in s8.shapes)
    assert one["status"] == eight["status"]
    for k in (*KEYS, "n_tokens_direct", "n_tokens_condition"):
        np.testing.assert_allclose(one[k], eight[k], rtol=2e-6, err_msg=k)


def test_background_preparation_and_worker_threads_change_nothing(tiny_root: str) -> None:
    """Shards prepared ahead in a thread (prefetch) with several tokenizing threads give the
    same columns, bit for bit, as preparing each shard in the loop with one thread."""
    lm, _, _ = tiny("llama", "bos", tiny_root)
    records = records_of(alpaca_rows(40, seed=5))
    kw = dict(max_length=MAX_LENGTH, min_bucket=16, progress=False, shard_size=8)
    inline, s0 = score_records(lm.model, lm.tokenizer, records, prefetch=0, workers=1, **kw)
    ahead, s2 = score_records(lm.model, lm.tokenizer, records, prefetch=2, workers=3, **kw)
    assert inline["status"] == ahead["status"] and inline["id"] == ahead["id"]
    for k in ("index", "turn", *KEYS, "n_tokens_direct", "n_tokens_condition"):
        np.testing.assert_array_equal(inline[k], ahead[k], err_msg=k)
    assert (s0.shards_computed, s0.batches, s0.tokens) == (
        s2.shards_computed,
        s2.batches,
        s2.tokens,
    )
    for s in (s0, s2):  # the waits are measured and within the loop's time
        assert 0.0 < s.host_wait_s + s.device_wait_s <= s.seconds
        assert {"host_wait_s", "device_wait_s"} <= set(s.summary())


def test_ifd_scores_host_function() -> None:
    from resofilter_jax.data import IFDPair

    e = np.zeros((0,), np.int32)
    ids = np.arange(5, dtype=np.int32)
    pairs = [
        IFDPair(0, ids, 0, ids, 2, "ok"),
        IFDPair(1, e, 0, e, 0, "empty_output"),
        IFDPair(2, ids, 0, ids, 2, "ok"),
        IFDPair(3, e, 0, e, 0, "error:bad_json"),
    ]
    seq = ifd_sequences(pairs)
    assert len(seq.seqs) == 4 and list(seq.owner) == [0, 2]
    # sample 0: direct loss 2/4, cond 3/3; sample 2: cond has no scored token
    cols = ifd_scores(pairs, seq.owner, np.array([2.0, 3.0, 1.0, 0.0]), np.array([4, 3, 4, 0]))
    assert cols["status"] == ["ok", "empty_output", "no_response_tokens", "error:bad_json"]
    assert cols["loss_direct"][0] == 0.5 and cols["loss_condition"][0] == 1.0
    assert cols["ifd"][0] == pytest.approx(math.exp(1.0) / math.exp(0.5))
    assert np.isnan(cols["ifd"][1:]).all() and list(cols["n_tokens_condition"]) == [3, 0, 0, 0]
    # Scored tokens but a NaN or Inf loss (overflow, broken weights) is never a score, and is
    # not mistaken for truncation either.
    for value in (np.nan, np.inf):
        cols = ifd_scores(
            pairs, seq.owner, np.array([2.0, value, 1.0, 2.0]), np.array([4, 3, 4, 2])
        )
        assert cols["status"] == ["nonfinite_loss", "empty_output", "ok", "error:bad_json"]
        assert np.isnan(cols["ifd"][0]) and cols["n_tokens_direct"][0] == 0


def _sharegpt_samples(path: Path, n_short: int, n_long: int) -> list[Record]:
    """Short samples of spread lengths and long ones (short prompt, long response)."""
    rows = itertools.islice(iter_raw_rows(path, allow_truncated=True, on_error="status"), 300)
    recs = [r for r in to_records(rows, "sharegpt", on_error="status") if r.ok and r.output]
    short = sorted(
        (r for r in recs if len(r.instruction) + len(r.output) < 400),
        key=lambda r: len(r.instruction) + len(r.output),
    )
    long = [r for r in recs if len(r.instruction) < 200 and len(r.output) > 1000]
    return short[:: max(1, len(short) // n_short)][:n_short] + long[:n_long]


def test_smollm2_matches_torch_on_sharegpt(smollm2, smollm2_torch, sharegpt_path) -> None:
    max_length = 128
    records = _sharegpt_samples(sharegpt_path, 9, 8)
    records.append(Record(999, "What is 2+2?", output=""))  # empty output row
    t0 = time.perf_counter()
    cols, stats = score_records(
        smollm2.model,
        smollm2.tokenizer,
        records,
        max_length=max_length,
        min_bucket=max_length,  # one bucket and one batch: a single compiled shape
        token_budget=max_length * 40,  # 40 rows
        progress=False,
    )
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    t1 = time.perf_counter()
    ref = ifd_reference(smollm2.tokenizer, smollm2_torch, rows, max_length)
    t2 = time.perf_counter()
    print(f"smollm2: jax {t1 - t0:.1f}s (incl. compile), torch batch-of-one {t2 - t1:.1f}s")
    n_ok = assert_matches_reference(cols, ref, rtol=1e-4)
    assert n_ok >= 16
    assert (cols["n_tokens_condition"] > 0).sum() >= 16
    enc = [len(smollm2.tokenizer.encode(r.instruction + "\n" + r.output)) for r in records]
    assert sum(n > max_length for n in enc) >= 6  # long samples hit truncation
    print(f"smollm2 ifd: {stats.summary()}")


def test_shards_are_written_in_a_background_thread_in_order_and_errors_surface(
    tiny_root: str,
) -> None:
    """``on_shard`` runs in the writer thread, shard after shard; a failing write stops the
    run with its own error (the next shard's submit or the end of the loop raises it)."""
    import threading

    from resofilter_jax.scoring.runner import score_ifd

    lm, _, _ = tiny("llama", "bos", tiny_root)
    records = records_of(alpaca_rows(40, seed=5))
    kw = dict(max_length=MAX_LENGTH, min_bucket=16, progress=False, shard_size=8)
    seen: list[tuple[int, str]] = []
    score_ifd(
        lm.model,
        lm.tokenizer,
        records,
        on_shard=lambda k, cols: seen.append((k, threading.current_thread().name)),
        **kw,
    )
    assert [k for k, _ in seen] == list(range(6))
    assert all(name.startswith("resofilter-write") for _, name in seen)

    def fail_on_2(k: int, cols: dict) -> None:
        if k == 2:
            raise OSError(28, "disk full while writing shard 2")
        seen.append((k, "late"))

    seen.clear()
    with pytest.raises(OSError, match="shard 2"):
        score_ifd(lm.model, lm.tokenizer, records, on_shard=fail_on_2, **kw)
    assert [k for k, _ in seen] in ([0, 1], [0, 1, 3], [0, 1, 3, 4])  # at most 2 queued after

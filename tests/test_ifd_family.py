"""The IFD family from the same forward passes: `ifd_loss_ratio`, the per-token loss lists and
T-SHIRT's informative-token IFD, each checked against a direct computation from the stored
losses; IFD's existing columns unchanged; old output directories still resume.

Tiny random GPT-2 / Llama models with the IFD parity settings of test_ifd.py (same compiled
shapes), the pipeline on a tiny GPT-2 (configs/ifd_gpt2_alpaca.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer, write_jsonl
from support.models import save_tiny_model
from support.scoring import MAX_LENGTH, alpaca_rows, records_of, tiny

from resofilter_jax.configuration import load_config
from resofilter_jax.data import IFDPair, encode_ifd_pairs
from resofilter_jax.data.sealed import read_sealed
from resofilter_jax.scoring import outputs
from resofilter_jax.scoring import pipeline as score
from resofilter_jax.scoring.ifd import NONFINITE, SCORE_COLUMNS, ifd_scores, ifd_sequences
from resofilter_jax.scoring.ifd_family import (
    informative_ifd_rows,
    informative_threshold_at_ratio,
    paired_deltas,
    token_pair_offset,
)
from resofilter_jax.scoring.runner import score_records

ROOT = Path(__file__).resolve().parents[1]
OLD_KEYS = ("loss_direct", "loss_condition", "ppl_direct", "ppl_condition", "ifd")
OLD_FINGERPRINT_KEYS = {"method", "model", "data", "template", "max_length", "limit", "shard_size"}


def _old_ifd_scores(pairs, owner, loss_sum, count) -> dict[str, Any]:
    """IFD's host columns as computed before the IFD family (frozen copy, for comparison)."""
    n = len(pairs)
    s = np.asarray(loss_sum, np.float64).reshape(-1, 2)
    c = np.asarray(count, np.float64).reshape(-1, 2)
    status = [p.status for p in pairs]
    out = {k: np.full(n, np.nan) for k in OLD_KEYS}
    out["n_tokens_direct"] = np.zeros(n, np.int64)
    out["n_tokens_condition"] = np.zeros(n, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = s / c
    empty = (c == 0).any(axis=1)
    bad = empty | ~np.isfinite(loss).all(axis=1)
    for k in np.nonzero(bad)[0]:
        status[int(owner[k])] = "no_response_tokens" if empty[k] else NONFINITE
    good = owner[~bad]
    loss = loss[~bad]
    ppl = np.exp(loss)
    out["loss_direct"][good] = loss[:, 0]
    out["loss_condition"][good] = loss[:, 1]
    out["ppl_direct"][good] = ppl[:, 0]
    out["ppl_condition"][good] = ppl[:, 1]
    out["ifd"][good] = ppl[:, 1] / ppl[:, 0]
    out["n_tokens_direct"][good] = c[~bad, 0].astype(np.int64)
    out["n_tokens_condition"][good] = c[~bad, 1].astype(np.int64)
    return {"status": status, **out}


def test_existing_columns_are_those_of_the_old_computation() -> None:
    """Every column IFD wrote before is bit-identical; ifd_loss_ratio is new, after `ifd`."""
    rng = np.random.default_rng(0)
    ids = np.arange(6, dtype=np.int32)
    pairs = [IFDPair(i, ids, 0, ids, 2, "ok" if i % 7 else "empty_output") for i in range(60)]
    seq = ifd_sequences(pairs)
    n = len(seq.seqs)
    count = rng.integers(0, 40, n).astype(np.float64)  # some 0: no scored token
    loss_sum = rng.uniform(0.0, 3.0, n) * count
    loss_sum[[3, 10]] = [np.nan, np.inf]  # non-finite losses
    new = ifd_scores(pairs, seq.owner, loss_sum, count)
    old = _old_ifd_scores(pairs, seq.owner, loss_sum, count)
    assert list(new) == ["status", *SCORE_COLUMNS] and new["status"] == old["status"]
    assert SCORE_COLUMNS.index("ifd_loss_ratio") == SCORE_COLUMNS.index("ifd") + 1
    for key in old:
        if key != "status":
            assert new[key].dtype == old[key].dtype
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)  # NaN == NaN
    assert {"ok", "no_response_tokens", NONFINITE, "empty_output"} <= set(new["status"])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = new["loss_condition"] / new["loss_direct"]
    np.testing.assert_array_equal(new["ifd_loss_ratio"], ratio)
    assert outputs.IFD_SCHEMA.names == ["index", "id", "turn", "status", *SCORE_COLUMNS]
    assert outputs.IFD_SCHEMA.remove(outputs.IFD_SCHEMA.get_field_index("ifd_loss_ratio")) == (
        outputs.SHARD_SCHEMA
    )


def _informative_by_hand(direct, cond, offset: int, threshold: float) -> float:
    """T-SHIRT's selective IFD of one row, written out independently of ifd_family."""
    pairs = [(d, cond[j + offset]) for j, d in enumerate(direct) if 0 <= j + offset < len(cond)]
    if not pairs:
        return math.nan
    delta = [float(c) - float(d) for d, c in pairs]
    kept = [x for x in delta if abs(x) > threshold]
    return math.exp(sum(kept) / len(kept)) if kept else 1.0


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tiny_models"))


@pytest.mark.parametrize(("name", "layout"), [("gpt2", "none"), ("llama", "bos")])
def test_family_columns_match_their_definitions_on_the_stored_losses(
    name: str, layout: str, tiny_root: str
) -> None:
    lm, _, _ = tiny(name, layout, tiny_root)
    records = records_of(alpaca_rows())
    kw = dict(max_length=MAX_LENGTH, token_budget=256, min_bucket=16, shard_size=10)
    cols, _ = score_records(
        lm.model, lm.tokenizer, records, token_losses=True, informative_threshold=0.3,
        progress=False, **kw,
    )  # fmt: skip
    if layout == "bos":  # the scalar columns do not depend on token_losses, bit for bit
        base, _ = score_records(lm.model, lm.tokenizer, records, progress=False, **kw)
        assert base["status"] == cols["status"]
        for key in SCORE_COLUMNS:
            np.testing.assert_array_equal(base[key], cols[key], err_msg=key)
    offset = 1 - len(lm.tokenizer.encode(""))
    assert token_pair_offset(lm.tokenizer) == offset == (0 if layout == "bos" else 1)
    n_ok = 0
    for i, status in enumerate(cols["status"]):
        d, c = cols["token_losses_direct"][i], cols["token_losses_condition"][i]
        if status != "ok":
            assert d is None and c is None and math.isnan(cols["ifd_informative"][i])
            continue
        n_ok += 1
        assert d.dtype == c.dtype == np.float32
        assert (len(d), len(c)) == (cols["n_tokens_direct"][i], cols["n_tokens_condition"][i])
        ld, lc = np.mean(d, dtype=np.float64), np.mean(c, dtype=np.float64)
        np.testing.assert_allclose(cols["loss_direct"][i], ld, rtol=1e-12)
        np.testing.assert_allclose(cols["loss_condition"][i], lc, rtol=1e-12)
        np.testing.assert_allclose(cols["ifd"][i], math.exp(lc) / math.exp(ld), rtol=1e-12)
        np.testing.assert_allclose(cols["ifd_loss_ratio"][i], lc / ld, rtol=1e-12)
        want = _informative_by_hand(d.tolist(), c.tolist(), offset, 0.3)
        np.testing.assert_allclose(cols["ifd_informative"][i], want, rtol=1e-12)
    assert n_ok >= 15
    ok = np.asarray(cols["status"]) == "ok"
    informative, ifd = cols["ifd_informative"][ok], cols["ifd"][ok]
    assert np.isfinite(informative).all() and (informative != 1.0).sum() >= 10
    assert np.mean(np.isclose(informative, ifd, rtol=1e-6)) < 0.5  # not IFD under another name


@pytest.mark.parametrize("layout", ["none", "bos", "boseos"])
def test_token_pairing_puts_the_same_response_token_side_by_side(layout: str) -> None:
    """direct[j] and cond[j + a] score the same token id (a = 1 - special tokens), also when
    both sequences are truncated; with an EOS suffix only the truncated ends differ."""
    tok = build_tokenizer(layout)
    a = token_pair_offset(tok)
    special = set(tok.all_special_ids)
    pairs = encode_ifd_pairs(records_of(alpaca_rows(48, seed=2)), tok, max_length=MAX_LENGTH)
    checked = truncated = 0
    for p in pairs:
        if p.status != "ok":
            continue
        d_ids = p.direct_ids[1:]  # the scored tokens, in order
        c_ids = p.cond_ids[max(p.cond_start, 1) :]
        got = paired_deltas(d_ids.astype(np.float64), c_ids.astype(np.float64), a)
        shifted = [(j, j + a) for j in range(len(d_ids)) if 0 <= j + a < len(c_ids)]
        assert len(got) == len(shifted) > 0
        same = [d_ids[j] == c_ids[k] for j, k in shifted if d_ids[j] not in special]
        assert all(same) and len(same) >= len(shifted) - 1, (p.index, layout)
        checked += len(same)
        truncated += len(p.cond_ids) == MAX_LENGTH
    assert checked > 400 and truncated >= 3


def test_threshold_at_ratio_is_the_quantile_of_all_paired_deltas() -> None:
    rng = np.random.default_rng(4)
    directs = [rng.uniform(0, 4, k).astype(np.float32) for k in (5, 9, 1, 7)] + [None]
    conds = [rng.uniform(0, 4, k).astype(np.float32) for k in (6, 9, 2, 3)] + [None]
    pairs = list(zip(directs[:4], conds[:4], strict=True))
    every = np.concatenate([np.abs(paired_deltas(d, c, 1)) for d, c in pairs])
    assert every.size == 5 + 8 + 1 + 2
    gamma = informative_threshold_at_ratio(directs, conds, 1, 0.5)
    assert gamma == np.median(every)
    share = np.mean(every > informative_threshold_at_ratio(directs, conds, 1, 0.25))
    assert 0.2 <= share <= 0.3
    got = informative_ifd_rows(directs, conds, 1, gamma)
    want = [_informative_by_hand(d.tolist(), c.tolist(), 1, gamma) for d, c in pairs]
    np.testing.assert_allclose(got[:4], want, rtol=1e-12)
    assert math.isnan(got[4])
    # No informative token: exp(0) = 1 (the paper's code); no token pairs up: NaN.
    small = informative_ifd_rows([np.float32([0.1, 0.2])], [np.float32([9.0, 0.15, 0.25])], 1, 0.1)
    one = informative_ifd_rows([np.float32([1.0])], [np.float32([2.0])], 1, 0.1)
    assert small[0] == 1.0 and math.isnan(one[0])


# --- the score command: list columns in the files, fingerprints, resume of old directories ---


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(alpaca_rows(20, seed=5))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def _config(model_dir: Path, data_path: Path, out: Path, **over: Any) -> Any:
    return load_config(
        ROOT / "configs/ifd_gpt2_alpaca.py",
        {
            "model.path": str(model_dir), "data.path": str(data_path), "output_dir": str(out),
            "max_length": MAX_LENGTH, "min_bucket": 16, "token_budget": 256, "shard_size": 8,
            "progress": False, "compilation_cache_dir": "", "host.encoded_cache_dir": "", **over,
        },
    )  # fmt: skip


def test_token_losses_in_the_score_files(model_dir: Path, data_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    score.run(_config(model_dir, data_path, out, **{"ifd.token_losses": True}))
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names[-5:] == [
        "ifd_informative", "n_tokens_direct", "n_tokens_condition",
        "token_losses_direct", "token_losses_condition",
    ]  # fmt: skip
    assert table.schema.field("token_losses_direct").type == pa.list_(pa.float32())
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    for r in rows:
        lists = r["token_losses_direct"], r["token_losses_condition"]
        if r["status"] != "ok":
            assert lists == (None, None) and r["ifd_informative"] is None
            continue
        assert [len(x) for x in lists] == [r["n_tokens_direct"], r["n_tokens_condition"]]
        assert math.isclose(np.mean(lists[0]), r["loss_direct"], rel_tol=1e-12)
    fp = json.loads((out / "run_config.json").read_text())
    assert fp["ifd"] == {"token_losses": True, "informative_threshold": 0.07}
    run = json.loads((out / "run.json").read_text())
    assert run["token_losses"] == {**fp["ifd"], "pair_offset": 1}
    with pytest.raises(outputs.FingerprintMismatchError, match=r"ifd"):
        score.run(_config(model_dir, data_path, out))  # default settings: other columns


def test_a_directory_written_before_the_family_resumes_to_the_fresh_output(
    model_dir: Path, data_path: Path, tmp_path: Path
) -> None:
    """Default settings keep the old fingerprint, so an old run's shards (no ifd_loss_ratio)
    are reused; the merge derives the column exactly as a fresh run computes it."""
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    score.run(_config(model_dir, data_path, fresh))
    fp = json.loads((fresh / "run_config.json").read_text())
    assert set(fp) == OLD_FINGERPRINT_KEYS  # what the code before the family wrote
    # The old run: the same fingerprint and shard files of the old columns, one shard missing.
    old.mkdir()
    (old / outputs.RUN_CONFIG).write_text((fresh / outputs.RUN_CONFIG).read_text())
    ranges = outputs.shard_ranges(len(data_path.read_text().splitlines()), 8)  # 25 rows
    run = outputs.run_hash(old)
    for k, (lo, hi) in enumerate(ranges[:-1]):
        data, why = read_sealed(outputs.shard_path(fresh, k), {})
        assert data is not None, why
        cols = pq.read_table(pa.BufferReader(data)).to_pydict()
        meta = outputs.shard_meta(run, k, lo, hi)
        outputs.write_shard(old, k, cols, outputs.SHARD_SCHEMA, (0, 1), meta)
    summary = score.run(_config(model_dir, data_path, old))
    assert summary["shards"] == {"total": 4, "computed": 1, "reused": 3}
    names = pq.read_schema(outputs.shard_path(old, 0)).names
    assert "ifd_loss_ratio" not in names  # the old shards were reused as they are
    got, want = pq.read_table(old / "scores.parquet"), pq.read_table(fresh / "scores.parquet")
    assert got.column_names == want.column_names and got.schema == want.schema
    for key in want.column_names:  # bit for bit, NaN == NaN
        a, b = got.column(key).to_pylist(), want.column(key).to_pylist()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)
    assert (old / "scores.jsonl").read_bytes() == (fresh / "scores.jsonl").read_bytes()

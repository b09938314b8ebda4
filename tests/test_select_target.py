"""Target-aware selection: the round-robin / max-cosine engine, the representation (RDS+)
policy on a tiny random model, and the gradient (LESS) policy against the analysis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.data import build_tokenizer, random_texts
from support.models import save_tiny_model
from support.selection import jsonl

from resofilter_jax.selection import target as tg
from resofilter_jax.selection.gradient import align_keys
from resofilter_jax.selection.pipeline import SelectConfig, run

# --- the engine against a direct numpy reference -----------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_round_robin(sim: np.ndarray, usable: np.ndarray, k: int) -> tuple[list, list]:
    """The definition, spelled out: targets in order, each takes its most similar row (ties:
    the lower row) that is not taken yet, until k rows are taken. sim: [T, n]."""
    ranking = [[j for j in np.lexsort((np.arange(sim.shape[1]), -s)) if usable[j]] for s in sim]
    taken, picks, who = set(), [], []
    while len(picks) < k:
        for t, rank in enumerate(ranking):
            if len(picks) == k:
                break
            j = next(j for j in rank if j not in taken)
            taken.add(j)
            picks.append(j)
            who.append(t)
    return picks, who


def test_round_robin_max_cosine_and_top_k_against_the_definition() -> None:
    rng = np.random.default_rng(0)
    for trial in range(24):
        n, d, n_t = int(rng.integers(5, 300)), int(rng.integers(2, 7)), int(rng.integers(1, 6))
        x = rng.normal(size=(n, d))
        if trial % 3 == 0:
            x = np.round(x)  # exact ties, duplicates and zero rows (no candidates)
        x[rng.random(n) < 0.1] = np.nan  # no candidates either
        t = rng.normal(size=(n_t, d)) * rng.uniform(0.5, 3.0, size=(n_t, 1))
        if trial % 4 == 0:
            t[:] = t[0]  # the same favourites: the rankings are read deeper and deeper
        b = int(rng.integers(1, 40))

        def blocks(x=x, b=b):
            return ((s, x[s : s + b]) for s in range(0, len(x), b))

        sim = _unit(t) @ np.nan_to_num(_unit(x)).T  # [T, n]
        usable = np.isfinite(x).all(1) & (np.abs(np.nan_to_num(x)).sum(1) > 0)
        got = tg.max_cosine(blocks, t, n)
        np.testing.assert_allclose(got.score[usable], sim.max(0)[usable], rtol=0, atol=1e-12)
        assert np.isnan(got.score[~usable]).all() and (got.nearest[~usable] == -1).all()
        assert (got.nearest[usable] == sim.argmax(0)[usable]).all()  # ties: the first target
        for k in (0, 1, int(usable.sum()) // 3, int(usable.sum())):
            rows, picker = tg.round_robin(blocks, t, int(usable.sum()), k)
            want_rows, want_who = _reference_round_robin(sim, usable, k)
            assert rows.tolist() == want_rows and picker.tolist() == want_who, (trial, k)
            score = np.where(usable, sim.max(0), np.nan)
            pos = np.nonzero(usable)[0]
            assert tg.top_k(score, k).tolist() == pos[np.lexsort((pos, -score[pos]))][:k].tolist()
    with pytest.raises(ValueError, match="cannot take 3 of 2"):
        tg.round_robin(blocks, t, 2, 3)
    with pytest.raises(ValueError, match="NaN or zero"):
        tg.max_cosine(blocks, np.zeros((1, d)), n)


def test_align_keys() -> None:
    ref_index, ref_turn = np.array([0, 0, 1, 3, 3, 3]), np.array([0, 1, 0, 0, 1, 2])
    got = align_keys(np.array([3, 0, 1, 2, 3]), np.array([2, 1, 0, 0, 0]), ref_index, ref_turn)
    assert got.tolist() == [5, 1, 2, -1, 3]
    same = align_keys(ref_index, ref_turn, ref_index, ref_turn)
    assert same.tolist() == list(range(6))


# --- representation (RDS+) on a tiny random model ----------------------------------------------

MAX_LENGTH = 64  # the tiny model's positions


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny random Llama saved as a HF directory, and its torch model (the reference)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    hf = save_tiny_model("llama", build_tokenizer("bos"), path)
    return path, hf


def _rep_inputs(root: Path, model: Path) -> tuple[Path, Path, Path]:
    """An Alpaca JSONL pool of 14 rows (2 not ok), its score file, and a target file."""
    words = random_texts(60, seed=5, max_words=9)
    rows = [
        {"instruction": words[3 * i] or "x", "input": words[3 * i + 1], "output": words[3 * i + 2]}
        for i in range(14)
    ]
    rows[9] = dict(rows[4])  # a duplicate text: tied with row 4 for every target
    rows = [dict(r, extra=i) for i, r in enumerate(rows)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = ["ok"] * 14
    status[2], status[11] = "empty_output", "error:bad_json"
    scores = root / "run" / "scores.parquet"
    scores.parent.mkdir()
    rng = np.random.default_rng(1)
    pq.write_table(
        pa.table({"index": np.arange(14), "status": status, "ifd": rng.uniform(0.2, 1.1, 14)}),
        scores,
    )
    cfg = {
        "method": "ifd",
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"format": "alpaca", "fields": {}, "sharegpt_turns": "first"},
        "template": "chatml",
        "max_length": MAX_LENGTH,
    }
    (scores.parent / "run_config.json").write_text(json.dumps(cfg))
    targets = root / "targets.jsonl"  # row 1 is unreadable, row 3 is pool row 6
    lines = [json.dumps({"instruction": words[50 + i] or "y", "output": words[55 + i]})
             for i in range(2)]  # fmt: skip
    targets.write_text("\n".join([lines[0], '{"cut', lines[1], json.dumps(rows[6])]) + "\n")
    return data, scores, targets


def _reference_embeddings(model: Path, hf: Any, texts: list[str], max_length: int) -> np.ndarray:
    """Position-weighted mean of torch's final hidden states, one text at a time, float64."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for text in texts:
        ids = tok.encode(text, truncation=True, max_length=max_length)
        with torch.no_grad():
            h = hf.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [n, H]
        w = np.arange(1, len(ids) + 1, dtype=np.float64)  # [n] weights 1..n
        pooled = (w[:, None] * h.double().numpy()).sum(0) / w.sum()
        out.append(pooled / np.linalg.norm(pooled))
    return np.stack(out)


def _chatml(r: dict) -> str:
    query = f"{r['instruction']}\n{r['input']}" if r.get("input") else r["instruction"]
    return f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n{r['output']}<|im_end|>"


def test_representation_scores_picks_and_cache(tmp_path: Path, tiny_llama: tuple) -> None:
    model, hf = tiny_llama
    data, scores, targets = _rep_inputs(tmp_path, model)
    out = tmp_path / "sel.jsonl"
    base = SelectConfig(
        scores=str(scores), data=str(data), output=str(out), policy="representation",
        target=str(targets), count=7, token_budget=4 * MAX_LENGTH, num_devices=1,
    )  # fmt: skip
    summary = run(base)
    pool = [json.loads(x) for x in data.read_text().splitlines()]
    target_rows = [json.loads(x) for x in targets.read_text().splitlines() if x != '{"cut']
    cand = np.array([i for i in range(14) if i not in (2, 11)])
    emb = _reference_embeddings(model, hf, [_chatml(pool[i]) for i in cand], MAX_LENGTH)
    temb = _reference_embeddings(model, hf, [_chatml(r) for r in target_rows], MAX_LENGTH)
    sim = temb @ emb.T  # [T, N] cosines
    rows = jsonl(out)
    picks, who = _reference_round_robin(sim, np.ones(len(cand), bool), 7)
    assert [r["extra"] for r in rows] == [int(cand[j]) for j in picks]
    assert rows[2]["extra"] == 6 and rows[2]["rds_score"] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([r["rds_score"] for r in rows], sim.max(0)[picks], atol=2e-5)
    target_index = [0, 2, 3]  # row numbers in the target file (row 1 is bad JSON)
    assert [r["rds_target"] for r in rows] == [target_index[t] for t in who]
    assert rows[0]["ifd"] is not None and "rds_score" in rows[-1]
    assert summary["targets"] == 3 and summary["targets_skipped"] == 1
    assert summary["candidates"] == 12 and summary["selected"] == 7
    assert summary["round_robin"] and summary["pooling"] == "weighted_mean"
    assert summary["template"] == "chatml" and summary["max_length"] == MAX_LENGTH
    assert not any(e["reused"] for e in summary["embeddings"].values())
    files = {k: Path(e["file"]) for k, e in summary["embeddings"].items()}
    assert all(f.parent == scores.parent / "embeddings" for f in files.values())
    cached = np.load(files["candidates"])
    assert cached.shape == (12, 64) and cached.dtype == np.float32
    np.testing.assert_allclose(cached, emb, atol=2e-5)
    # The duplicate rows 4 and 9 tie for every target: whenever 9 is taken, 4 is already.
    got_index = [r["extra"] for r in rows]
    assert 9 not in got_index or got_index.index(4) < got_index.index(9)

    # Plain top-k by the max cosine, input order, reusing both arrays (no model is loaded);
    # --scores_out: every row's max cosine (NaN for the rows that are not candidates).
    every = tmp_path / "rds_scores.parquet"
    summary = run(
        dataclasses.replace(base, round_robin=False, order="original", scores_out=str(every))
    )
    written = pq.read_table(every).to_pydict()
    assert written["index"] == list(range(14)) and summary["scores_out"] == str(every)
    got = np.asarray(written["rds_score"])
    assert np.isnan(got[[2, 11]]).all() and written["status"][2] != "ok"
    np.testing.assert_allclose(got[cand], sim.max(0), atol=2e-5)
    assert all(e["reused"] for e in summary["embeddings"].values())
    assert summary["seconds"]["load_model"] == 0.0
    best = sim.max(0)
    top = np.lexsort((np.arange(len(cand)), -best))[:7]
    assert [r["extra"] for r in jsonl(out)] == sorted(int(cand[j]) for j in top)
    # Other settings (max_length) make other arrays; a changed target file re-embeds only it.
    summary = run(dataclasses.replace(base, max_length=16))
    assert not any(e["reused"] for e in summary["embeddings"].values())
    assert len(list((scores.parent / "embeddings").glob("*.npy"))) == 4
    targets.write_text(targets.read_text().replace('{"cut\n', ""))
    summary = run(base)
    assert summary["embeddings"]["candidates"]["reused"]
    assert not summary["embeddings"]["targets"]["reused"] and summary["targets_skipped"] == 0
    # The reference format (no score columns) and clear errors.
    run(dataclasses.replace(base, format="reference"))
    assert set(jsonl(out)[0]) == {"instruction", "input", "output", "idx"}
    for change, match in (
        ({"target": ""}, "needs --target"),
        ({"data": ""}, "needs --data"),
        ({"target_rows": "0:3"}, "--target_rows does not apply"),
        ({"column": "ifd"}, "--column applies"),
        ({"count": -1}, "--count must be"),
        ({"policy": "superfiltering", "target": "", "scores_out": "x.parquet"}, "--scores_out"),
    ):
        with pytest.raises(ValueError, match=match):
            run(dataclasses.replace(base, **change))


# --- gradient (LESS) against the gradient_cosine analysis ---------------------------------------


def _projection_run(out: Path, x: np.ndarray, shard: int) -> Path:
    """A resonance run directory: projection shards, score shards, index and scores.parquet."""
    from resofilter_jax.scoring import outputs, projection
    from resofilter_jax.scoring.projection import ProjectionSpec

    ranges = outputs.shard_ranges(len(x), shard)
    schema = pa.schema([("index", pa.int64()), ("turn", pa.int64()), ("status", pa.string())])
    status = ["ok" if np.isfinite(r).all() else "duplicate_of:0" for r in x]
    for k, (lo, hi) in enumerate(ranges):
        projection.write_shard(out, k, x[lo:hi])
        cols = {"index": list(range(lo, hi)), "turn": [0] * (hi - lo), "status": status[lo:hi]}
        outputs.write_shard(out, k, cols, schema)
    params = {"model.layers.0.mlp.up_proj.weight": (4, 4)}
    meta = projection.index_meta(ProjectionSpec(dim=x.shape[1]), params, {"path": "/m"})
    projection.write_index(out, meta, ranges)
    score = np.linspace(1.0, 2.0, len(x))
    pq.write_table(
        pa.table({"index": np.arange(len(x)), "status": status, "score": score}),
        out / "scores.parquet",
    )
    return out / "scores.parquet"


def test_gradient_policy_is_the_analysis_and_round_robin_the_definition(tmp_path: Path) -> None:
    from resofilter_jax.analysis.pipeline import AnalyzeConfig
    from resofilter_jax.analysis.pipeline import run as analyze

    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    x[5] = np.nan  # no gradient: a duplicate row
    x[17] = x[3] * 2.0  # points along a target row
    x[30] = x[31]  # a tie
    scores = _projection_run(tmp_path / "run", x, shard=16)
    out = tmp_path / "g.jsonl"
    base = SelectConfig(scores=str(scores), output=str(out), policy="gradient",
                        target_rows="0:4,9", count=9)  # fmt: skip
    summary = run(base)
    analyze(AnalyzeConfig(a=str(tmp_path / "run"), out=str(tmp_path / "rep"),
                          mode="gradient_cosine", target="rows:0:4,9"))  # fmt: skip
    cos = pq.read_table(tmp_path / "rep" / "cosine.parquet").column("cosine").to_numpy()
    ok = np.nonzero(np.isfinite(cos))[0]
    top = ok[np.lexsort((ok, -cos[ok]))][:9]
    rows = jsonl(out)
    assert [r["index"] for r in rows] == top.tolist()
    assert [r["grad_cosine"] for r in rows] == cos[top].tolist()  # the analysis' own values
    assert summary["candidates"] == 39 and summary["score"] == "grad_cosine"
    assert summary["target"]["used"] == 5 and not summary["round_robin"]
    every = tmp_path / "grad_scores.parquet"
    run(dataclasses.replace(base, scores_out=str(every)))
    np.testing.assert_array_equal(pq.read_table(every).column("grad_cosine").to_numpy(), cos)

    # Round-robin over the target rows (max cosine), against the definition in float64.
    summary = run(dataclasses.replace(base, round_robin=True))
    p = x.astype(np.float16).astype(np.float64)
    t_rows = [0, 1, 2, 3, 9]
    sim = _unit(p[t_rows]) @ np.nan_to_num(_unit(p)).T  # [5, 40]
    usable = np.isfinite(p).all(1)
    picks, who = _reference_round_robin(sim, usable, 9)
    rows = jsonl(out)
    assert [r["index"] for r in rows] == picks
    assert [r["grad_target"] for r in rows] == [t_rows[t] for t in who]
    np.testing.assert_allclose([r["grad_max_cosine"] for r in rows], sim.max(0)[picks],
                               rtol=0, atol=1e-12)  # fmt: skip
    assert summary["score"] == "grad_max_cosine" and summary["selected"] == 9
    # A score file in another row order (a subset, reversed) is matched by key; ties go to
    # the earlier row of that file (3 and 17 tie: 17 comes first there).
    perm = np.arange(39, -1, -1)[::2]  # [20] rows 39, 37, ..., 1
    shuffled = tmp_path / "run" / "shuffled.parquet"
    pq.write_table(pq.read_table(scores).take(pa.array(perm)), shuffled)
    run(dataclasses.replace(base, scores=str(shuffled), count=4))
    c = cos[perm]
    want = perm[np.lexsort((np.arange(len(perm)), -c))][:4]
    assert [r["index"] for r in jsonl(out)] == want.tolist() == [1, 17, 3, 35]
    for change, match in (
        ({"target_rows": ""}, "needs --target_rows"),
        ({"target_rows": "0:2,77", "round_robin": True}, r"target rows \[77\] are not in"),
        ({"target_rows": "5", "round_robin": True}, "no finite, non-zero projected gradient"),
        ({"target": "t.jsonl"}, "--target does not apply"),
    ):
        with pytest.raises(ValueError, match=match):
            run(dataclasses.replace(base, **change))

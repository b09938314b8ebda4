"""select, ResoFilter policy: drop rates, ties, order, reference rows, the scorer's output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.selection import FEATURE, RESO_SCORE, RESO_STATUS, jsonl, reso_inputs

from resofilter_jax.selection.pipeline import SelectConfig, run
from resofilter_jax.selection.policies import (
    resofilter_select,
)
from resofilter_jax.selection.rows import (
    read_scores,
)

ROOT = Path(__file__).resolve().parents[1]


def test_resofilter_policy_ties_drop_count_and_order() -> None:
    score = [np.nan if s != "ok" else v for s, v in zip(RESO_STATUS, RESO_SCORE, strict=True)]
    # int(7 * 0.25) = 1 dropped: of the tied 1, 2, 9 the lowest index goes first.
    assert resofilter_select(score, 0.25).tolist() == [0, 2, 4, 5, 7, 9]
    assert resofilter_select(score, 0.5).tolist() == [0, 4, 5, 7]  # int(3.5) = 3
    assert resofilter_select(score, 0.75).tolist() == [4, 7]  # int(5.25) = 5
    assert resofilter_select(score, 0.0).tolist() == [0, 1, 2, 4, 5, 7, 9]
    assert resofilter_select(score, 0.5, order="score").tolist() == [5, 0, 7, 4]
    # keep=high: ascending ranking 4 7 0 5 1 2 9, ties still lower index first.
    assert resofilter_select(score, 0.25, keep="high").tolist() == [0, 1, 2, 5, 7, 9]
    assert resofilter_select(score, 0.5, keep="high").tolist() == [1, 2, 5, 9]
    assert resofilter_select(score, 0.75, keep="high").tolist() == [2, 9]
    assert resofilter_select(score, 0.75, keep="high", order="score").tolist() == [2, 9]


def test_resofilter_rank_sets_ties_and_output_order() -> None:
    # Positions 0..3 hold input rows 3, 1, 2, 0: ties go to the lower input row, and the
    # kept rows come back in input order, not file order.
    score = [7.0, 7.0, 1.0, 7.0]
    rank = [3, 1, 2, 0]
    assert resofilter_select(score, 0.25, rank=rank).tolist() == [1, 2, 0]  # drops row 0 (pos 3)
    assert resofilter_select(score, 0.5, rank=rank).tolist() == [2, 0]  # drops rows 0, 1


def test_resofilter_drops_exactly_int_n_times_p() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 7, 100, 1001):
        score = rng.normal(1e-5, 1e-7, size=n)
        for p in (0.1, 0.25, 0.29, 0.5, 0.7, 0.75, 0.9):
            kept = resofilter_select(score, p)
            assert len(kept) == n - int(n * p), (n, p)
            dropped = np.setdiff1d(np.arange(n), kept)
            assert score[dropped].min(initial=np.inf) >= score[kept].max()
            assert np.all(np.diff(kept) > 0)  # original order
    assert len(resofilter_select(np.ones(100), 0.29)) == 72  # int(28.999999999999996) = 28


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize(
    ("keep", "want"),
    [
        ("low", {"p75": [0, 2, 4, 5, 7, 9], "p50": [0, 4, 5, 7], "p25": [4, 7]}),
        ("high", {"p75": [0, 1, 2, 5, 7, 9], "p50": [1, 2, 5, 9], "p25": [2, 9]}),
    ],
)
def test_three_rates_one_call(tmp_path: Path, fmt: str, keep: str, want: dict) -> None:
    data, scores = reso_inputs(tmp_path, fmt)
    summary = run(
        SelectConfig(
            scores=str(scores),
            data=str(data),
            drop_rates=(0.25, 0.5, 0.75),
            keep=keep,
            output=str(tmp_path / "sel.jsonl"),
        )
    )
    assert summary["policy"] == "resofilter" and summary["keep"] == keep
    assert summary["rows"] == 10 and summary["scored"] == 7
    assert summary["statuses"] == {
        "duplicate_of": 1,
        "error:bad_json": 1,
        "no_response_tokens": 1,
        "ok": 7,
    }
    assert [
        (o["drop_rate"], o["kept"], o["dropped"], o["selected"]) for o in summary["outputs"]
    ] == [
        (0.25, "p75", 1, 6),
        (0.5, "p50", 3, 4),
        (0.75, "p25", 5, 2),
    ]
    assert not (tmp_path / "sel.jsonl").exists()
    got = {}
    for o in summary["outputs"]:
        assert o["output"] == str(tmp_path / f"sel.{o['kept']}.jsonl")
        rows = jsonl(Path(o["output"]))
        got[o["kept"]] = [r["extra"] for r in rows]
        for r in rows:  # the input's own row, the scalar scores, no features
            i = r["extra"]
            assert r["instruction"] == f"task {i}" and r["output"] == f"ans {i}"
            assert r["score"] == RESO_SCORE[i] and r["loss"] == 0.5 + i
            assert r["ppl"] == 1.5 + i and r["n_tokens"] == 10 + i
            assert FEATURE not in r and "status" not in r
    assert got == want
    assert set(got["p25"]) < set(got["p50"]) < set(got["p75"])


def test_single_rate_writes_output_itself_with_features(tmp_path: Path) -> None:
    data, scores = reso_inputs(tmp_path)
    out = tmp_path / "sel.json"
    summary = run(
        SelectConfig(
            scores=str(scores), data=str(data), drop_rate=0.5, with_features=True, output=str(out)
        )
    )
    assert [o["output"] for o in summary["outputs"]] == [str(out)]
    rows = json.loads(out.read_text())  # .json: one array
    assert [r["extra"] for r in rows] == [0, 4, 5, 7]
    assert [r[FEATURE] for r in rows] == [6.0, 2.0, 8.0, 4.0]
    ranked = run(SelectConfig(scores=str(scores), drop_rate=0.5, order="score", output=str(out)))
    assert ranked["outputs"][0]["selected"] == 4
    assert json.loads(out.read_text()) == [  # no --data: index + scores, ranking order
        {"index": i, "score": RESO_SCORE[i], "loss": 0.5 + i, "ppl": 1.5 + i, "n_tokens": 10 + i}
        for i in (5, 0, 7, 4)
    ]


def test_reference_format_rows(tmp_path: Path) -> None:
    data, scores = reso_inputs(tmp_path)
    run(
        SelectConfig(
            scores=str(scores),
            data=str(data),
            drop_rates=(0.25,),
            format="reference",
            output=str(tmp_path / "train.jsonl"),
        )
    )
    rows = jsonl(tmp_path / "train.p75.jsonl")
    assert rows[:2] == [
        {"instruction": "", "input": "task 0", "output": "ans 0", "idx": 0},
        {"instruction": "", "input": "task 2", "output": "ans 2", "idx": 2},
    ]
    assert [list(r) for r in rows] == [["instruction", "input", "output", "idx"]] * 6
    assert rows[-1] == {"instruction": "", "input": "task 9\nctx 9", "output": "ans 9", "idx": 9}
    assert [r["idx"] for r in rows] == [0, 2, 4, 5, 7, 9]


def test_reference_format_gsm8k_and_sharegpt_turns(tmp_path: Path) -> None:
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4))
    )
    scores = tmp_path / "gsm_scores.jsonl"
    scores.write_text(
        "".join(
            json.dumps({"index": i, "status": "ok", "score": s}) + "\n"
            for i, s in enumerate([4, 3, 2, 1])
        )
    )
    run(
        SelectConfig(
            scores=str(scores),
            data=str(gsm),
            drop_rate=0.5,
            format="reference",
            output=str(tmp_path / "g.jsonl"),
        )
    )
    assert jsonl(tmp_path / "g.jsonl") == [
        {"instruction": "", "input": "q2", "output": "a2", "idx": 2},
        {"instruction": "", "input": "q3", "output": "a3", "idx": 3},
    ]

    conv = [
        {"from": "human", "value": "h0"},
        {"from": "gpt", "value": "g0"},
        {"from": "human", "value": "h1"},
        {"from": "gpt", "value": "g1"},
    ]
    share = tmp_path / "share.json"
    share.write_text(
        json.dumps([{"id": "a", "conversations": conv}, {"id": "b", "conversations": conv[:2]}])
    )
    sdir = tmp_path / "share_out"
    sdir.mkdir()
    pq.write_table(
        pa.table(
            {"index": [0, 0, 1], "turn": [0, 1, 0], "status": ["ok"] * 3, "score": [1.0, 1.0, 9.0]}
        ),
        sdir / "scores.parquet",
    )
    cfg = SelectConfig(
        scores=str(sdir / "scores.parquet"),
        data=str(share),
        drop_rate=0.34,
        format="reference",
        output=str(tmp_path / "s.jsonl"),
    )
    with pytest.raises(ValueError, match="is it the file that was scored"):
        run(cfg)  # no run_config.json: ShareGPT "first" mode has no turn 1
    run(dataclasses.replace(cfg, sharegpt_turns="all"))
    assert jsonl(tmp_path / "s.jsonl") == [
        {"instruction": "", "input": "h0", "output": "g0", "idx": 0},
        {"instruction": "", "input": "h1", "output": "g1", "idx": 0},
    ]
    (sdir / "run_config.json").write_text(
        json.dumps({"data": {"format": "sharegpt", "fields": {}, "sharegpt_turns": "all"}})
    )
    run(dataclasses.replace(cfg, format="rows"))
    rows = jsonl(tmp_path / "s.jsonl")
    assert [(r["id"], r["turn"], r["score"]) for r in rows] == [("a", 0, 1.0), ("a", 1, 1.0)]
    run(cfg)  # the scorer's ShareGPT mode, read from its run_config.json
    assert [r["input"] for r in jsonl(tmp_path / "s.jsonl")] == ["h0", "h1"]


def test_real_resonance_scores_from_the_scorer(tmp_path: Path) -> None:
    """The scorer's own output on a tiny Llama (test_reso_runner's setting) selects cleanly."""
    from support.data import build_tokenizer, write_jsonl
    from support.models import save_tiny_model
    from support.scoring import data_rows, make_config

    from resofilter_jax.data.sources import read_records
    from resofilter_jax.scoring import pipeline as score

    model_dir = tmp_path / "llama"
    save_tiny_model("llama", build_tokenizer("bos"), model_dir)
    data_path = write_jsonl(tmp_path / "rows.jsonl", data_rows())
    out = tmp_path / "scored"
    # rows 7 bad, 21 duplicate of 2
    config = make_config(model_dir, data_path, out, **{"data.limit": 22})
    score.run(config)
    cols = read_scores(out / "scores.parquet")
    status = list(cols["status"])
    ok = [i for i, s in enumerate(status) if s == "ok"]
    assert status[7] == "error:bad_json" and status[21] == "duplicate_of:2"
    summary = run(
        SelectConfig(
            scores=str(out / "scores.parquet"),
            data=str(data_path),
            drop_rates=(0.25, 0.5, 0.75),
            format="reference",
            output=str(tmp_path / "sel.jsonl"),
        )
    )
    dups = sum(s.startswith("duplicate_of:") for s in status)
    assert summary["scored"] == len(ok) and summary["statuses"]["duplicate_of"] == dups
    order = sorted(ok, key=lambda i: (-cols["score"][i], i))  # the reference's ranking
    records, _ = read_records(config, str(data_path))
    for o, p in zip(summary["outputs"], (0.25, 0.5, 0.75), strict=True):
        want = sorted(order[int(len(ok) * p) :])
        rows = jsonl(Path(o["output"]))
        assert [r["idx"] for r in rows] == want
        for r in rows:
            rec = records[r["idx"]]
            query = f"{rec.instruction}\n{rec.input}" if rec.input else rec.instruction
            assert r == {"instruction": "", "input": query, "output": rec.output, "idx": rec.index}

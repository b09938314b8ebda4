"""Selection: the Superfiltering and ResoFilter policies, output files and formats, the main."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resofilter_jax.selection.pipeline import SelectConfig, run
from resofilter_jax.selection.policies import (
    detect_policy,
    resofilter_select,
    superfiltering_select,
)
from resofilter_jax.selection.rows import (
    embedding_model,
    kept_label,
    rate_output_path,
    read_scores,
)

ROOT = Path(__file__).resolve().parents[1]


def test_policy_threshold_order_ties_and_k() -> None:
    ifd = [0.5, None, 0.9, 1.0, 0.9, float("nan"), 0.2, 1.5, 0.95, 0.7]
    # 10 rows -> k = floor(0.3 * 10) = 3 of the eligible (< 1.0) ones, by IFD descending,
    # the tie at 0.9 broken by the lower position.
    assert superfiltering_select(ifd, rate=0.3).tolist() == [8, 2, 4]
    assert superfiltering_select(ifd, rate=0.3, threshold=1.01).tolist() == [3, 8, 2]
    assert superfiltering_select(ifd, rate=0.0, count=5).tolist() == [8, 2, 4, 9, 0]
    assert superfiltering_select(ifd, rate=1.0).tolist() == [8, 2, 4, 9, 0, 6]  # all eligible


def test_k_is_relative_to_this_dataset_not_52002() -> None:
    rng = np.random.default_rng(0)
    ifd = rng.uniform(0.1, 0.99, size=1234)
    assert len(superfiltering_select(ifd, rate=0.05)) == math.floor(0.05 * 1234)


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    data = [
        {"instruction": f"task {i}", "input": "", "output": f"answer {i}", "extra": i}
        for i in range(6)
    ]
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(data))
    ifd = [0.8, 0.3, None, 0.9, 1.2, 0.85]
    table = pa.table(
        {
            "index": list(range(6)),
            "status": ["ok", "ok", "empty_output", "ok", "ok", "ok"],
            "ifd": [np.nan if v is None else v for v in ifd],
            "ppl_condition": [1.0] * 6,
        }
    )
    scores = tmp_path / "scores.parquet"
    pq.write_table(table, scores)
    return data_path, scores


def test_run_writes_input_rows_with_scores(tmp_path: Path) -> None:
    data, scores = _write_inputs(tmp_path)
    summary = run(
        SelectConfig(
            scores=str(scores), data=str(data), rate=0.5, output=str(tmp_path / "sel.json")
        )
    )
    assert summary == {
        "rows": 6,
        "eligible": 4,
        "selected": 3,
        "output": str(tmp_path / "sel.json"),
    }
    rows = json.loads((tmp_path / "sel.json").read_text())
    assert [r["extra"] for r in rows] == [3, 5, 0]  # IFD 0.9, 0.85, 0.8
    assert rows[0]["instruction"] == "task 3" and rows[0]["ifd"] == pytest.approx(0.9)

    run(
        SelectConfig(
            scores=str(scores),
            data=str(data),
            rate=0.5,
            order="original",
            output=str(tmp_path / "sel.jsonl"),
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert [r["extra"] for r in lines] == [0, 3, 5]


def test_wrong_data_file_is_refused(tmp_path: Path) -> None:
    _, scores = _write_inputs(tmp_path)
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    with pytest.raises(ValueError, match="not in"):
        run(
            SelectConfig(
                scores=str(scores), data=str(short), rate=0.5, output=str(tmp_path / "o.jsonl")
            )
        )


# --- ResoFilter policy -------------------------------------------------------------------------

# Scored (ok) rows 0 1 2 4 5 7 9 (N = 7); ranking by score descending, ties lower index first:
# 1 2 9 (5.0) 5 (4.0) 0 (3.0) 7 (2.0) 4 (1.0). Row 3 is a duplicate of row 1 and row 8 has no
# response tokens: neither is a candidate, even with a number in its score column.
RESO_STATUS = [
    "ok",
    "ok",
    "ok",
    "duplicate_of:1",
    "ok",
    "ok",
    "error:bad_json",
    "ok",
    "no_response_tokens",
    "ok",
]
RESO_SCORE = [3.0, 5.0, 5.0, 0.1, 1.0, 4.0, None, 2.0, 0.2, 5.0]
FEATURE = "reso/model.layers.0.mlp.up_proj.weight/mean_abs"


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


def _reso_inputs(tmp_path: Path, fmt: str = "parquet") -> tuple[Path, Path]:
    """An Alpaca JSONL file (row 3 repeats row 1's query, row 6 is bad JSON) and its scores."""
    lines = []
    for i in range(10):
        row = {
            "instruction": f"task {i}",
            "input": f"ctx {i}" if i % 2 else "",
            "output": f"ans {i}",
        }
        lines.append(json.dumps(dict(row, extra=i)))
    lines[3] = json.dumps(
        {"instruction": "task 1", "input": "ctx 1", "output": "other", "extra": 3}
    )
    lines[6] = '{"instruction": "cut'
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    scores = tmp_path / f"scores.{fmt}"
    score = [np.nan if v is None else v for v in RESO_SCORE]
    cols = {
        "index": list(range(10)),
        "status": RESO_STATUS,
        "score": score,
        "loss": [0.5 + i for i in range(10)],
        "ppl": [1.5 + i for i in range(10)],
        "n_tokens": [10 + i for i in range(10)],
        FEATURE: [x * 2 for x in score],
    }
    if fmt == "parquet":
        pq.write_table(pa.table(cols), scores)
    else:
        rows = [{k: v[i] for k, v in cols.items()} for i in range(10)]
        rows = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in rows
        ]
        scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "method": "resonance",
        "data": {"format": "alpaca", "fields": {}, "sharegpt_turns": "first"},
    }
    (tmp_path / "run_config.json").write_text(json.dumps(cfg))  # the scorer's fingerprint
    return data, scores


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize(
    ("keep", "want"),
    [
        ("low", {"p75": [0, 2, 4, 5, 7, 9], "p50": [0, 4, 5, 7], "p25": [4, 7]}),
        ("high", {"p75": [0, 1, 2, 5, 7, 9], "p50": [1, 2, 5, 9], "p25": [2, 9]}),
    ],
)
def test_three_rates_one_call(tmp_path: Path, fmt: str, keep: str, want: dict) -> None:
    data, scores = _reso_inputs(tmp_path, fmt)
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
        rows = _jsonl(Path(o["output"]))
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
    data, scores = _reso_inputs(tmp_path)
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
    data, scores = _reso_inputs(tmp_path)
    run(
        SelectConfig(
            scores=str(scores),
            data=str(data),
            drop_rates=(0.25,),
            format="reference",
            output=str(tmp_path / "train.jsonl"),
        )
    )
    rows = _jsonl(tmp_path / "train.p75.jsonl")
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
    assert _jsonl(tmp_path / "g.jsonl") == [
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
    assert _jsonl(tmp_path / "s.jsonl") == [
        {"instruction": "", "input": "h0", "output": "g0", "idx": 0},
        {"instruction": "", "input": "h1", "output": "g1", "idx": 0},
    ]
    (sdir / "run_config.json").write_text(
        json.dumps({"data": {"format": "sharegpt", "fields": {}, "sharegpt_turns": "all"}})
    )
    run(dataclasses.replace(cfg, format="rows"))
    rows = _jsonl(tmp_path / "s.jsonl")
    assert [(r["id"], r["turn"], r["score"]) for r in rows] == [("a", 0, 1.0), ("a", 1, 1.0)]
    run(cfg)  # the scorer's ShareGPT mode, read from its run_config.json
    assert [r["input"] for r in _jsonl(tmp_path / "s.jsonl")] == ["h0", "h1"]


def test_policy_detection_and_errors(tmp_path: Path) -> None:
    data, scores = _reso_inputs(tmp_path)
    out = str(tmp_path / "o.jsonl")
    base = SelectConfig(scores=str(scores), data=str(data), output=out)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"drop rates must be in \[0, 1\)"):
            run(dataclasses.replace(base, drop_rate=bad))
        with pytest.raises(ValueError, match=r"drop rates must be in \[0, 1\)"):
            run(dataclasses.replace(base, drop_rates=(0.5, bad)))
    with pytest.raises(ValueError, match="must differ"):
        run(dataclasses.replace(base, drop_rates=(0.5, 0.5)))
    with pytest.raises(ValueError, match="keep must be"):
        run(dataclasses.replace(base, keep="middle"))
    with pytest.raises(ValueError, match="no `ifd` column"):
        run(dataclasses.replace(base, policy="superfiltering"))
    with pytest.raises(ValueError, match="needs --data"):
        run(dataclasses.replace(base, data="", format="reference"))
    with pytest.raises(ValueError, match="--format rows only"):
        run(dataclasses.replace(base, format="reference", with_features=True))
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError, match="is it the file that was scored"):
        run(dataclasses.replace(base, data=str(short), format="reference"))
    assert not Path(out).exists()

    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"index": 0, "status": "ok", "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="neither an `ifd`"):
        run(SelectConfig(scores=str(neither), output=out))
    with pytest.raises(ValueError, match="no `score` column"):
        run(SelectConfig(scores=str(neither), output=out, policy="resofilter"))
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"index": 0, "status": "ok", "ifd": 0.5, "score": 1.0}) + "\n")
    with pytest.raises(ValueError, match="both `ifd` and `score`"):
        run(SelectConfig(scores=str(both), output=out))
    summary = run(SelectConfig(scores=str(both), output=out, policy="resofilter", drop_rate=0.0))
    assert summary["outputs"][0]["selected"] == 1
    assert detect_policy(["index", "ifd"]) == "superfiltering"
    assert detect_policy(["index", "score", FEATURE]) == "resofilter"
    _, ifd_scores = _write_inputs(tmp_path)
    assert "eligible" in run(SelectConfig(scores=str(ifd_scores), output=out, rate=0.5))


def test_kept_labels_and_paths() -> None:
    assert [kept_label(p) for p in (0.25, 0.5, 0.75, 0.9, 0.0, 0.125)] == [
        "p75",
        "p50",
        "p25",
        "p10",
        "p100",
        "p87_5",
    ]
    assert rate_output_path("out/sel.jsonl", 0.25) == Path("out/sel.p75.jsonl")
    assert rate_output_path("sel.json", 0.9) == Path("sel.p10.json")


def test_absl_main_subprocess(tmp_path: Path) -> None:
    data, scores = _reso_inputs(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "resofilter_jax.select",
        f"--scores={scores}",
        f"--data={data}",
        "--drop_rates=0.25,0.5,0.75",
        "--format=reference",
        f"--output={tmp_path / 'sel.jsonl'}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [(o["kept"], o["selected"]) for o in summary["outputs"]] == [
        ("p75", 6),
        ("p50", 4),
        ("p25", 2),
    ]
    assert [r["idx"] for r in _jsonl(tmp_path / "sel.p25.jsonl")] == [4, 7]
    bad = subprocess.run(
        [*cmd[:-2], "--drop_rates=0.5,1.2", f"--output={tmp_path / 'x.jsonl'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode != 0 and "drop rates must be in [0, 1)" in bad.stderr


def test_real_resonance_scores_from_the_scorer(tmp_path: Path) -> None:
    """The scorer's own output on a tiny Llama (test_reso_runner's setting) selects cleanly."""
    from support.data import build_tokenizer, write_jsonl
    from support.models import save_tiny_model
    from support.scoring import data_rows, make_config

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
    records, _ = score.read_records(config, str(data_path))
    for o, p in zip(summary["outputs"], (0.25, 0.5, 0.75), strict=True):
        want = sorted(order[int(len(ok) * p) :])
        rows = _jsonl(Path(o["output"]))
        assert [r["idx"] for r in rows] == want
        for r in rows:
            rec = records[r["idx"]]
            query = f"{rec.instruction}\n{rec.input}" if rec.input else rec.instruction
            assert r == {"instruction": "", "input": query, "output": rec.output, "idx": rec.index}


# --- Superfiltering.D -------------------------------------------------------------------------


def test_diversity_flags_are_validated_before_any_model(tmp_path: Path) -> None:
    data, scores = _write_inputs(tmp_path)  # 6 rows, 4 with IFD < 1
    out = tmp_path / "o.json"
    base = SelectConfig(scores=str(scores), data=str(data), output=str(out), fla_num=2)
    bad = [
        ({"ifd_num": 1}, r"--fla_num=2 is more than --ifd_num=1"),
        ({"fla_num": 0, "ifd_num": 3}, "set --fla_num too"),
        ({"ifd_num": 3, "count": 3}, "both size the IFD stage"),
        ({"fla_num": -1}, ">= 0"),
        ({"ifd_num": -2}, ">= 0"),
        ({"fla_metric": "dot"}, "fla_metric must be one of"),
        ({"fla_ties": "random"}, "fla_ties must be one of"),
        ({"embed_type": "query"}, "embed_type must be one of"),
        ({"token_budget": 0}, "token_budget"),
        ({"data": ""}, "needs --data"),
        ({"fla_num": 4, "rate": 0.5}, "4 is more than the 3 rows of the IFD stage"),
        ({"fla_num": 5, "ifd_num": 6}, "5 is more than the 4 rows of the IFD stage"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            run(dataclasses.replace(base, **change))
    (tmp_path / "reso").mkdir()
    _, reso_scores = _reso_inputs(tmp_path / "reso")
    for change in ({"fla_num": 2}, {"fla_num": 0, "ifd_num": 4}):
        with pytest.raises(ValueError, match="superfiltering policy only"):
            run(dataclasses.replace(base, scores=str(reso_scores), **change))
    assert not out.exists()
    # The flags reach the config (main maps every flag onto the field of the same name).
    cmd = [sys.executable, "-m", "resofilter_jax.select", f"--scores={scores}", f"--data={data}"]
    done = subprocess.run(
        [*cmd, "--fla_num=3", "--ifd_num=2", f"--output={out}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode != 0 and "--fla_num=3 is more than --ifd_num=2" in done.stderr
    assert not out.exists()
    # the policies keep jax out of their imports with copies of these choices: they must agree.
    from resofilter_jax.selection import embeddings, policies
    from resofilter_jax.selection import facility_location as diversity

    assert policies.FLA_METRICS == diversity.METRICS and policies.FLA_TIES == diversity.TIES
    assert policies.EMBED_TYPES == embeddings.EMB_TYPES


def test_embedding_model_resolution(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    cfg = {"model": {"path": str(gguf), "dtype": "bfloat16"}, "max_length": 512}
    (tmp_path / "run_config.json").write_text(json.dumps(cfg))
    assert embedding_model(scores) == {
        "model_path": str(gguf),
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "matmul_precision": "default",
        "max_length": 512,
    }
    got = embedding_model(scores, model="other/model", dtype="float32", max_length=64)
    assert got == {
        "model_path": "other/model",
        "dtype": "float32",
        "param_dtype": "float32",
        "matmul_precision": "highest",  # none recorded: fp32 compute means fp32
        "max_length": 64,
    }
    gguf.unlink()
    with pytest.raises(ValueError, match="does not exist any more: pass --model"):
        embedding_model(scores)


def _sharegpt_subset(source: Path, dest: Path, n: int) -> list:
    """The first ``n`` ShareGPT rows that make ok records, written to ``dest``; their records."""
    from resofilter_jax.data import iter_raw_rows, to_records

    raw, records = [], []
    rows = iter_raw_rows(source, on_error="status", allow_truncated=True)
    for number, row in itertools.islice(rows, 200):
        recs = list(to_records([(number, row)], "sharegpt", on_error="status"))
        if isinstance(row, dict) and recs and recs[0].ok and recs[0].output:
            raw.append(row)
            records.append(recs[0])
        if len(raw) == n:
            break
    dest.write_text(json.dumps(raw))
    return records


def test_superfiltering_d_end_to_end_on_smollm2(
    tmp_path: Path, smollm2_gguf: Path, sharegpt_path: Path
) -> None:
    """select --fla_num picks what superfiltering_d picks on embed_texts of the same texts."""
    import jax

    from resofilter_jax.parallel import make_mesh
    from resofilter_jax.selection import facility_location as dv
    from resofilter_jax.selection.diversity import superfiltering_d
    from resofilter_jax.selection.embeddings import cached_model, embed_texts

    n = 24
    data = tmp_path / "share.json"
    records = _sharegpt_subset(sharegpt_path, data, n)
    assert len(records) == n
    ids = [r.id for r in records]
    assert len(set(ids)) == n  # rows come back as the input's own rows: found by id
    rng = np.random.default_rng(3)
    ifd = rng.uniform(0.3, 1.2, size=n)
    ifd[[2, 9]] = np.nan
    ifd[5] = ifd[17] = 0.77  # a tie inside the IFD stage: 5 first
    out_dir = tmp_path / "ifd"
    out_dir.mkdir()
    pq.write_table(
        pa.table({"index": list(range(n)), "status": ["ok"] * n, "ifd": ifd}),
        out_dir / "scores.parquet",
    )
    (out_dir / "run_config.json").write_text(
        json.dumps(
            {
                "method": "ifd",
                "model": {"path": str(smollm2_gguf), "dtype": "float32"},
                "data": {"format": "sharegpt", "fields": {}, "sharegpt_turns": "first"},
                "max_length": 64,
            }
        )
    )
    # 1 bucket (64) and batches of 8 rows over 2 devices: one compiled shape throughout.
    budget = 8 * 64
    base = SelectConfig(
        scores=str(out_dir / "scores.parquet"),
        data=str(data),
        output=str(tmp_path / "d.jsonl"),
        fla_num=4,
        ifd_num=8,
        token_budget=budget,
        num_devices=2,
    )
    summary = run(base)  # the model and max_length come from run_config.json
    lm = cached_model(str(smollm2_gguf))  # the model select loaded (saves a second load)

    mesh = make_mesh(jax.devices()[:2])
    seen: dict[tuple[int, ...], np.ndarray] = {}

    def embed(positions: np.ndarray) -> np.ndarray:
        # The reference's text: instruction, input line (empty for ShareGPT), output.
        texts = [
            f"{records[i].instruction}\n{records[i].input}\n{records[i].output}" for i in positions
        ]
        emb = embed_texts(
            lm.model, lm.tokenizer, texts, max_length=64, token_budget=budget, mesh=mesh
        )
        seen[tuple(positions.tolist())] = emb
        return emb

    top = superfiltering_select(ifd, rate=0.0, count=8)
    assert len(top) == 8 and list(top).index(5) < list(top).index(17)
    want = superfiltering_d(top, embed, ifd_num=8, fla_num=4)
    rows = _jsonl(tmp_path / "d.jsonl")
    got = [ids.index(r["id"]) for r in rows]
    assert got == want.tolist()  # greedy order by default
    assert set(got) <= set(top.tolist()) and got != sorted(got)
    assert [r["fla_rank"] for r in rows] == list(range(4))
    assert [r["ifd"] for r in rows] == pytest.approx(ifd[got].tolist())
    assert rows[0]["conversations"] == json.loads(data.read_text())[got[0]]["conversations"]
    kernel = dv.SimilarityKernel(seen[tuple(top.tolist())])
    rank = {int(p): i for i, p in enumerate(top)}
    objective = dv.facility_location_value(kernel, [rank[p] for p in got])
    assert summary["objective"] == pytest.approx(objective, abs=1e-9) and objective > 0
    assert {k: summary[k] for k in ("rows", "eligible", "selected", "ifd_num", "fla_num")} == {
        "rows": n,
        "eligible": int(np.sum(ifd < 1.0)),
        "selected": 4,
        "ifd_num": 8,
        "fla_num": 4,
    }
    assert summary["model"] == str(smollm2_gguf) and summary["max_length"] == 64
    assert summary["fla_metric"] == "euclidean" and summary["fla_ties"] == "low"
    assert set(summary["seconds"]) == {"load_model", "embedding", "greedy"}

    # --order original: the same picks in input order, fla_rank still the greedy position.
    run(dataclasses.replace(base, order="original"))
    rows = _jsonl(tmp_path / "d.jsonl")
    assert [ids.index(r["id"]) for r in rows] == sorted(got)
    assert [r["fla_rank"] for r in rows] == [got.index(i) for i in sorted(got)]
    # --order score: IFD order.
    run(dataclasses.replace(base, order="score"))
    assert [ids.index(r["id"]) for r in _jsonl(tmp_path / "d.jsonl")] == [
        i for i in top.tolist() if i in got
    ]

    # --ifd_num 0: the IFD stage is what --rate keeps (floor(0.25 x 24) = 6 rows).
    summary = run(dataclasses.replace(base, ifd_num=0, rate=0.25, fla_num=3))
    stage = superfiltering_select(ifd, rate=0.25)
    assert summary["ifd_num"] == len(stage) == 6
    got = [ids.index(r["id"]) for r in _jsonl(tmp_path / "d.jsonl")]
    assert got == superfiltering_d(stage, embed, ifd_num=None, fla_num=3).tolist()

"""`analyze`: rank statistics, top-set overlap, matching by index, plots, report, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resofilter_jax.analysis.pipeline import AnalyzeConfig, run
from resofilter_jax.analysis.rank_stats import count_inversions, kendall_tau_b, rankdata, spearman
from resofilter_jax.analysis.report import overlap, top_set
from resofilter_jax.scoring.outputs import SHARD_SCHEMA
from resofilter_jax.selection.policies import superfiltering_select

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A merged IFD score file without ShareGPT turns drops `turn` (scoring/outputs.merge_shards).
IFD_SCHEMA = pa.schema([f for f in SHARD_SCHEMA if f.name != "turn"])
RESO_SCHEMA = pa.schema(
    [("index", pa.int64()), ("id", pa.string()), ("status", pa.string())]
    + [("score", pa.float64()), ("loss", pa.float64()), ("ppl", pa.float64())]
    + [("n_tokens", pa.int64())]
)


def write_ifd(path: Path, index, ifd, status=None) -> Path:
    """A score file laid out like the IFD scorer's `scores.parquet`."""
    n = len(index)
    ifd = np.asarray(ifd, np.float64)
    status = list(status) if status is not None else ["ok"] * n
    cols = {
        "index": list(index),
        "id": [None] * n,
        "status": status,
        "loss_direct": np.full(n, 2.0),
        "loss_condition": 2.0 + np.log(ifd),
        "ppl_direct": np.full(n, math.exp(2.0)),
        "ppl_condition": math.exp(2.0) * ifd,
        "ifd": ifd,
        "n_tokens_direct": [5] * n,
        "n_tokens_condition": [5] * n,
    }
    pq.write_table(pa.Table.from_pydict(cols, schema=IFD_SCHEMA), path)
    return path


def write_reso(path: Path, index, score) -> Path:
    """A score file laid out like the resonance scorer's (without the reso/... features)."""
    n = len(index)
    cols = {"index": list(index), "id": [f"r{i}" for i in index], "status": ["ok"] * n}
    cols.update(score=list(score), loss=[1.0] * n, ppl=[math.e] * n, n_tokens=[7] * n)
    pq.write_table(pa.Table.from_pydict(cols, schema=RESO_SCHEMA), path)
    return path


def brute_tau_b(x, y) -> float:
    """Kendall tau-b straight from its pairwise definition."""
    x, y = np.asarray(x), np.asarray(y)
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    s, n1, n2 = (sx * sy)[iu].sum(), (sx[iu] == 0).sum(), (sy[iu] == 0).sum()
    n0 = len(iu[0])
    return float(s / math.sqrt((n0 - n1) * (n0 - n2)))


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- rank statistics


def test_rankdata_averages_ties() -> None:
    assert rankdata(np.array([10, 20, 20, 30, 20, 5])).tolist() == [2, 4, 4, 6, 4, 1]


def test_spearman_and_kendall_hand_computed_with_ties() -> None:
    # Pairs: 4 concordant, 0 discordant, one tied in x, one tied in y: tau_b = 4 / sqrt(5 * 5).
    # Average ranks x = [1, 2.5, 2.5, 4], y = [1, 3.5, 2, 3.5]: rho = 3.75 / 4.5 = 5/6.
    x, y = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 3.0]
    assert kendall_tau_b(x, y) == pytest.approx(0.8, abs=1e-12)
    assert spearman(x, y) == pytest.approx(5 / 6, abs=1e-12)
    # No ties, two swapped neighbours: 8 concordant, 2 discordant; sum d^2 = 4.
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert kendall_tau_b(x, y) == pytest.approx(0.6, abs=1e-12)
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24), abs=1e-12)


def test_kendall_matches_the_pairwise_definition_and_inversions_brute_force() -> None:
    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 64, 301):
        x = rng.integers(0, 6, n).astype(float)
        y = rng.integers(0, 4, n) + 0.5 * x
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert kendall_tau_b(x, y) == pytest.approx(brute_tau_b(x, y), abs=1e-12)
        r = rng.integers(0, n, n)
        want = sum(int(r[i] > r[j]) for i in range(n) for j in range(i + 1, n))
        assert count_inversions(r) == want


def test_perfect_reversed_and_constant() -> None:
    x = np.array([0.3, 0.1, 0.7, 0.7, 0.2])
    assert spearman(x, x) == pytest.approx(1.0) and kendall_tau_b(x, x) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert kendall_tau_b(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(5))) and math.isnan(kendall_tau_b(x, np.ones(5)))


def test_against_scipy_when_available() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    for n in (5, 50, 2000):
        x = np.round(rng.normal(size=n), 1)  # many ties
        y = np.round(x + rng.normal(size=n), 1)
        assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert np.allclose(rankdata(x), stats.rankdata(x))


# ----------------------------------------------------------------------------- top sets


def test_top_sets_follow_superfiltering_and_overlap_counts() -> None:
    v = np.array([0.5, 0.9, 1.0, 0.9, 0.2, 1.5, 0.95, 0.7, 0.1, 0.6])
    # high: IFD < 1 by IFD descending, ties by position; k = floor(0.3 * 10) = 3.
    assert top_set(v, rate=0.3, threshold=1.0, top="high").tolist() == [6, 1, 3]
    assert np.array_equal(
        top_set(v, rate=0.3, threshold=1.0, top="high"), superfiltering_select(v, rate=0.3)
    )
    assert top_set(v, rate=0.3, threshold=None, top="high").tolist() == [5, 2, 6]
    assert top_set(v, rate=0.2, threshold=None, top="low").tolist() == [8, 4]
    assert top_set(v, rate=0.3, threshold=0.55, top="low").tolist() == [8, 4, 0]
    w = np.array([0.5, 0.1, 1.0, 0.9, 0.2, 1.5, 0.95, 0.7, 0.1, 0.6])
    # top 30% (k = 3) of v: {6, 1, 3}; of w: {6, 3, 7}: 2 shared, union 4.
    (row,) = overlap(v, w, rates=[0.3], threshold=1.0, top="high")
    assert row == {
        "rate": 0.3,
        "k": 3,
        "size_a": 3,
        "size_b": 3,
        "intersection": 2,
        "overlap": pytest.approx(2 / 3),
        "jaccard": pytest.approx(0.5),
    }
    # Fewer eligible rows than k: the sets shrink, the overlap is still divided by k = 3.
    (row,) = overlap(v, w, rates=[0.3], threshold=0.3, top="high")  # {4, 8} vs {4, 1, 8}
    assert (row["k"], row["size_a"], row["size_b"], row["intersection"]) == (3, 2, 3, 2)
    assert row["overlap"] == pytest.approx(2 / 3) and row["jaccard"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- run()


def test_identical_files_agree_fully_and_report_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ifd = rng.uniform(0.2, 1.3, 200)
    a = write_ifd(tmp_path / "a.parquet", range(200), ifd)
    b = write_ifd(tmp_path / "b.parquet", range(200), ifd)
    out = tmp_path / "rep"
    rep = run(AnalyzeConfig(a=str(a), b=str(b), out=str(out), label_a="gpt2", label_b="big"))
    m = rep["metrics"]
    assert rep["column"] == "ifd" and rep["threshold"] == 1.0
    assert m["spearman"] == pytest.approx(1.0) and m["kendall_tau_b"] == pytest.approx(1.0)
    assert [o["k"] for o in m["top_overlap"]] == [10, 20, 30]
    assert all(o["overlap"] == 1.0 and o["jaccard"] == 1.0 for o in m["top_overlap"])
    assert rep["counts"]["matched"] == 200
    s = rep["files"][0]["summary"]
    assert s["count"] == 200 and s["mean"] == pytest.approx(ifd.mean())
    assert s["q50"] == pytest.approx(np.median(ifd))
    assert s["frac_below_threshold"] == pytest.approx(np.mean(ifd < 1.0))
    assert is_png(out / "hist.png") and is_png(out / "scatter.png")
    md = (out / "report.md").read_text()
    assert "| spearman | 1 |" in md and "| kendall_tau_b | 1 |" in md
    assert "| 0.1 | 20 | 20 | 20 | 20 | 1 | 1 |" in md
    assert str(a) in md and "![scatter.png](scatter.png)" in md and "gpt2" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["top_overlap"][2]["intersection"] == 30


def test_reversed_file_gives_minus_one_and_no_overlap(tmp_path: Path) -> None:
    ifd = np.linspace(0.05, 0.95, 101)
    a = write_ifd(tmp_path / "a.parquet", range(101), ifd)
    b = write_ifd(tmp_path / "b.parquet", range(101), 1.0 - ifd)
    m = run(AnalyzeConfig(a=str(a), b=str(b), out=str(tmp_path / "rep")))["metrics"]
    assert m["spearman"] == pytest.approx(-1.0) and m["kendall_tau_b"] == pytest.approx(-1.0)
    assert [o["intersection"] for o in m["top_overlap"]] == [0, 0, 0]
    # IFD < 0.12: 8 eligible rows per file (0.05 + 0.009 i), fewer than k = 10 and 15.
    out = tmp_path / "rep2"
    rep = run(AnalyzeConfig(a=str(a), b=str(b), out=str(out), threshold=0.12))
    assert [o["size_a"] for o in rep["metrics"]["top_overlap"]] == [5, 8, 8]
    assert "at rates [0.1, 0.15] fewer than k" in (out / "report.md").read_text()


def test_rows_are_matched_by_index_and_bad_rows_are_excluded(tmp_path: Path) -> None:
    # A: rows 0..11 in order; B: rows 2..13 shuffled, as a run directory with scores.jsonl.
    value = {i: 0.1 + 0.05 * i for i in range(14)}  # increasing in the index
    status_a = ["ok"] * 12
    status_a[3] = "empty_output"
    ifd_a = [value[i] for i in range(12)]
    ifd_a[5] = float("nan")  # ok but no finite score
    a = write_ifd(tmp_path / "a.parquet", range(12), ifd_a, status_a)
    order = [13, 7, 2, 11, 4, 9, 6, 12, 3, 10, 8, 5]
    rows_b = []
    for i in order:
        bad = i == 9
        rows_b.append({"index": i, "status": "error:oom" if bad else "ok", "ifd": value[i]})
    rows_b.append(rows_b.pop(0))  # order must not matter
    run_dir = tmp_path / "run_b"
    run_dir.mkdir()
    (run_dir / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_b))
    rep = run(AnalyzeConfig(a=str(a), b=str(run_dir), out=str(tmp_path / "rep"), rates=[0.5]))
    assert rep["counts"] == {
        "rows_a": 12,
        "rows_b": 12,
        "common": 10,  # 2..11
        "only_in_a": 2,  # 0, 1
        "only_in_b": 2,  # 12, 13
        "status_not_ok_a": 1,  # 3
        "status_not_ok_b": 1,  # 9
        "ok_but_not_finite_a": 1,  # 5
        "ok_but_not_finite_b": 0,
        "excluded_common": 3,
        "matched": 7,  # 2, 4, 6, 7, 8, 10, 11
    }
    # Matched by index, both files increase with the index: perfect agreement; a positional
    # pairing of B's shuffled rows would not give 1.
    assert rep["metrics"]["spearman"] == pytest.approx(1.0)
    assert rep["metrics"]["top_overlap"][0]["k"] == 3  # floor(0.5 * 7)
    assert rep["files"][1]["path"].endswith("scores.jsonl")
    assert rep["files"][1]["summary"]["statuses"] == {"error:oom": 1, "ok": 11}


def test_turns_are_part_of_the_key(tmp_path: Path) -> None:
    # ShareGPT "all" mode: one row per (index, turn); B lists them in another order.
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    value = {k: 0.1 * (1 + n) for n, k in enumerate(keys)}
    for name, order in (("a", keys), ("b", keys[::-1])):
        rows = [{"index": i, "turn": t, "status": "ok", "ifd": value[i, t]} for i, t in order]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    rep = run(AnalyzeConfig(a=a, b=b, out=str(tmp_path / "rep")))
    assert rep["counts"]["matched"] == 5 and rep["metrics"]["spearman"] == pytest.approx(1.0)
    rows = [{"index": 0, "turn": 1, "status": "ok", "ifd": 0.5}] * 2
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"same key \(index 0, turn 1\)"):
        run(AnalyzeConfig(a=a, b=str(tmp_path / "dup.jsonl"), out=str(tmp_path / "rep")))


def test_resonance_files_use_the_score_column_without_threshold(tmp_path: Path) -> None:
    score = 1e-5 * (1 + np.arange(40) / 1000)
    a = write_reso(tmp_path / "a.parquet", range(40), score)
    b = write_reso(tmp_path / "b.parquet", range(40), score[::-1])
    rep = run(AnalyzeConfig(a=str(a), b=str(b), out=str(tmp_path / "rep"), top="low"))
    assert rep["column"] == "score" and rep["threshold"] is None
    assert rep["metrics"]["kendall_tau_b"] == pytest.approx(-1.0)
    assert "frac_below_threshold" not in rep["files"][0]["summary"]
    assert "k lowest scores among all matched rows" in (tmp_path / "rep" / "report.md").read_text()


def test_single_file_gives_summary_and_histogram_only(tmp_path: Path) -> None:
    a = write_ifd(tmp_path / "a.parquet", range(30), np.linspace(0.5, 1.4, 30))
    out = tmp_path / "rep"
    rep = run(AnalyzeConfig(a=str(a), out=str(out), threshold="none"))
    assert "metrics" not in rep and rep["threshold"] is None
    assert rep["files"][0]["summary"]["max"] == pytest.approx(1.4)
    assert is_png(out / "hist.png") and not (out / "scatter.png").exists()
    md = (out / "report.md").read_text()
    assert "Agreement" not in md and "| max | 1.4 |" in md


def test_large_input_subsamples_the_scatter(tmp_path: Path) -> None:
    n = 100_000
    rng = np.random.default_rng(4)
    x = rng.lognormal(-0.3, 0.3, n)
    a = write_ifd(tmp_path / "a.parquet", range(n), x)
    b = write_ifd(tmp_path / "b.parquet", range(n), x * rng.lognormal(0, 0.1, n))
    out = tmp_path / "rep"
    rep = run(AnalyzeConfig(a=str(a), b=str(b), out=str(out), max_scatter_points=5000))
    assert 0.8 < rep["metrics"]["spearman"] < 1.0
    assert "subsample of 5000 of 100000 matched rows" in (out / "report.md").read_text()
    assert is_png(out / "scatter.png")


def test_clear_errors(tmp_path: Path) -> None:
    a = write_ifd(tmp_path / "a.parquet", range(5), [0.5] * 5)
    b = write_ifd(tmp_path / "b.parquet", range(10, 15), [0.5] * 5)
    c = write_ifd(tmp_path / "c.parquet", range(5), [0.5] * 5, ["error:x"] * 5)
    out = str(tmp_path / "rep")
    with pytest.raises(ValueError, match=r"no column `score`.*available columns: index, id"):
        run(AnalyzeConfig(a=str(a), out=out, column="score"))
    with pytest.raises(ValueError, match="no rows in common"):
        run(AnalyzeConfig(a=str(a), b=str(b), out=out))
    with pytest.raises(ValueError, match="5 rows in common but none is ok"):
        run(AnalyzeConfig(a=str(a), b=str(c), out=out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(AnalyzeConfig(a=str(tmp_path / "nope.parquet"), out=out))
    with pytest.raises(ValueError, match="unknown mode 'gradients'; available: scores"):
        run(AnalyzeConfig(a=str(a), out=out, mode="gradients"))
    assert not (tmp_path / "rep").exists()  # errors come before anything is written


def test_cli_writes_the_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ifd = rng.uniform(0.2, 1.2, 60)
    a = write_ifd(tmp_path / "a.parquet", range(60), ifd)
    b = write_ifd(tmp_path / "b.parquet", range(60), ifd + rng.normal(0, 0.05, 60))
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "resofilter_jax.analyze", f"--a={a}", f"--b={b}"]
    cmd += [f"--out={out}", "--label_a=gpt2", "--label_b=smollm2", "--rates=0.1,0.2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads((out / "report.json").read_text())
    assert [o["k"] for o in printed["metrics"]["top_overlap"]] == [6, 12]
    assert printed["threshold"] == 1.0 and printed["counts"]["matched"] == 60
    assert 0.5 < printed["metrics"]["spearman"] < 1.0
    md = (out / "report.md").read_text()
    assert "smollm2" in md and f"{printed['metrics']['spearman']:.6g}" in md
    assert is_png(out / "hist.png") and is_png(out / "scatter.png")

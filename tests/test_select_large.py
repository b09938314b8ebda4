"""select / analyze on large score files: streamed output bytes, column-only reads, one data pass.

The pools come from ``bench/make_pool.py`` (unreadable rows, empty outputs, duplicates,
ShareGPT turns); the expected outputs are built the simple way (every row in memory,
``json.dump``) and compared byte for byte.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from resofilter_jax.analysis.pipeline import AnalyzeConfig
from resofilter_jax.analysis.pipeline import run as analyze
from resofilter_jax.data import iter_raw_rows, load_records
from resofilter_jax.data.templates import user_query
from resofilter_jax.selection import output, rows
from resofilter_jax.selection.pipeline import SelectConfig, run
from resofilter_jax.selection.policies import RESO_KEYS, SCORE_KEYS
from resofilter_jax.selection.score_file import ScoreFile, jsonable, read_scores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import make_pool  # noqa: E402


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2000 alpaca rows (JSONL), score files in row groups of 512 rows, scores.jsonl too."""
    spec = make_pool.PoolSpec(rows=2000, chunk_rows=512, reso_params=1, score_jsonl=True)
    return make_pool.make_pool(tmp_path_factory.mktemp("alpaca"), spec)


@pytest.fixture(scope="module")
def sharegpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1500 ShareGPT rows with 1-3 turns each ("all" mode), one JSON array."""
    spec = make_pool.PoolSpec(
        rows=1500, fmt="sharegpt", turns="all", chunk_rows=400, reso_params=1,
        data_name="data.json",
    )  # fmt: skip
    return make_pool.make_pool(tmp_path_factory.mktemp("sharegpt"), spec)


def _dump(path: Path, rows: list[dict[str, Any]]) -> bytes:
    """What the selection wrote before it streamed: json.dump of the whole list, or JSONL."""
    if path.suffix == ".json":
        return json.dumps(rows, ensure_ascii=False, indent=1).encode()
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _expected(
    scores: Path, data: Path, picked: np.ndarray, fmt: str, attach: tuple[str, ...], turns: str
) -> list[dict[str, Any]]:
    """The output rows of ``picked`` from every data row and record held in memory."""
    cols = read_scores(scores)
    turn = cols.get("turn", np.zeros(len(cols["index"]), np.int64))
    raw = dict(iter_raw_rows(data, on_error="status", allow_truncated=True))
    if fmt == "reference":
        fmt_name = json.loads((scores.parent / "run_config.json").read_text())["data"]["format"]
        records, _ = load_records(data, fmt_name, sharegpt_turns=turns, on_error="status")
        by_key = {(r.index, r.turn): r for r in records}
        out = []
        for i in picked:
            r = by_key[int(cols["index"][i]), int(turn[i])]
            out.append(
                {"instruction": "", "input": user_query(r), "output": r.output, "idx": r.index}
            )
        return out
    out = []
    for i in picked:
        base = raw[int(cols["index"][i])]
        row = dict(base) if isinstance(base, dict) else {"index": int(cols["index"][i])}
        if "turn" in cols:
            row["turn"] = int(turn[i])
        row.update({k: jsonable(cols[k][i]) for k in attach if k in cols})
        out.append(row)
    return out


def _sf_reference(ifd: np.ndarray, k: int, threshold: float = 1.0) -> np.ndarray:
    """Superfiltering's picks by a plain numpy sort: IFD descending, ties by position."""
    pos = np.nonzero(np.isfinite(ifd) & (ifd < threshold))[0]
    return pos[np.lexsort((pos, -ifd[pos]))][:k]


def _rf_reference(path: Path, p: float, keep: str = "low") -> tuple[np.ndarray, int]:
    """ResoFilter's kept positions (input order) and N, by a plain numpy sort."""
    t = pq.read_table(path, columns=["index", "status", "score"])
    ok = np.asarray(t.column("status").to_pylist()) == "ok"
    score = np.where(ok, t.column("score").to_numpy(zero_copy_only=False), np.nan)
    pos = np.nonzero(np.isfinite(score))[0]
    sign = -1.0 if keep == "low" else 1.0
    ranking = pos[np.lexsort((pos, sign * score[pos]))]
    return np.sort(ranking[int(len(pos) * p) :]), len(pos)


# --- the writer -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_streamed_writer_matches_json_dump(tmp_path: Path, suffix: str) -> None:
    rows_ = [
        {"a": 1, "b": None, "text": 'line\nbreak "quoted" \\ tab\t é 日本 🙂 \u2028 end'},
        {"nested": {"list": [1, [2, []], {}], "empty": {}}, "conversations": []},
        {},
        {"x": 1.5e-300, "y": -0.0, "z": True},
    ]
    for case in (rows_, rows_[:1], []):
        path = tmp_path / f"o{suffix}"
        output.write_rows(path, iter(case))
        assert path.read_bytes() == _dump(path, case)
        assert not path.with_name(path.name + ".tmp").exists()


def test_failed_stream_leaves_no_file(tmp_path: Path) -> None:
    def rows_then_error(order: np.ndarray):
        yield {"a": 1}
        raise ValueError("boom")

    outs = [(tmp_path / "a.json", np.array([0, 1])), (tmp_path / "b.jsonl", np.array([1, 0]))]
    with pytest.raises(ValueError, match="boom"):
        output.write_outputs(outs, rows_then_error, np.array([0, 1]))
    assert sorted(tmp_path.iterdir()) == []


def test_one_stream_feeds_files_in_any_order(tmp_path: Path) -> None:
    """Files that follow the stream are written as it goes, the others from the spill file."""
    stream = np.array([5, 3, 9, 0, 7, 1])  # the only order make() can produce

    def make(order: np.ndarray):
        assert order.tolist() == stream.tolist()
        return ({"pos": int(p), "text": f"row {p} é\n"} for p in order)

    outs = [
        (tmp_path / "a.jsonl", np.array([5, 9, 7])),  # a subsequence: direct
        (tmp_path / "b.json", np.array([0, 9, 5])),  # another order: spilled
        (tmp_path / "c.jsonl", np.array([7, 1, 3, 0])),
        (tmp_path / "d.json", np.array([], np.int64)),
    ]
    output.write_outputs(outs, make, stream)
    for path, pos in outs:
        want = [{"pos": int(p), "text": f"row {p} é\n"} for p in pos]
        assert path.read_bytes() == _dump(path, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.json", "c.jsonl", "d.json"]
    with pytest.raises(ValueError, match="must be in the stream"):
        output.write_outputs([(tmp_path / "e.jsonl", np.array([4]))], make, stream)


# --- streamed copies against the in-memory reference ------------------------------------------


@pytest.mark.parametrize("scores_suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize(
    ("order", "out_name"), [("auto", "o.json"), ("original", "o.jsonl"), ("auto", "o.jsonl")]
)
def test_superfiltering_copy_is_the_in_memory_result(
    alpaca: dict[str, Path], tmp_path: Path, order: str, out_name: str, scores_suffix: str
) -> None:
    scores = alpaca["ifd"].with_suffix(scores_suffix)
    out = tmp_path / out_name
    summary = run(
        SelectConfig(scores=str(scores), data=str(alpaca["data"]), rate=0.3, order=order,
                     output=str(out))
    )  # fmt: skip
    ifd = pq.read_table(alpaca["ifd"], columns=["ifd"]).column(0).to_numpy()
    picked = _sf_reference(ifd, math.floor(0.3 * len(ifd)))
    assert summary["selected"] == len(picked) == 600
    if order == "original":
        picked = np.sort(picked)
    want = _expected(scores, alpaca["data"], picked, "rows", SCORE_KEYS, "first")
    assert out.read_bytes() == _dump(out, want)


@pytest.mark.parametrize("fmt", ["rows", "reference"])
def test_resofilter_rates_copy_is_the_in_memory_result(
    alpaca: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    """Duplicates, errors and empty outputs; three nested files from one pass."""
    summary = run(
        SelectConfig(
            scores=str(alpaca["reso"]),
            data=str(alpaca["data"]),
            drop_rates=(0.25, 0.5, 0.75),
            format=fmt,
            with_features=fmt == "rows",
            output=str(tmp_path / "sel.jsonl"),
        )
    )
    assert summary["statuses"]["duplicate_of"] > 0 and summary["statuses"]["error:bad_json"] > 0
    features = tuple(n for n in pq.read_schema(alpaca["reso"]).names if n.startswith("reso/"))
    for o, p in zip(summary["outputs"], (0.25, 0.5, 0.75), strict=True):
        picked, n_scored = _rf_reference(alpaca["reso"], p)
        assert summary["scored"] == n_scored and o["selected"] == len(picked)
        want = _expected(alpaca["reso"], alpaca["data"], picked, fmt, RESO_KEYS + features, "first")
        assert Path(o["output"]).read_bytes() == _dump(Path(o["output"]), want)


@pytest.mark.parametrize(("fmt", "order"), [("rows", "auto"), ("reference", "score")])
def test_sharegpt_turns_copy_is_the_in_memory_result(
    sharegpt: dict[str, Path], tmp_path: Path, fmt: str, order: str
) -> None:
    """Several score rows per data row (turns), a JSON-array data file, both orders."""
    out = tmp_path / "o.json"
    for scores, cfg in (
        (sharegpt["ifd"], {"rate": 0.2}),
        (sharegpt["reso"], {"drop_rate": 0.6}),
    ):
        run(
            SelectConfig(scores=str(scores), data=str(sharegpt["data"]), format=fmt,
                         order=order, output=str(out), **cfg)
        )  # fmt: skip
        if "rate" in cfg:
            ifd = pq.read_table(scores, columns=["ifd"]).column(0).to_numpy()
            picked = _sf_reference(ifd, math.floor(0.2 * len(ifd)))
            attach = SCORE_KEYS
        else:
            picked, _ = _rf_reference(scores, 0.6)
            score = pq.read_table(scores, columns=["score"]).column(0).to_numpy()
            if order == "score":  # ranking order: score descending, ties by (index, turn)
                picked = picked[np.lexsort((picked, -score[picked]))]
            attach = RESO_KEYS
        want = _expected(scores, sharegpt["data"], picked, fmt, attach, "all")
        assert out.read_bytes() == _dump(out, want)


def test_one_pass_over_the_data_parsing_only_selected_lines(
    alpaca: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes, parsed = [], []
    iter_rows_at, parse_line = rows.iter_rows_at, rows._parse_line

    def counting_iter(*args: Any, **kw: Any):
        passes.append(1)
        return iter_rows_at(*args, **kw)

    def counting_parse(raw: bytes, lineno: int):
        parsed.append(lineno)
        return parse_line(raw, lineno)

    monkeypatch.setattr(rows, "iter_rows_at", counting_iter)
    monkeypatch.setattr(rows, "_parse_line", counting_parse)
    summary = run(
        SelectConfig(
            scores=str(alpaca["reso"]),
            data=str(alpaca["data"]),
            drop_rates=(0.2, 0.9),
            output=str(tmp_path / "s.jsonl"),
        )
    )
    assert len(passes) == 1  # both files from one pass
    assert len(parsed) == summary["outputs"][0]["selected"]  # the union: the p80 file
    assert parsed == sorted(parsed)


def test_wrong_data_file_fails_after_the_pass_and_leaves_nothing(
    alpaca: dict[str, Path], tmp_path: Path
) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                             for i in range(100)))  # fmt: skip
    picked, _ = _rf_reference(alpaca["reso"], 0.25)  # the union of both files
    index = pq.read_table(alpaca["reso"], columns=["index"]).column(0).to_numpy()[picked]
    lost = index[index >= 100]
    for fmt, first in (("rows", f"{lost[0]}"), ("reference", f"({lost[0]}, 0)")):
        want = f"{len(lost)} selected rows (e.g. index {first}) are not in {short}"
        with pytest.raises(ValueError, match=re.escape(want)):
            run(
                SelectConfig(scores=str(alpaca["reso"]), data=str(short), format=fmt,
                             drop_rates=(0.25, 0.5), output=str(tmp_path / "o" / "s.jsonl"))
            )  # fmt: skip
        assert list((tmp_path / "o").iterdir()) == []


# --- column reads -----------------------------------------------------------------------------


def test_only_the_needed_columns_are_read(
    alpaca: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, ...]] = []
    read, batches = pq.ParquetFile.read, pq.ParquetFile.iter_batches

    def spy_read(self, columns=None, *args: Any, **kw: Any):
        asked.append(tuple(columns) if columns is not None else ("<all>",))
        return read(self, columns, *args, **kw)

    def spy_batches(self, *args: Any, columns=None, **kw: Any):
        asked.append(tuple(columns) if columns is not None else ("<all>",))
        return batches(self, *args, columns=columns, **kw)

    def no_whole_table(*args: Any, **kw: Any):
        raise AssertionError("pq.read_table reads every column")

    monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_batches)
    monkeypatch.setattr(pq, "read_table", no_whole_table)

    run(SelectConfig(scores=str(alpaca["reso"]), drop_rate=0.5, output=str(tmp_path / "a.jsonl")))
    assert {c for cols in asked for c in cols} == {"index", "status", "score", *RESO_KEYS}
    asked.clear()
    run(SelectConfig(scores=str(alpaca["ifd"]), rate=0.1, output=str(tmp_path / "b.jsonl")))
    assert {c for cols in asked for c in cols} == {"index", "ifd", *SCORE_KEYS}
    asked.clear()
    # --column reads that column instead (and attaches it: already among the usual ones).
    run(SelectConfig(scores=str(alpaca["ifd"]), column="loss_direct", threshold=math.inf,
                     rate=0.1, output=str(tmp_path / "c.jsonl")))  # fmt: skip
    assert {c for cols in asked for c in cols} == {"index", *SCORE_KEYS}
    asked.clear()
    run(SelectConfig(scores=str(alpaca["reso"]), column="loss", output=str(tmp_path / "d.jsonl")))
    assert {c for cols in asked for c in cols} == {"index", "status", *RESO_KEYS}
    asked.clear()
    analyze(AnalyzeConfig(a=str(alpaca["reso"]), out=str(tmp_path / "rep")))
    analyze(AnalyzeConfig(a=str(alpaca["ifd"]), b=str(alpaca["ifd_b"]), out=str(tmp_path / "r")))
    assert {c for cols in asked for c in cols} == {"index", "status", "score", "ifd"}
    assert all(len(cols) <= len(SCORE_KEYS) for cols in asked)


def test_score_values_stream_in_any_order(tmp_path: Path) -> None:
    """iter_values gives what jsonable(read_scores(...)) gives, nullable ints as floats."""
    import pyarrow as pa

    n = 1000
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "index": np.arange(n),
            "x": np.where(rng.random(n) < 0.1, np.nan, rng.random(n)),
            "k": pa.array([None if i % 97 == 5 else i for i in range(n)], pa.int64()),
            "m": np.arange(n) * 3,
        }
    )
    path = tmp_path / "s.parquet"
    pq.write_table(table, path, row_group_size=128)
    cols = read_scores(path)
    sf = ScoreFile(path)
    for order in (np.array([], np.int64), np.arange(0, n, 7), rng.permutation(n)[:300]):
        got = {name: [] for name in ("x", "k", "m")}
        seen = []
        for pos, vals in sf.iter_values(["x", "k", "m", "absent"], order):
            seen += pos.tolist()
            for name in got:
                got[name] += vals[name]
        assert seen == order.tolist()
        for name in got:
            assert got[name] == [jsonable(cols[name][i]) for i in order]
    assert isinstance(got["k"][0], float) and isinstance(got["m"][0], int)


# --- 200k rows against numpy -------------------------------------------------------------------


def test_200k_rows_against_numpy(tmp_path: Path) -> None:
    spec = make_pool.PoolSpec(rows=200_000, chunk_rows=1 << 16, reso_params=1, write_data=False)
    pool = make_pool.make_pool(tmp_path / "pool", spec)
    ifd = pq.read_table(pool["ifd"], columns=["ifd"]).column(0).to_numpy()
    summary = run(SelectConfig(scores=str(pool["ifd"]), rate=0.1, output=str(tmp_path / "a.jsonl")))
    got = [json.loads(line)["index"] for line in (tmp_path / "a.jsonl").open()]
    assert got == _sf_reference(ifd, 20_000).tolist() and summary["selected"] == 20_000
    assert summary["eligible"] == int(np.sum(ifd < 1.0))

    summary = run(
        SelectConfig(scores=str(pool["reso"]), drop_rates=(0.3, 0.7),
                     output=str(tmp_path / "r.jsonl"))
    )  # fmt: skip
    for o, p in zip(summary["outputs"], (0.3, 0.7), strict=True):
        want, n_scored = _rf_reference(pool["reso"], p)
        got = [json.loads(line)["index"] for line in Path(o["output"]).open()]
        assert got == want.tolist() and summary["scored"] == n_scored

    rep = analyze(AnalyzeConfig(a=str(pool["ifd"]), b=str(pool["ifd_b"]), out=str(tmp_path / "x")))
    b = pq.read_table(pool["ifd_b"], columns=["ifd"]).column(0).to_numpy()
    both = np.isfinite(ifd) & np.isfinite(b)  # same statuses in both files
    assert rep["counts"]["matched"] == int(both.sum())
    assert rep["metrics"]["spearman"] == pytest.approx(stats.spearmanr(ifd[both], b[both])[0])
    top = rep["metrics"]["top_overlap"][1]  # rate 0.1
    k = math.floor(0.1 * both.sum())
    sa, sb = _sf_reference(ifd[both], k), _sf_reference(b[both], k)
    assert top["intersection"] == len(np.intersect1d(sa, sb))


def test_partial_sorts_equal_the_full_lexsort_with_ties() -> None:
    """The k-smallest shortcut of the policies keeps ties in position (or rank) order."""
    from resofilter_jax.selection.policies import resofilter_keep, superfiltering_select

    rng = np.random.default_rng(7)
    for n in (0, 1, 50, 5000):
        ifd = np.round(rng.uniform(0.2, 1.3, n), 2)  # many ties
        ifd[rng.random(n) < 0.05] = np.nan
        ok = np.nonzero(np.isfinite(ifd) & (ifd < 1.0))[0]
        full = ok[np.lexsort((ok, -ifd[ok]))]
        for k in (0, 1, 7, n // 10, n // 2, n, n + 3):
            assert superfiltering_select(ifd, rate=0.0, count=k).tolist() == full[:k].tolist()
        rank = rng.permutation(n)
        for r in (None, rank):
            rr = np.arange(n) if r is None else r
            for keep, sign in (("low", -1.0), ("high", 1.0)):
                ranking = ok[np.lexsort((rr[ok], sign * ifd[ok]))]
                rates = (0.0, 0.1, 0.5, 0.75)
                for order in ("original", "score"):
                    got = resofilter_keep(
                        np.where(ifd < 1.0, ifd, np.nan), rates, keep=keep, rank=r, order=order
                    )
                    for p, kept in zip(rates, got, strict=True):
                        want = ranking[int(len(ok) * p) :]
                        if order == "original":
                            want = want[np.argsort(rr[want], kind="stable")]
                        assert kept.tolist() == want.tolist()


def test_selective_readers_give_the_rows_iter_raw_rows_gives(tmp_path: Path) -> None:
    """The JSONL / Parquet readers that parse only the selected rows give the reader's rows."""
    import pyarrow as pa
    from support.fuzz import pa_column

    lines = [
        b'\xef\xbb\xbf{"a": "\xff"}',  # BOM, then invalid UTF-8
        b"",
        b"not json",
        b"  \t",
        b"[" * 100_000 + b"]" * 100_000,  # too deep for the decoder
        b'{"n": ' + b"9" * 5000 + b"}",  # an integer over int_max_str_digits
        b"[1, 2]",
        b'{"b": "\xc3\xa9", "c": [1, {"d": null}]}',
        b"\r",
        b'{"c": 3}',
        b'{"cut": ',
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    table = pa.table(
        {
            "s": pa_column("bad_utf8", [b"\xff\xfe", b"x", None, b"y", b"z"] * 400),
            "k": np.arange(2000),
        }
    )
    parquet = tmp_path / "d.parquet"
    pq.write_table(table, parquet, row_group_size=700)
    for path in (jsonl, parquet):
        everything = list(iter_raw_rows(path, on_error="status"))
        n = len(everything)
        first = next(i for i, (_, r) in enumerate(everything) if isinstance(r, dict))
        for wanted in ([], [n - 1], list(range(0, n, 3)), list(range(n)), [1, 4, 5]):
            for first_good in (False, True):
                keep = set(wanted) | ({first} if first_good else set())
                got = list(rows.iter_rows_at(str(path), np.array(wanted), first_good=first_good))
                assert got == [everything[i] for i in sorted(keep)], (path.suffix, wanted)

"""`analyze --mode compare`: N methods pairwise against scipy and direct set computations."""

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
from scipy import stats

from resofilter_jax.analysis.compare import default_rule, split_input
from resofilter_jax.analysis.pipeline import AnalyzeConfig, run
from resofilter_jax.analysis.report import load, resolve_threshold

REPO = Path(__file__).resolve().parents[1]
RATES = (0.05, 0.1, 0.3)
N = 240  # rows of the data every method scored (indices 0..N-1)


def write_parquet(path: Path, cols: dict) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def write_jsonl(path: Path, cols: dict) -> Path:
    names = list(cols)
    rows = [dict(zip(names, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _values(rng: np.random.Generator, base: np.ndarray, noise: float, nan_at=()) -> np.ndarray:
    """[n] values related to ``base``, rounded to 2 decimals (ties), NaN at ``nan_at``."""
    v = np.round(np.exp(0.4 * base + noise * rng.normal(size=len(base)) - 0.3), 2)
    v[list(nan_at)] = np.nan
    return v


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Score files of five methods on overlapping rows, each with its own gaps."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    base = rng.normal(size=N)
    # IFD file: three columns, rows in order, two bad statuses, a NaN in one column.
    status = ["ok"] * N
    status[3] = "error:oom"
    status[51] = "no_response_tokens"
    ifd_cols = {
        "index": np.arange(N),
        "id": [f"r{i}" for i in range(N)],
        "status": status,
        "ifd": _values(rng, base, 0.2),
        "ifd_loss_ratio": _values(rng, base, 0.3),
        "ifd_informative": _values(rng, base, 0.6, nan_at=[7]),
        "n_tokens_direct": rng.integers(1, 50, N),
    }
    # r-IFD: rows 20.. shuffled, inside a run directory whose name holds ':'.
    keep = rng.permutation(np.arange(20, N))
    rifd = np.round(np.exp(-0.3 * base + 0.4 * rng.normal(size=N) - 0.2), 2)[keep]
    run_dir = root / "rifd:run"
    run_dir.mkdir()
    rifd_cols = {"index": keep, "status": ["ok"] * len(keep), "rifd": rifd}
    # Resonance (JSONL, with turn 0): rows 0..219, low scores are kept, a null score.
    reso = [float(v) for v in 1e-5 * _values(rng, -base, 0.5)[:220]]
    reso[11] = None
    reso_cols = {"index": list(range(220)), "turn": [0] * 220, "status": ["ok"] * 220}
    reso_cols["score"] = reso
    # Representation similarity (no status column): every third row.
    sub = np.arange(0, N, 3)
    rds = np.round(np.tanh(0.5 * base[sub] + 0.5 * rng.normal(size=len(sub))), 2)
    return {
        "root": root,
        "ifd": write_parquet(root / "ifd.parquet", ifd_cols),
        "ifd_cols": ifd_cols,
        "rifd_dir": (write_parquet(run_dir / "scores.parquet", rifd_cols), run_dir)[1],
        "reso": write_jsonl(root / "reso.jsonl", reso_cols),
        "rds": write_parquet(root / "rds.parquet", {"index": sub, "rds_score": rds}),
    }


def _inputs(files: dict) -> list[str]:
    ifd = files["ifd"]
    return [
        f"{ifd}:ifd",
        f"{ifd}:ifd_loss_ratio",
        f"{ifd}:ifd_informative",
        f"{files['rifd_dir']}",  # a directory with ':' in its name, default column rifd
        f"{files['reso']}",  # default column score
        f"{files['rds']}:rds_score",
    ]


LABELS = ["IFD", "IFD-loss", "IFD-inf", "r-IFD", "reso", "RDS"]
# Overrides: IFD-loss's threshold 0.9 (default 1), resonance's direction given as low.
THRESHOLDS = ["auto", "0.9", "auto", "auto", "auto", "auto"]
DIRECTIONS = ["auto", "auto", "auto", "auto", "low", "auto"]
RULES = [("high", 1.0), ("high", 0.9), ("high", 1.0), ("low", 1.0), ("low", None)]  # 4th: rifd
RULES.append(("high", None))


@pytest.fixture(scope="module")
def report(files: dict) -> dict:
    out = files["root"] / "report"
    config = AnalyzeConfig(out=str(out), mode="compare", inputs=_inputs(files), rates=RATES)
    config.labels, config.thresholds, config.directions = LABELS, THRESHOLDS, DIRECTIONS
    return run(config)


def _usable(path: Path, column: str) -> dict[int, float]:
    """{index: value} of the rows with status ok (or no status) and a finite value."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        rows = pq.read_table(path).to_pylist()
    return {
        r["index"]: float(r[column])
        for r in rows
        if r.get("status", "ok") == "ok" and r[column] is not None and math.isfinite(r[column])
    }


def _direct(files: dict) -> list[dict[int, float]]:
    ifd = files["ifd"]
    cols = ["ifd", "ifd_loss_ratio", "ifd_informative"]
    rifd = files["rifd_dir"] / "scores.parquet"
    return [_usable(ifd, c) for c in cols] + [
        _usable(rifd, "rifd"),
        _usable(files["reso"], "score"),
        _usable(files["rds"], "rds_score"),
    ]


def _top(values: dict[int, float], keys: list[int], rule: tuple, k: int) -> set[int]:
    """The top-k keys among ``keys`` by a (direction, threshold) rule, straight from the
    definition: eligible below the threshold, ordered by value (then the lower index)."""
    top, thr = rule
    eligible = [i for i in keys if thr is None or values[i] < thr]
    eligible.sort(key=lambda i: (-values[i] if top == "high" else values[i], i))
    return set(eligible[:k])


def test_matrices_equal_scipy_and_direct_sets_on_the_matched_rows(files, report) -> None:
    direct = _direct(files)
    mats, tops = report["matrices"], report["top_overlap"]
    assert [m["label"] for m in report["methods"]] == LABELS
    assert [(m["top"], m["threshold"]) for m in report["methods"]] == RULES
    for i, vi in enumerate(direct):
        for j, vj in enumerate(direct):
            keys = sorted(set(vi) & set(vj))  # pairwise-complete rows
            x, y = np.array([vi[k] for k in keys]), np.array([vj[k] for k in keys])
            assert mats["matched"][i][j] == len(keys)
            rho, tau = stats.spearmanr(x, y).statistic, stats.kendalltau(x, y).statistic
            assert mats["spearman"][i][j] == pytest.approx(rho, abs=1e-12), (i, j)
            assert mats["kendall_tau_b"][i][j] == pytest.approx(tau, abs=1e-12), (i, j)
            for t in tops:
                k = math.floor(t["rate"] * len(keys))
                inter = _top(vi, keys, RULES[i], k) & _top(vj, keys, RULES[j], k)
                assert (t["k"][i][j], t["intersection"][i][j]) == (k, len(inter)), (i, j)
                assert t["overlap"][i][j] == pytest.approx(len(inter) / k)
    # The gaps differ per method: e.g. IFD x r-IFD lose rows 0..19 and the 2 bad IFD rows.
    assert mats["matched"][0][3] == N - 20 - 1 and mats["matched"][0][0] == N - 2
    in_all = set(range(20, 220)) & set(range(0, N, 3))  # r-IFD, resonance and RDS rows
    usable_in_all = set.intersection(*(set(v) for v in direct))
    assert report["common"] == {"rows_in_all": len(in_all), "usable_in_all": len(usable_in_all)}
    assert len(usable_in_all) < len(in_all)
    # Opposite directions: IFD (high) and resonance (low) agree as a negative correlation.
    assert mats["spearman"][0][4] < -0.3


def test_diagonal_is_one(report) -> None:
    n = len(LABELS)
    mats = report["matrices"]
    for i in range(n):
        assert mats["spearman"][i][i] == pytest.approx(1.0, abs=1e-12)
        assert mats["kendall_tau_b"][i][i] == pytest.approx(1.0, abs=1e-12)
        for t in report["top_overlap"]:
            assert t["overlap"][i][i] == 1.0
    sym = [mats["spearman"], *(t["overlap"] for t in report["top_overlap"])]
    assert all(np.array_equal(np.array(m), np.array(m).T) for m in sym)


def test_report_and_heatmaps_name_every_method(files, report) -> None:
    out = files["root"] / "report"
    pngs = ["spearman.png", "kendall_tau_b.png", "overlap_top5.png", "overlap_top10.png"]
    pngs.append("overlap_top30.png")
    assert report["plots"] == pngs
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    for label, spec in zip(LABELS, _inputs(files), strict=True):
        assert f"| **{label}** | `{spec}` |" in md
    common = report["common"]["rows_in_all"]
    assert "Pairwise-complete" in md and f"Rows present in all 6 inputs: {common};" in md
    assert "|  | IFD | IFD-loss | IFD-inf | r-IFD | reso | RDS |" in md
    assert all(f"]({name})" in md for name in pngs)
    rho = report["matrices"]["spearman"][0][1]
    assert f"| IFD | 1.000 | {rho:.3f} |" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["matrices"] == report["matrices"] and saved["matching"] == "pairwise-complete"


def test_columns_of_one_file_equal_the_columns_split_into_files(files, report) -> None:
    root, cols = files["root"], files["ifd_cols"]
    names = ["ifd", "ifd_loss_ratio", "ifd_informative"]
    split = []
    for name in names:
        one = {"index": cols["index"], "status": cols["status"], name: cols[name]}
        split.append(f"{write_parquet(root / f'only_{name}.parquet', one)}:{name}")
    config = AnalyzeConfig(out=str(root / "split"), mode="compare", inputs=split, rates=RATES)
    config.labels, config.thresholds = LABELS[:3], THRESHOLDS[:3]
    got = run(config)
    assert [m["column"] for m in got["methods"]] == names
    assert len({m["path"] for m in got["methods"]}) == 3
    for name, m in got["matrices"].items():
        assert m == [row[:3] for row in report["matrices"][name][:3]], name
    for t, want in zip(got["top_overlap"], report["top_overlap"], strict=True):
        assert t["overlap"] == [row[:3] for row in want["overlap"][:3]]


def test_defaults_by_column_and_input_syntax(tmp_path: Path) -> None:
    assert default_rule("ifd_informative") == ("high", 1.0) and default_rule("rifd") == ("low", 1.0)
    assert default_rule("score") == ("low", None) == default_rule("reso/layers.9.up/mean_abs")
    assert default_rule("rds_score") == ("high", None) == default_rule("grad_cosine")
    assert default_rule("n_tokens") is None
    # The pair mode shares them: --threshold auto is 1 for the IFD family, a lone rifd column
    # is the default column.
    assert resolve_threshold("auto", "ifd_loss_ratio") == 1.0 == resolve_threshold("auto", "rifd")
    assert resolve_threshold("auto", "score") is None
    only = write_parquet(
        tmp_path / "r.parquet", {"index": [0, 1], "loss": [1.0, 2.0], "rifd": [0.5, 2.0]}
    )
    assert load(str(only))["column"] == "rifd"
    assert split_input("a:b/scores.parquet:ifd") == ("a:b/scores.parquet", "ifd")
    assert split_input("x.parquet") == ("x.parquet", "")
    odd = tmp_path / "s.parquet:ifd"  # an existing path is a path, whatever it looks like
    odd.write_text("")
    assert split_input(str(odd)) == (str(odd), "")


def test_errors_name_the_input(files) -> None:
    ifd, out = files["ifd"], files["root"] / "never"
    cases = [
        ([f"{ifd}:ifd", f"{ifd}:nope"], {}, r"input 2 \(`.*:nope`\): .*no column `nope`"),
        ([f"{ifd}:ifd", str(out / "x.parquet")], {}, r"input 2 \(`.*x\.parquet`\): .*not exist"),
        ([f"{ifd}:n_tokens_direct", f"{ifd}:ifd"], {}, r"input 1 .*`n_tokens_direct` has no def"),
        ([f"{ifd}:ifd", f"{ifd}:rifd"], {}, r"input 2 .*no column `rifd`"),
        ([f"{ifd}:ifd", f"{files['reso']}"], {"labels": ["a"]}, r"--labels has 1 items for 2"),
        ([f"{ifd}:ifd", f"{ifd}:ifd"], {"labels": ["a", "a"]}, r"--labels must be distinct"),
        ([f"{ifd}:ifd", f"{ifd}:ifd"], {"thresholds": ["auto", "x"]}, r"input 2 .*threshold 'x'"),
        ([f"{ifd}:ifd", f"{ifd}:ifd"], {"directions": ["up", "auto"]}, r"input 1 .*high, low"),
        ([f"{ifd}:ifd"], {}, r"at least 2 --inputs"),
    ]
    for inputs, extra, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(AnalyzeConfig(out=str(out), mode="compare", inputs=inputs, **extra))
    with pytest.raises(ValueError, match="takes --inputs"):
        run(AnalyzeConfig(out=str(out), mode="compare", a=str(ifd), inputs=[str(ifd)] * 2))
    with pytest.raises(ValueError, match="--inputs is for --mode compare"):
        run(AnalyzeConfig(out=str(out), a=str(ifd), inputs=[str(ifd)] * 2))
    assert not out.exists()  # errors come before anything is written


def test_cli_compare(files) -> None:
    out = files["root"] / "cli"
    odd = files["root"] / "a,b.parquet"  # a comma in a path: quote the whole item
    odd.write_bytes(files["ifd"].read_bytes())
    inputs = f'"{odd}:ifd_loss_ratio",{files["ifd"]},{files["reso"]}'
    cmd = [sys.executable, "-m", "resofilter_jax.analyze", "--mode=compare", f"--out={out}"]
    cmd += [f"--inputs={inputs}", "--thresholds=none,auto,auto", "--rates=0.1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads((out / "report.json").read_text())
    labels = [m["label"] for m in printed["methods"]]
    assert labels == ["ifd_loss_ratio", "ifd", "score"]  # distinct columns: labelled by them
    assert [m["threshold"] for m in printed["methods"]] == [None, 1.0, None]
    assert printed["plots"][-1] == "overlap_top10.png"


def test_reads_each_needed_column_of_a_file_once(files, monkeypatch) -> None:
    asked: list[str] = []
    read = pq.ParquetFile.read

    def spy_read(self, columns=None, *args, **kw):
        asked.extend(columns if columns is not None else ["<all>"])
        return read(self, columns, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
    ifd, out = files["ifd"], files["root"] / "reads"
    inputs = [f"{ifd}:ifd_loss_ratio", f"{ifd}:ifd", f"{ifd}:ifd_loss_ratio"]
    run(AnalyzeConfig(out=str(out), mode="compare", inputs=inputs, rates=[0.5]))
    assert sorted(asked) == ["ifd", "ifd_loss_ratio", "index", "status"]

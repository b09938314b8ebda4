"""Compare the scores of two scoring runs (e.g. a weak and a strong model) on the same data.

    python -m resofilter_jax.analyze --a weak/scores.parquet --b strong/scores.parquet \
        --out report_dir [--column ifd] [--label_a gpt2 --label_b smollm2]

Rows are matched by (``index``, ``turn``), turn 0 when a file has none; a row counts only
when its status is ``ok`` and its score is finite in BOTH files. Reported: Spearman rho and
Kendall tau-b (numpy, O(n log n) and O(n log^2 n)), Pearson r, the overlap of the top 5/10/15%
sets (k = floor(rate x matched rows); ``--top high`` with ``--threshold 1`` is the policy of
:func:`resofilter_jax.select.superfiltering_select`), per-file summary statistics,
``hist.png``, ``scatter.png`` (subsampled above ``--max_scatter_points``), ``report.md`` and
``report.json``. Without ``--b`` only the summary and the histogram are written.

``--mode`` picks the analysis (:data:`MODES`). ``gradient_cosine`` compares projected
gradients (a resonance run with ``--config.features.projection_dim=K``)::

    python -m resofilter_jax.analyze --mode gradient_cosine --a OUTPUT_DIR \
        --target TARGET_OUTPUT_DIR --out report_dir     # or --target rows:0:100,250

and writes ``cosine.parquet`` (``index``, ``turn`` when used, ``status``, ``cosine``: each row's
cosine with the mean of the target's normalised gradients, as LESS does), ``report.json`` and
``report.md``. The target is another run's projections (same model, parameters, K and seed,
else an error) or ``rows:SPEC``, rows of A by ``index`` (half-open ranges ``a:b`` and numbers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from resofilter_jax.rank_stats import (  # noqa: F401 - re-exported for callers and tests
    count_inversions,
    kendall_tau_b,
    pearson,
    rankdata,
    spearman,
)
from resofilter_jax.scoring.outputs import status_counts, write_json
from resofilter_jax.select import read_scores, superfiltering_select

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclasses.dataclass
class AnalyzeConfig:
    """What to compare and where to write the report."""

    a: str
    out: str
    b: str = ""  # "" = summarise `a` alone
    column: str = ""  # "" = `ifd` if present, else `score`
    label_a: str = ""  # "" = "A"
    label_b: str = ""  # "" = "B"
    threshold: float | str | None = "auto"  # "auto" = 1.0 for ifd, none otherwise
    top: str = "high"  # high | low: which end of the order is "the top k%"
    rates: Sequence[float] = (0.05, 0.10, 0.15)
    max_scatter_points: int = 20_000  # larger inputs are subsampled (deterministically)
    scale: str = "auto"  # auto | linear | log (axes of the plots)
    seed: int = 0
    bins: int = 60
    mode: str = "scores"
    target: str = ""  # gradient_cosine: a projection dir or rows:SPEC


def top_set(values: np.ndarray, *, rate: float, threshold: float | None, top: str) -> np.ndarray:
    """Positions of the top k = floor(rate x n) rows among those below ``threshold``.

    ``top == "high"`` is Superfiltering's order (delegated to ``superfiltering_select``);
    ``"low"`` orders ascending. Ties: lower position first.
    """
    thr = math.inf if threshold is None else threshold
    if top == "high":
        return superfiltering_select(values, rate=rate, threshold=thr)
    if top != "low":
        raise ValueError(f"top must be 'high' or 'low', got {top!r}")
    values = np.asarray(values, np.float64)
    k = math.floor(rate * len(values))
    eligible = np.nonzero(np.isfinite(values) & (values < thr))[0]
    return eligible[np.lexsort((eligible, values[eligible]))][:k]


def overlap(
    a: np.ndarray, b: np.ndarray, *, rates: Sequence[float], threshold: float | None, top: str
) -> list[dict[str, Any]]:
    """Per rate: k, the set sizes, |A∩B|, |A∩B|/k and Jaccard |A∩B|/|A∪B|."""
    rows = []
    for rate in rates:
        sa = set(top_set(a, rate=rate, threshold=threshold, top=top).tolist())
        sb = set(top_set(b, rate=rate, threshold=threshold, top=top).tolist())
        k, inter, union = math.floor(rate * len(a)), len(sa & sb), len(sa | sb)
        row = {"rate": rate, "k": k, "size_a": len(sa), "size_b": len(sb), "intersection": inter}
        row["overlap"] = inter / k if k else math.nan
        row["jaccard"] = inter / union if union else math.nan
        rows.append(row)
    return rows


def _resolve_path(path: str) -> Path:
    """A score file, or a run directory holding ``scores.parquet`` / ``scores.jsonl``."""
    p = Path(path)
    if p.is_dir():
        for name in ("scores.parquet", "scores.jsonl"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} holds neither scores.parquet nor scores.jsonl")
    if not p.is_file():
        raise FileNotFoundError(f"score file {p} does not exist")
    return p


def _floats(col: np.ndarray) -> np.ndarray:
    """[n] float64, None / non-numbers -> NaN."""
    col = np.asarray(col)
    if col.dtype.kind in "fiub":
        return col.astype(np.float64)
    out = np.full(len(col), np.nan)
    for i, v in enumerate(col):
        if isinstance(v, int | float | np.number) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _ints(col: np.ndarray, name: str, path: Path) -> np.ndarray:
    """[n] int64; raises on missing values."""
    f = _floats(col)
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{path}: column `{name}` has missing values")
    return f.astype(np.int64)


def load(path: str, column: str = "") -> dict[str, Any]:
    """Reads one score file: keys (``index``, ``turn`` or 0), statuses and the score column.

    Raises:
        ValueError: If ``index`` or the column is missing (the message names the columns).
    """
    p = _resolve_path(path)
    cols = read_scores(p)
    available = ", ".join(cols) or "(none)"
    if "index" not in cols:
        raise ValueError(f"{p} has no `index` column; columns: {available}")
    column = column or ("ifd" if "ifd" in cols else "score")
    if column not in cols:
        raise ValueError(f"{p} has no column `{column}`; available columns: {available}")
    n = len(cols["index"])
    status = cols["status"].astype(str) if "status" in cols else np.full(n, "ok")
    return {
        "path": str(p),
        "column": column,
        "index": _ints(cols["index"], "index", p),
        "turn": _ints(cols["turn"], "turn", p) if "turn" in cols else np.zeros(n, np.int64),
        "status": np.asarray(status, dtype=object),
        "values": _floats(cols[column]),
    }


def _keys(d: dict[str, Any], lo: int, span: int) -> np.ndarray:
    """[n] int64 keys index * span + (turn - lo); raises when two rows share one."""
    keys = d["index"] * span + (d["turn"] - lo)
    uniq, counts = np.unique(keys, return_counts=True)
    if np.any(counts > 1):
        dup = int(uniq[np.argmax(counts > 1)])
        where = f"index {dup // span}, turn {dup % span + lo}"
        raise ValueError(f"{d['path']}: several rows have the same key ({where})")
    return keys


def usable(d: dict[str, Any]) -> np.ndarray:
    """[n] bool: status ok and a finite score."""
    return (d["status"] == "ok") & np.isfinite(d["values"])


def match(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Pairs the rows of two loaded files by (index, turn); counts what was excluded and why.

    Raises:
        ValueError: If no key is in both files, or no common row is usable in both.
    """
    turns = np.concatenate([a["turn"], b["turn"]])
    lo, span = int(turns.min(initial=0)), int(turns.max(initial=0) - turns.min(initial=0)) + 1
    ka, kb = _keys(a, lo, span), _keys(b, lo, span)
    common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    if len(common) == 0:
        raise ValueError(
            f"{a['path']} ({len(ka)} rows) and {b['path']} ({len(kb)} rows) have no rows in "
            "common (rows are matched by `index` and `turn`): are they scores of the same data?"
        )
    sa, sb = a["status"][ia] != "ok", b["status"][ib] != "ok"
    fa, fb = ~sa & ~np.isfinite(a["values"][ia]), ~sb & ~np.isfinite(b["values"][ib])
    keep = ~(sa | sb | fa | fb)
    counts = {
        "rows_a": len(ka),
        "rows_b": len(kb),
        "common": len(common),
        "only_in_a": len(ka) - len(common),
        "only_in_b": len(kb) - len(common),
        "status_not_ok_a": int(sa.sum()),
        "status_not_ok_b": int(sb.sum()),
        "ok_but_not_finite_a": int(fa.sum()),
        "ok_but_not_finite_b": int(fb.sum()),
        "excluded_common": int((~keep).sum()),
        "matched": int(keep.sum()),
    }
    if not keep.any():
        raise ValueError(
            f"{a['path']} and {b['path']} have {len(common)} rows in common but none is ok "
            f"with a finite `{a['column']}` in both: {counts}"
        )
    return {"a": a["values"][ia][keep], "b": b["values"][ib][keep], "counts": counts}


def summary(d: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    """Count, mean, std, quantiles and fraction below the threshold of one file's usable rows."""
    v = d["values"][usable(d)]
    out: dict[str, Any] = {"rows": len(d["values"]), "count": len(v)}
    out["statuses"] = status_counts(d["status"]) if len(d["status"]) else {}
    if len(v):
        out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()))
        out.update({f"q{100 * q:g}": float(np.quantile(v, q)) for q in QUANTILES})
        out["max"] = float(v.max())
    if threshold is not None:
        out["threshold"] = threshold
        out["frac_below_threshold"] = float(np.mean(v < threshold)) if len(v) else math.nan
    return out


def _log_scale(values: Sequence[np.ndarray], scale: str) -> bool:
    if scale != "auto":
        return scale == "log"
    allv = np.concatenate([np.asarray(v) for v in values])
    return bool(len(allv) and allv.min() > 0 and allv.max() / allv.min() > 10)


def _log_axis(axis: Any) -> None:
    """Log ticks at 1, 2, 5 x 10^k, labelled as plain numbers (no mathtext)."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_hist(
    series: Sequence[tuple[str, np.ndarray]],
    path: Path,
    *,
    xlabel: str,
    threshold: float | None,
    scale: str,
    bins: int,
) -> None:
    """Overlaid histograms on shared bins (counts via numpy: fast for millions of rows)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    log = _log_scale([v for _, v in series], scale)
    allv = np.concatenate([v for _, v in series])
    lo, hi = (np.quantile(allv, [0.001, 0.999]) if len(allv) else (0.0, 1.0)).tolist()
    hi = hi if hi > lo else lo + 1.0
    edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
    fig = Figure(figsize=(7, 4.5))
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.96)  # cheaper than tight_layout
    ax = fig.add_subplot()
    for label, v in series:
        counts, _ = np.histogram(v, bins=edges)  # values outside [lo, hi] are not drawn
        outside = f", {len(v) - counts.sum()} outside" if counts.sum() < len(v) else ""
        ax.stairs(counts, edges, fill=True, alpha=0.45, label=f"{label} (n={len(v)}{outside})")
    if threshold is not None and lo <= threshold <= hi:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    if log:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
    ax.set(xlabel=f"{xlabel} (0.1-99.9% quantile range of all rows)", ylabel="rows")
    ax.legend()
    fig.savefig(path, dpi=110)


def plot_scatter(
    a: np.ndarray,
    b: np.ndarray,
    path: Path,
    *,
    labels: tuple[str, str],
    threshold: float | None,
    scale: str,
) -> None:
    """A-vs-B scatter with the y = x line (and threshold lines)."""
    from matplotlib.figure import Figure

    log = _log_scale([a, b], scale)
    fig = Figure(figsize=(6, 6))
    fig.subplots_adjust(left=0.13, right=0.96, bottom=0.1, top=0.96)
    ax = fig.add_subplot()
    ax.scatter(a, b, s=3, alpha=0.35, lw=0, rasterized=True)
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=1, label="y = x")
    if threshold is not None and lo <= threshold <= hi:
        ax.axvline(threshold, color="r", ls=":", lw=1)
        ax.axhline(threshold, color="r", ls=":", lw=1, label=f"threshold {threshold:g}")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_axis(ax.xaxis)
        _log_axis(ax.yaxis)
    ax.set(xlabel=labels[0], ylabel=labels[1])
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=110)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(x) for x in r) + " |" for r in rows]


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report of a ``report.json`` dict."""
    files, col, thr = report["files"], report["column"], report["threshold"]
    lines = [f"# Score analysis: `{col}`", ""]
    lines += [f"- {f['label']}: `{f['path']}`" for f in files]
    if "counts" in report:
        c, m = report["counts"], report["metrics"]
        end = "highest" if report["top"] == "high" else "lowest"
        elig = f"rows with {col} < {thr:g}" if thr is not None else "all matched rows"
        lines += ["", "## Matching", "", "Rows are matched by `index` and `turn` (0 if absent)."]
        lines += ["A row counts when its status is `ok` and its score finite in both files.", ""]
        lines += _table(["rows", "count"], list(c.items()))
        lines += ["", "## Agreement", "", f"On the {c['matched']} matched rows.", ""]
        names = ("spearman", "kendall_tau_b", "pearson")
        lines += _table(["metric", "value"], [(k, m[k]) for k in names])
        lines += ["", "### Top-set overlap", ""]
        lines += [f"Top set: the k {end} scores among {elig}; k = floor(rate × matched rows)."]
        lines += ["Overlap = size(A ∩ B) / k; Jaccard = size(A ∩ B) / size(A ∪ B).", ""]
        head = ["rate", "k", "size A", "size B", "A ∩ B", "overlap", "Jaccard"]
        keys = ("rate", "k", "size_a", "size_b", "intersection", "overlap", "jaccard")
        lines += _table(head, [[o[k] for k in keys] for o in m["top_overlap"]])
    stats = [k for k in files[0]["summary"] if k not in ("statuses", "threshold")]
    lines += ["", "## Summary per file", ""]
    lines += ["`rows`: all rows; `count` and the statistics: rows ok with a finite score.", ""]
    rows = [(k, *(f["summary"].get(k, "") for f in files)) for k in stats]
    lines += _table(["stat", *(f["label"] for f in files)], rows)
    if thr is not None:
        lines += ["", f"`frac_below_threshold`: fraction with {col} < {thr:g}."]
    lines += [""] + [
        f"- statuses in {f['label']}: `{json.dumps(f['summary']['statuses'])}`" for f in files
    ]
    lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in report["plots"])]
    lines += ["", *(f"- {note}" for note in report["notes"])] if report["notes"] else []
    return "\n".join(lines) + "\n"


def resolve_threshold(threshold: float | str | None, column: str) -> float | None:
    """``"auto"`` -> 1.0 for ``ifd`` else None; ``"none"`` / ``""`` / None -> None."""
    if isinstance(threshold, str):
        t = threshold.strip().lower()
        if t == "auto":
            return 1.0 if column == "ifd" else None
        return None if t in ("", "none") else float(t)
    return None if threshold is None else float(threshold)


def run_scores(config: AnalyzeConfig) -> dict[str, Any]:
    """The ``scores`` mode: agreement of two score files (or the summary of one)."""
    if config.top not in ("high", "low"):
        raise ValueError(f"top must be 'high' or 'low', got {config.top!r}")
    a = load(config.a, config.column)
    b = load(config.b, config.column or a["column"]) if config.b else None
    m = match(a, b) if b is not None else None  # errors before anything is written
    column = a["column"]
    threshold = resolve_threshold(config.threshold, column)
    labels = (config.label_a or "A", config.label_b or "B")
    loaded = [a] if b is None else [a, b]
    files = [
        {"label": lab, "path": d["path"], "summary": summary(d, threshold)}
        for lab, d in zip(labels, loaded, strict=False)
    ]
    report: dict[str, Any] = {"mode": "scores", "column": column, "threshold": threshold}
    report.update(top=config.top, files=files, plots=["hist.png"], notes=[])
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    series = [(f["label"], d["values"][usable(d)]) for f, d in zip(files, loaded, strict=True)]
    plot_args = {"threshold": threshold, "scale": config.scale}
    plot_hist(series, out / "hist.png", xlabel=column, bins=config.bins, **plot_args)
    if m is not None:
        x, y = m["a"], m["b"]
        report["counts"] = m["counts"]
        top = overlap(x, y, rates=config.rates, threshold=threshold, top=config.top)
        report["metrics"] = {
            "spearman": spearman(x, y),
            "kendall_tau_b": kendall_tau_b(x, y),
            "pearson": pearson(x, y),
            "top_overlap": top,
        }
        short = [o for o in top if min(o["size_a"], o["size_b"]) < o["k"]]
        if short:
            report["notes"].append(
                f"at rates {[o['rate'] for o in short]} fewer than k matched rows are eligible "
                f"({column} < {threshold}): the top sets are smaller than k"
            )
        if len(x) > config.max_scatter_points:
            rng = np.random.default_rng(config.seed)
            pick = np.sort(rng.choice(len(x), config.max_scatter_points, replace=False))
            x, y = x[pick], y[pick]
            report["notes"].append(
                f"scatter.png shows a uniform random subsample of {len(pick)} of "
                f"{m['counts']['matched']} matched rows (seed {config.seed}); "
                "all metrics use every matched row"
            )
        names = (f"{labels[0]} {column}", f"{labels[1]} {column}")
        plot_scatter(x, y, out / "scatter.png", labels=names, **plot_args)
        report["plots"].append("scatter.png")
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    report["outputs"] = {n: str(out / n) for n in ("report.md", "report.json", *report["plots"])}
    return report


def run_gradient_cosine(config: AnalyzeConfig) -> dict[str, Any]:
    """The ``gradient_cosine`` mode: A's projected gradients vs a target set's mean (LESS)."""
    if not config.target:
        raise ValueError("mode gradient_cosine needs --target (a projection dir or rows:SPEC)")
    from resofilter_jax.scoring import projection  # imports jax: only for this mode

    res = projection.gradient_cosine(config.a, config.target)  # errors before any write
    cols, info = res["columns"], res["info"]
    cos = cols["cosine"]
    ok = np.isfinite(cos)
    d = {"path": info["a"], "status": cols["status"], "values": cos}
    report: dict[str, Any] = {"mode": "gradient_cosine", **info, "summary": summary(d, None)}
    order = np.lexsort((np.nonzero(ok)[0], -cos[ok]))  # highest first, ties by row
    rows = np.nonzero(ok)[0][order[:10]]
    report["top"] = [
        {"index": int(cols["index"][i]), "turn": int(cols["turn"][i]), "cosine": float(cos[i])}
        for i in rows
    ]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    projection.write_cosine(out / "cosine.parquet", cols)
    write_json(out / "report.json", report)
    p = report["projection"]
    lines = ["# Gradient cosine to a target set", "", f"- A: `{info['a']}`"]
    lines += [f"- target: `{json.dumps(info['target'])}`"]
    lines += [f"- projection: K={p['dim']}, seed {p['seed']}, {p['kind']}, D={p['grad_dim']}"]
    lines += [f"- parameters: {', '.join(f'`{n}`' for n in info['params'])}", ""]
    lines += ["Cosine of each row's projected gradient with the mean of the target's normalised"]
    lines += ["projected gradients; rows without a gradient get NaN (status kept).", ""]
    stats = [k for k in report["summary"] if k not in ("statuses", "threshold")]
    lines += _table(["stat", "cosine"], [(k, report["summary"][k]) for k in stats])
    lines += ["", "Highest:", ""]
    lines += _table(["index", "turn", "cosine"], [list(t.values()) for t in report["top"]])
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report["outputs"] = {n: str(out / n) for n in ("cosine.parquet", "report.md", "report.json")}
    return report


MODES: dict[str, Callable[[AnalyzeConfig], dict[str, Any]]] = {
    "scores": run_scores,
    "gradient_cosine": run_gradient_cosine,
}


def run(config: AnalyzeConfig) -> dict[str, Any]:
    """Runs the analysis named by ``config.mode``; returns the report (as in report.json)."""
    if config.mode not in MODES:
        raise ValueError(f"unknown mode {config.mode!r}; available: {', '.join(MODES)}")
    return MODES[config.mode](config)


def define_flags() -> None:
    """Defines the flags; only when run as a program (``select`` also owns ``--threshold``)."""
    flags.DEFINE_string("a", None, "score file (or run directory) A, e.g. the weak model's")
    flags.DEFINE_string("b", "", "score file B; omit to summarise A alone")
    flags.DEFINE_string("out", None, "report directory")
    flags.DEFINE_string("column", "", "score column (default: ifd if present, else score)")
    flags.DEFINE_string("label_a", "", "name of A in the report")
    flags.DEFINE_string("label_b", "", "name of B in the report")
    thr_help = "top sets only among scores < this: a number, none, or auto (ifd: 1, else none)"
    flags.DEFINE_string("threshold", "auto", thr_help, allow_override=True)
    flags.DEFINE_enum("top", "high", ["high", "low"], "which end of the order is the top k%")
    flags.DEFINE_list("rates", ["0.05", "0.1", "0.15"], "top-set rates")
    flags.DEFINE_integer("max_scatter_points", 20_000, "scatter subsample size")
    flags.DEFINE_enum("scale", "auto", ["auto", "linear", "log"], "plot axes")
    flags.DEFINE_integer("seed", 0, "seed of the scatter subsample")
    flags.DEFINE_integer("bins", 60, "histogram bins")
    flags.DEFINE_enum("mode", "scores", list(MODES), "analysis to run")
    flags.DEFINE_string("target", "", "gradient_cosine: a projection dir, or rows:SPEC of A")
    flags.mark_flags_as_required(["a", "out"])


def main(argv: list[str]) -> None:
    del argv
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(AnalyzeConfig)}
    values["rates"] = [float(r) for r in values["rates"]]
    report = run(AnalyzeConfig(**values))
    print(Path(report["outputs"]["report.json"]).read_text(), file=sys.stdout)


if __name__ == "__main__":
    define_flags()
    app.run(main)

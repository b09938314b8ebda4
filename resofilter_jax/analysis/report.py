"""Score reports: load score files, match their rows, compare pairs, plot and render.

Rows are matched by (``index``, ``turn``), turn 0 when a file has none; a row counts only
when its status is ``ok`` and its score is finite in BOTH files. The top sets follow
:func:`resofilter_jax.selection.policies.superfiltering_select` (``top="high"``). The pair
mode (``analysis.pipeline.run_scores``) and the N-method comparison
(:mod:`resofilter_jax.analysis.compare`) share :func:`load_columns`, :func:`match` and
:func:`agreement`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.analysis.rank_stats import kendall_tau_b, pearson, spearman
from resofilter_jax.selection.policies import first_k, superfiltering_select
from resofilter_jax.selection.score_file import ScoreFile, Statuses, status_summary

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# The IFD family: Superfiltering's policy keeps values below 1 (``--threshold auto``).
THRESHOLD_ONE = ("ifd", "ifd_loss_ratio", "ifd_informative", "rifd", "rifd_loss_ratio")
# A file's score column when none is named: the first of these it has (else ``score``).
DEFAULT_COLUMNS = ("ifd", "rifd", "score", "rds_score", "cosine")


def _ranking(values: np.ndarray, threshold: float | None, top: str, k: int | None) -> np.ndarray:
    """The first ``k`` (None: all) rows below ``threshold`` in top-set order: ``high`` is
    Superfiltering's (value descending), ``low`` ascending; ties: lower position first."""
    if top not in ("high", "low"):
        raise ValueError(f"top must be 'high' or 'low', got {top!r}")
    thr = math.inf if threshold is None else threshold
    values = np.asarray(values, np.float64)
    eligible = np.nonzero(np.isfinite(values) & (values < thr))[0]  # [m] ascending
    keys = -values[eligible] if top == "high" else values[eligible]
    return first_k(keys, eligible, k)


def top_set(values: np.ndarray, *, rate: float, threshold: float | None, top: str) -> np.ndarray:
    """Positions of the top k = floor(rate x n) rows among those below ``threshold``.

    ``top == "high"`` is Superfiltering's order (delegated to ``superfiltering_select``);
    ``"low"`` orders ascending. Ties: lower position first.
    """
    if top == "high":
        thr = math.inf if threshold is None else threshold
        return superfiltering_select(values, rate=rate, threshold=thr)
    return _ranking(values, threshold, top, math.floor(rate * len(values)))


def overlap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    rates: Sequence[float],
    threshold: float | None,
    top: str,
    rule_b: tuple[float | None, str] | None = None,
) -> list[dict[str, Any]]:
    """Per rate: k, the set sizes, |A∩B|, |A∩B|/k and Jaccard |A∩B|/|A∪B|.

    ``threshold`` and ``top`` rank A, and B too unless ``rule_b`` = (threshold, top) gives
    B its own. Each input is ranked once; the top set of a rate is the first k of that ranking.
    """
    thr_b, top_b = rule_b if rule_b is not None else (threshold, top)
    sizes = [math.floor(r * n) for r in rates for n in (len(a), len(b))]
    most = max(sizes, default=0) if min(sizes, default=0) >= 0 else None  # None: all
    rank_a, rank_b = _ranking(a, threshold, top, most), _ranking(b, thr_b, top_b, most)
    rows = []
    for rate in rates:
        k = math.floor(rate * len(a))
        sa, sb = rank_a[:k], rank_b[: math.floor(rate * len(b))]
        inter = len(np.intersect1d(sa, sb, assume_unique=True))
        union = len(sa) + len(sb) - inter
        row = {"rate": rate, "k": k, "size_a": len(sa), "size_b": len(sb), "intersection": inter}
        row["overlap"] = inter / k if k else math.nan
        row["jaccard"] = inter / union if union else math.nan
        rows.append(row)
    return rows


def agreement(
    x: np.ndarray,
    y: np.ndarray,
    *,
    rates: Sequence[float],
    threshold: float | None,
    top: str,
    rule_b: tuple[float | None, str] | None = None,
) -> dict[str, Any]:
    """Spearman rho, Kendall tau-b, Pearson r and the top-set :func:`overlap` of two [n]
    matched score vectors (``rule_b``: y's own (threshold, top), as in :func:`overlap`)."""
    return {
        "spearman": spearman(x, y),
        "kendall_tau_b": kendall_tau_b(x, y),
        "pearson": pearson(x, y),
        "top_overlap": overlap(x, y, rates=rates, threshold=threshold, top=top, rule_b=rule_b),
    }


def resolve_path(path: str) -> Path:
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
        return col.astype(np.float64, copy=False)
    out = np.full(len(col), np.nan)
    for i, v in enumerate(col):
        if isinstance(v, int | float | np.number) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _ints(col: np.ndarray, name: str, path: Path) -> np.ndarray:
    """[n] int64; raises on missing values."""
    if col.dtype.kind in "iu":
        return col.astype(np.int64, copy=False)
    f = _floats(col)
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{path}: column `{name}` has missing values")
    return f.astype(np.int64)


class MissingColumn(ValueError):
    """A score file lacks a requested column (``column``)."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column


def load_columns(path: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Reads the columns of one score file it needs: ``index``, ``turn`` (or 0), ``status``
    (as an ok mask and counts) once, and each score column; one dict per column (``""``: the
    first of :data:`DEFAULT_COLUMNS` the file has), sharing the key and status arrays.

    Raises:
        ValueError: If ``index`` is missing; :class:`MissingColumn` if a score column is (the
            messages name the file's columns).
    """
    p = resolve_path(path)
    scores = ScoreFile(p)
    available = ", ".join(scores.names) or "(none)"
    if "index" not in scores:
        raise ValueError(f"{p} has no `index` column; columns: {available}")
    default = next((c for c in DEFAULT_COLUMNS if c in scores), "score")
    columns = [c or default for c in columns]
    for column in columns:
        if column not in scores:
            message = f"{p} has no column `{column}`; available columns: {available}"
            raise MissingColumn(column, message)
    n = scores.num_rows
    turn = _ints(scores.column("turn"), "turn", p) if "turn" in scores else np.zeros(n, np.int64)
    status = scores.statuses()
    base = {"path": str(p), "index": _ints(scores.column("index"), "index", p), "turn": turn}
    base.update(ok=status.ok, statuses=status.counts)
    values: dict[str, np.ndarray] = {}  # each column read once
    for column in columns:
        if column not in values:
            values[column] = _floats(scores.column(column))
    return [{**base, "column": c, "values": values[c]} for c in columns]


def load(path: str, column: str = "") -> dict[str, Any]:
    """:func:`load_columns` of one column (``""``: the file's default score column)."""
    return load_columns(path, [column])[0]


def _statuses(d: dict[str, Any]) -> Statuses:
    """The ok mask and counts of a loaded file, or of a dict with a raw ``status`` array."""
    if "ok" in d:
        return Statuses(d["ok"], d["statuses"])
    return status_summary(np.asarray(d["status"], dtype=object), len(d["status"]))


def _keys(d: dict[str, Any], lo: int, span: int) -> tuple[np.ndarray, bool]:
    """[n] int64 keys index * span + (turn - lo) and whether they ascend; raises when two rows
    share one."""
    if span == 1 and lo == 0:
        keys = d["index"]  # every turn is 0: the index is the key
    else:
        keys = d["index"] * span
        keys += d["turn"]
        keys -= lo
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return keys, True  # strictly ascending (files in input order): no sort needed
    uniq, counts = np.unique(keys, return_counts=True)
    if np.any(counts > 1):
        dup = int(uniq[np.argmax(counts > 1)])
        where = f"index {dup // span}, turn {dup % span + lo}"
        raise ValueError(f"{d['path']}: several rows have the same key ({where})")
    return keys, False


def _intersect(ka: np.ndarray, kb: np.ndarray, ascending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``ka`` and ``kb`` of their common keys, by key, as ``np.intersect1d(ka, kb,
    assume_unique=True, return_indices=True)`` gives them."""
    if not ascending:
        return np.intersect1d(ka, kb, assume_unique=True, return_indices=True)[1:]
    if not len(kb):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    at = np.searchsorted(kb, ka)  # [len(ka)]
    np.minimum(at, len(kb) - 1, out=at)
    ia = np.flatnonzero(kb[at] == ka)
    return ia, at[ia]


def usable(d: dict[str, Any]) -> np.ndarray:
    """[n] bool: status ok and a finite score."""
    return _statuses(d).ok & np.isfinite(d["values"])


def match(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Pairs the rows of two loaded files by (index, turn); counts what was excluded and why.

    Raises:
        ValueError: If no key is in both files, or no common row is usable in both.
    """
    lo = min(int(a["turn"].min(initial=0)), int(b["turn"].min(initial=0)))
    span = max(int(a["turn"].max(initial=0)), int(b["turn"].max(initial=0))) - lo + 1
    (ka, up_a), (kb, up_b) = _keys(a, lo, span), _keys(b, lo, span)
    ia, ib = _intersect(ka, kb, up_a and up_b)
    if len(ia) == 0:
        raise ValueError(
            f"{a['path']} ({len(ka)} rows) and {b['path']} ({len(kb)} rows) have no rows in "
            "common (rows are matched by `index` and `turn`): are they scores of the same data?"
        )
    sa, sb = ~_statuses(a).ok[ia], ~_statuses(b).ok[ib]
    fa, fb = ~sa & ~np.isfinite(a["values"][ia]), ~sb & ~np.isfinite(b["values"][ib])
    keep = ~(sa | sb | fa | fb)
    counts = {
        "rows_a": len(ka),
        "rows_b": len(kb),
        "common": len(ia),
        "only_in_a": len(ka) - len(ia),
        "only_in_b": len(kb) - len(ia),
        "status_not_ok_a": int(sa.sum()),
        "status_not_ok_b": int(sb.sum()),
        "ok_but_not_finite_a": int(fa.sum()),
        "ok_but_not_finite_b": int(fb.sum()),
        "excluded_common": int((~keep).sum()),
        "matched": int(keep.sum()),
    }
    if not keep.any():
        raise ValueError(
            f"{a['path']} and {b['path']} have {len(ia)} rows in common but none is ok "
            f"with a finite `{a['column']}` in both: {counts}"
        )
    return {"a": a["values"][ia][keep], "b": b["values"][ib][keep], "counts": counts}


def common_rows(ds: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Keys (index, turn) present in every loaded input, and those usable (:func:`usable`)
    in every one. Inputs that share one file's key arrays are keyed once."""
    lo = min(int(d["turn"].min(initial=0)) for d in ds)
    span = max(int(d["turn"].max(initial=0)) for d in ds) - lo + 1
    keys: dict[int, np.ndarray] = {}  # id of an index array -> its [n] keys
    every, ok_every = None, None
    for d in ds:
        if id(d["index"]) not in keys:
            keys[id(d["index"])] = _keys(d, lo, span)[0]
            k = keys[id(d["index"])]
            every = k if every is None else np.intersect1d(every, k, assume_unique=True)
        k_ok = keys[id(d["index"])][usable(d)]
        ok_every = k_ok if ok_every is None else np.intersect1d(ok_every, k_ok, assume_unique=True)
    return {
        "rows_in_all": len(every) if every is not None else 0,
        "usable_in_all": len(ok_every) if ok_every is not None else 0,
    }


def summary(d: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    """Count, mean, std, quantiles and fraction below the threshold of one file's usable rows."""
    status = _statuses(d)
    v = d["values"][status.ok & np.isfinite(d["values"])]
    out: dict[str, Any] = {"rows": len(d["values"]), "count": len(v)}
    out["statuses"] = status.counts if len(d["values"]) else {}
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
    arrays = [np.asarray(v) for v in values if len(v)]  # no concatenated copy
    if not arrays:
        return False
    lo, hi = min(a.min() for a in arrays), max(a.max() for a in arrays)
    return bool(lo > 0 and hi / lo > 10)


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
    # allv is a fresh concatenation: partition it in place (same quantiles, no copy)
    lo, hi = (
        np.quantile(allv, [0.001, 0.999], overwrite_input=True) if len(allv) else (0.0, 1.0)
    ).tolist()
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


def plot_heatmap(
    matrix: np.ndarray,
    labels: Sequence[str],
    path: Path,
    *,
    title: str,
    vmin: float,
    vmax: float,
    cmap: str,
) -> None:
    """An annotated [N, N] heatmap (NaN cells blank, labelled ``nan``)."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, np.float64)  # [N, N]
    side = 1.6 + 0.9 * len(labels)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, cmap=cmap)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=35, ha="right")
    ax.set_yticks(ticks, labels)
    for (i, j), v in np.ndenumerate(m):
        r, g, b, _ = image.cmap(image.norm(v)) if math.isfinite(v) else (1, 1, 1, 1)
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
        text = "nan" if math.isnan(v) else f"{v:.2f}"
        ax.text(j, i, text, ha="center", va="center", color="w" if dark else "k", fontsize=9)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table (floats to 6 significant digits)."""
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
        lines += markdown_table(["rows", "count"], list(c.items()))
        lines += ["", "## Agreement", "", f"On the {c['matched']} matched rows.", ""]
        names = ("spearman", "kendall_tau_b", "pearson")
        lines += markdown_table(["metric", "value"], [(k, m[k]) for k in names])
        lines += ["", "### Top-set overlap", ""]
        lines += [f"Top set: the k {end} scores among {elig}; k = floor(rate × matched rows)."]
        lines += ["Overlap = size(A ∩ B) / k; Jaccard = size(A ∩ B) / size(A ∪ B).", ""]
        head = ["rate", "k", "size A", "size B", "A ∩ B", "overlap", "Jaccard"]
        keys = ("rate", "k", "size_a", "size_b", "intersection", "overlap", "jaccard")
        lines += markdown_table(head, [[o[k] for k in keys] for o in m["top_overlap"]])
    stats = [k for k in files[0]["summary"] if k not in ("statuses", "threshold")]
    lines += ["", "## Summary per file", ""]
    lines += ["`rows`: all rows; `count` and the statistics: rows ok with a finite score.", ""]
    rows = [(k, *(f["summary"].get(k, "") for f in files)) for k in stats]
    lines += markdown_table(["stat", *(f["label"] for f in files)], rows)
    if thr is not None:
        lines += ["", f"`frac_below_threshold`: fraction with {col} < {thr:g}."]
    lines += [""] + [
        f"- statuses in {f['label']}: `{json.dumps(f['summary']['statuses'])}`" for f in files
    ]
    lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in report["plots"])]
    lines += ["", *(f"- {note}" for note in report["notes"])] if report["notes"] else []
    return "\n".join(lines) + "\n"


def resolve_threshold(threshold: float | str | None, column: str) -> float | None:
    """``"auto"`` -> 1.0 for the :data:`THRESHOLD_ONE` columns (the IFD family) else None;
    ``"none"`` / ``""`` / None -> None."""
    if isinstance(threshold, str):
        t = threshold.strip().lower()
        if t == "auto":
            return 1.0 if column in THRESHOLD_ONE else None
        return None if t in ("", "none") else float(t)
    return None if threshold is None else float(threshold)

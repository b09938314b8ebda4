"""Method comparison: N score columns (N files, N columns of one file, or a mix), pairwise.

    python -m resofilter_jax.analyze --mode compare --out reports/methods \\
        --inputs ifd/scores.parquet:ifd,ifd/scores.parquet:ifd_loss_ratio,reso/scores.parquet \\
        --labels IFD,IFD-loss,resonance [--directions auto,auto,low] [--thresholds auto,1.2,none]

**Inputs.** ``--inputs`` is a comma-separated list of ``PATH[:COLUMN]`` items, one per method
(absl reads it as CSV: quote a whole item that holds a comma, ``--inputs='"a,b.parquet:ifd",c'``).
PATH is a score file or a run directory, as in the pair mode. An item that names an existing file
or directory as a whole is a path; otherwise it is split at its LAST ``:``, so a path may itself
contain ``:`` (``a:b/scores.parquet:ifd``). Without a column (or with an empty one) the column is
``--column``, else the first of ``ifd``, ``rifd``, ``score``, ``rds_score``, ``cosine`` the file
has. Columns of one file are read together: its ``index``, ``turn`` and ``status`` once, each
score column once, nothing else.

**Matching.** Rows are matched by (``index``, ``turn``) as in the pair mode. Each PAIR of methods
uses the rows present in both inputs with status ``ok`` and a finite value in both
(pairwise-complete: a method with fewer rows, e.g. a target-aware score of part of the data,
does not shrink the other pairs). The report gives every method's rows and ok+finite rows, each
pair's matched rows (matrix ``matched``; its diagonal is the method's ok+finite rows) and the
rows present in all inputs and ok+finite in all.

**Defaults** (top direction, threshold) by column; ``--directions`` (high | low | auto) and
``--thresholds`` (a number | none | auto) override them per input, one item per input:

- ``ifd``, ``ifd_loss_ratio``, ``ifd_informative``: high, below 1.0. Superfiltering's policy
  (``select``): a ratio >= 1 means the conditioning did not make the target easier to predict,
  so those rows are never picked, and among the rest the highest (hardest to follow) are kept.
- ``rifd``, ``rifd_loss_ratio``: LOW, below 1.0: Selective Reflection-Tuning's selection keeps
  the pair with the lower r-IFD (the instruction is easier to guess from the response: a more
  feasible pair for the student) among r-IFD < 1 (docs/METHODS.md).
- ``score`` (resonance) and ``reso/<param>/<feature>``: low, no threshold. ResoFilter drops the
  highest scores and keeps the low-change ("resonant") rows; a parameter change has no cut-off.
- ``rds_score`` (the representation policy's max cosine to a target set), ``cosine``
  (``--mode gradient_cosine``, LESS) and ``grad_cosine`` (the gradient policy): high, no
  threshold: the rows most similar to the target are selected; a cosine has no natural cut-off.

Other columns have no default direction: pass ``--directions``. With a threshold, only values
strictly below it are eligible for the top set, whatever the direction.

**Statistics** per pair, on its matched rows: Spearman rho, Kendall tau-b and Pearson r of the
raw values (scipy.stats; two methods with opposite directions agree on what to keep when these
are NEGATIVE), and per ``--rates`` item the top-set overlap |A ∩ B| / k with k = floor(rate x
matched rows), each top set taken by its own method's direction and threshold
(:func:`~resofilter_jax.analysis.report.top_set`'s order; ties: lower (index, turn) first), and
the Jaccard index. The overlap diagonal is |A| / k: 1 unless fewer than k rows are eligible.

**Outputs** in ``--out``: ``report.json``, ``report.md``, heatmaps ``spearman.png``,
``kendall_tau_b.png`` and ``overlap_top<percent>.png`` per rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.analysis.report import (
    THRESHOLD_ONE,
    MissingColumn,
    agreement,
    common_rows,
    load_columns,
    markdown_table,
    match,
    plot_heatmap,
    resolve_path,
    resolve_threshold,
    summary,
)
from resofilter_jax.scoring.outputs import write_json

__all__ = ["Method", "compare_methods", "default_rule", "render_compare", "split_input"]

CORRELATIONS = (("spearman", "Spearman rho"), ("kendall_tau_b", "Kendall tau-b"))
STATISTICS = ("spearman", "kendall_tau_b", "pearson")
COUNTS = ("k", "intersection")  # per rate, [N, N] ints
FRACTIONS = ("overlap", "jaccard")  # per rate, [N, N] floats (NaN when k = 0)


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method: a score column of a file and the rule of its top set."""

    label: str
    spec: str  # the --inputs item
    path: str  # the file read
    column: str
    top: str  # high | low
    threshold: float | None


def split_input(spec: str) -> tuple[str, str]:
    """``PATH[:COLUMN]`` -> (path, column); column ``""`` when absent (see the module doc)."""
    if not spec:
        raise ValueError("an --inputs item is empty")
    if ":" not in spec or Path(spec).exists():
        return spec, ""
    path, column = spec.rsplit(":", 1)
    return path, column


# Selective Reflection-Tuning keeps the pair with the LOWER r-IFD (below 1): the response from
# which the instruction is easiest to guess is the more feasible one for the student.
REVERSE_RATIOS = ("rifd", "rifd_loss_ratio")


def default_rule(column: str) -> tuple[str, float | None] | None:
    """(top direction, threshold) of a column by name, None when it has no default."""
    if column in REVERSE_RATIOS:
        return "low", 1.0
    if column in THRESHOLD_ONE:
        return "high", 1.0
    if column == "score" or column.startswith("reso/"):
        return "low", None
    if column in ("rds_score", "cosine", "grad_cosine"):
        return "high", None
    return None


def _per_input(values: Sequence[Any], n: int, flag: str, default: Any) -> list[Any]:
    """One value per input: ``values`` when it has n, ``default`` n times when empty."""
    if not values:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"--{flag} has {len(values)} items for {n} --inputs (one per input)")
    return list(values)


def _name(i: int, spec: str) -> str:
    return f"input {i + 1} (`{spec}`)"


def _load(specs: Sequence[str], column: str) -> list[dict[str, Any]]:
    """The loaded columns of every input, one file read once for all its columns."""
    groups: dict[Path, list[int]] = {}  # file -> inputs reading it, in input order
    parts = [split_input(s) for s in specs]
    for i, (path, _) in enumerate(parts):
        try:
            groups.setdefault(resolve_path(path).resolve(), []).append(i)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{_name(i, specs[i])}: {e}") from e
    loaded: list[dict[str, Any] | None] = [None] * len(specs)
    for path, members in groups.items():
        cols = [parts[i][1] or column for i in members]
        try:
            for i, d in zip(members, load_columns(str(path), cols), strict=True):
                loaded[i] = d
        except MissingColumn as e:
            i = members[cols.index(e.column)] if e.column in cols else members[0]
            raise MissingColumn(e.column, f"{_name(i, specs[i])}: {e}") from e
        except ValueError as e:
            raise ValueError(f"{_name(members[0], specs[members[0]])}: {e}") from e
    return [d for d in loaded if d is not None]


def _label(d: dict[str, Any], unique_columns: bool) -> str:
    """The column, or ``<run or file name>:<column>`` when columns repeat."""
    if unique_columns:
        return d["column"]
    p = Path(d["path"])
    return f"{p.parent.name if p.stem == 'scores' else p.stem}:{d['column']}"


def _methods(
    specs: Sequence[str],
    loaded: Sequence[dict[str, Any]],
    labels: Sequence[str],
    directions: Sequence[str],
    thresholds: Sequence[float | str | None],
) -> list[Method]:
    """Every input's label and top-set rule (defaults by column, then the overrides)."""
    n = len(specs)
    columns = [d["column"] for d in loaded]
    given = _per_input(labels, n, "labels", "")
    if len({g for g in given if g}) < sum(1 for g in given if g):
        raise ValueError(f"--labels must be distinct, got {list(labels)}")
    unique = len(set(columns)) == n
    names = [g or _label(d, unique) for g, d in zip(given, loaded, strict=True)]
    names = [f"{x}#{i + 1}" if names.count(x) > 1 else x for i, x in enumerate(names)]
    dirs = _per_input(directions, n, "directions", "auto")
    thrs = _per_input(thresholds, n, "thresholds", "auto")
    out = []
    for i, (d, top, thr) in enumerate(zip(loaded, dirs, thrs, strict=True)):
        rule = default_rule(d["column"])
        top = str(top).strip().lower()
        if top == "auto":
            if rule is None:
                raise ValueError(
                    f"{_name(i, specs[i])}: column `{d['column']}` has no default top "
                    "direction; give it one in --directions (high or low)"
                )
            top = rule[0]
        if top not in ("high", "low"):
            raise ValueError(f"{_name(i, specs[i])}: direction must be high, low or auto")
        if isinstance(thr, str) and thr.strip().lower() == "auto":
            threshold = rule[1] if rule is not None else None
        else:
            try:
                threshold = resolve_threshold(thr, d["column"])
            except ValueError as e:
                raise ValueError(f"{_name(i, specs[i])}: threshold {thr!r}: {e}") from e
        out.append(Method(names[i], specs[i], d["path"], d["column"], top, threshold))
    return out


def _pairwise(
    loaded: Sequence[dict[str, Any]], methods: Sequence[Method], rates: Sequence[float]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """[N, N] matrices (matched rows, correlations, per-rate top-set overlap), every pair's
    counts and statistics, and notes on top sets smaller than k."""
    n = len(methods)
    mats: dict[str, np.ndarray] = {"matched": np.zeros((n, n), np.int64)}
    mats.update({name: np.full((n, n), np.nan) for name in STATISTICS})
    tops: list[dict[str, Any]] = []
    for rate in rates:
        tops.append({"rate": rate, **{k: np.zeros((n, n), np.int64) for k in COUNTS}})
        tops[-1].update({k: np.full((n, n), np.nan) for k in FRACTIONS})
    pairs, short = [], {rate: [] for rate in rates}
    for i in range(n):
        for j in range(i, n):
            a, b = methods[i], methods[j]
            where = a.label if i == j else f"{a.label} vs {b.label}"
            try:
                m = match(loaded[i], loaded[j])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            rule = {"threshold": a.threshold, "top": a.top, "rule_b": (b.threshold, b.top)}
            got = agreement(m["a"], m["b"], rates=rates, **rule)
            mats["matched"][i, j] = mats["matched"][j, i] = m["counts"]["matched"]
            for name in STATISTICS:
                mats[name][i, j] = mats[name][j, i] = got[name]
            for t, row in zip(tops, got["top_overlap"], strict=True):
                for k in (*COUNTS, *FRACTIONS):
                    t[k][i, j] = t[k][j, i] = row[k]
                if min(row["size_a"], row["size_b"]) < row["k"]:
                    short[row["rate"]].append(where)
            if i != j:
                pairs.append({"a": a.label, "b": b.label, "counts": m["counts"], **got})
            del m  # this pair's matched copies
    notes = [
        f"at rate {rate:g} a top set is smaller than k (fewer eligible rows than k) in: "
        + ", ".join(where)
        for rate, where in short.items()
        if where
    ]
    return {"matrices": mats, "top_overlap": tops}, pairs, notes


def _lists(x: Any) -> Any:
    """``x`` with its numpy arrays as nested lists."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_lists(v) for v in x]
    return x


def compare_methods(
    inputs: Sequence[str],
    out: str,
    *,
    labels: Sequence[str] = (),
    directions: Sequence[str] = (),
    thresholds: Sequence[float | str | None] = (),
    rates: Sequence[float] = (0.05, 0.10, 0.15),
    column: str = "",
) -> dict[str, Any]:
    """Compares N methods pairwise and writes the report; returns it (as in report.json).

    Raises:
        FileNotFoundError, ValueError: Before anything is written; the message names the input
            (or the pair) at fault.
    """
    if len(inputs) < 2:
        raise ValueError(f"mode compare needs at least 2 --inputs, got {len(inputs)}")
    loaded = _load(inputs, column)
    methods = _methods(inputs, loaded, labels, directions, thresholds)
    result, pairs, notes = _pairwise(loaded, methods, rates)
    report: dict[str, Any] = {"mode": "compare", "matching": "pairwise-complete"}
    report["rates"] = list(rates)
    report["methods"] = [
        {**dataclasses.asdict(m), "summary": summary(d, m.threshold)}
        for m, d in zip(methods, loaded, strict=True)
    ]
    report["common"] = common_rows(loaded)
    report.update(_lists(result))
    report["pairs"] = pairs
    report["notes"] = notes
    del loaded
    names = [m.label for m in methods]
    plots = {f"{name}.png": (result["matrices"][name], title) for name, title in CORRELATIONS}
    for t in result["top_overlap"]:
        title = f"top {100 * t['rate']:g}% overlap |A ∩ B| / k"
        plots[f"overlap_top{100 * t['rate']:g}.png"] = (t["overlap"], title)
    report["plots"] = list(plots)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    for file, (matrix, title) in plots.items():
        low, cmap = (0.0, "viridis") if file.startswith("overlap") else (-1.0, "RdBu_r")
        plot_heatmap(matrix, names, dest / file, title=title, vmin=low, vmax=1.0, cmap=cmap)
    write_json(dest / "report.json", report)
    (dest / "report.md").write_text(render_compare(report), encoding="utf-8")
    report["outputs"] = {n: str(dest / n) for n in ("report.md", "report.json", *plots)}
    return report


def _matrix(labels: Sequence[str], m: Sequence[Sequence[Any]], digits: int = 3) -> list[str]:
    """A Markdown table of an [N, N] matrix (floats to ``digits`` decimals)."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "nan"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    return markdown_table(
        ["", *labels], [[x, *map(cell, row)] for x, row in zip(labels, m, strict=True)]
    )


def render_compare(report: dict[str, Any]) -> str:
    """The Markdown report of a compare ``report.json`` dict."""
    methods, mats = report["methods"], report["matrices"]
    labels = [m["label"] for m in methods]
    common = report["common"]
    lines = [f"# Method comparison ({len(methods)} methods)", ""]
    head = ["method", "input", "column", "top", "threshold", "rows", "ok + finite"]
    rows = [
        [f"**{m['label']}**", f"`{m['spec']}`", f"`{m['column']}`", m["top"]]
        + [m["threshold"] if m["threshold"] is not None else "none"]
        + [m["summary"]["rows"], m["summary"]["count"]]
        for m in methods
    ]
    lines += markdown_table(head, rows)
    lines += ["", "Top: the end of a method's order it selects (`high`: largest values first)."]
    lines += ["With a threshold only values strictly below it are eligible for the top set."]
    lines += ["", "## Matching", ""]
    lines += ["Rows are matched by `index` and `turn` (0 if absent). Pairwise-complete: each pair"]
    lines += ["uses the rows present in both inputs with status `ok` and a finite value in both;"]
    lines += ["the diagonal counts a method's own ok + finite rows."]
    lines += [f"Rows present in all {len(methods)} inputs: {common['rows_in_all']}; ok with"]
    lines += [f"a finite value in all: {common['usable_in_all']}.", ""]
    lines += ["Matched rows per pair:", "", *_matrix(labels, mats["matched"]), ""]
    lines += ["## Rank correlation", ""]
    lines += ["- Spearman rho: the Pearson correlation of the two methods' average ranks"]
    lines += ["  (`scipy.stats.spearmanr`)."]
    lines += ["- Kendall tau-b: (concordant - discordant pairs) / sqrt((n0 - n1)(n0 - n2)), n0 ="]
    lines += ["  n(n-1)/2, n1 and n2 the pairs tied in the first and in the second method"]
    lines += ["  (`scipy.stats.kendalltau`, variant b)."]
    lines += ["- Both use the raw values: two methods whose tops are at opposite ends"]
    lines += ["  (`high` vs `low`) agree on what to select when they are negative.", ""]
    for name, title in CORRELATIONS:
        lines += [f"### {title}", "", *_matrix(labels, mats[name]), ""]
        lines += [f"![{title}]({name}.png)", ""]
    lines += ["## Top-set overlap", ""]
    lines += ["Top set of a method at rate r on a pair's matched rows: the k rows first in its"]
    lines += ["order (its top direction, among the rows below its threshold), k = floor(r ×"]
    lines += ["matched rows); ties: lower (`index`, `turn`) first. Overlap = size(A ∩ B) / k."]
    lines += ["The diagonal is size(A) / k: 1 unless fewer than k rows are eligible.", ""]
    for t in report["top_overlap"]:
        pct = f"{100 * t['rate']:g}"
        lines += [f"### Top {pct}%", "", *_matrix(labels, t["overlap"]), ""]
        lines += [f"![top {pct}% overlap](overlap_top{pct}.png)", ""]
    stats = [k for k in methods[0]["summary"] if k not in ("statuses", "threshold")]
    lines += ["## Summary per method", ""]
    lines += ["`rows`: all rows; `count` and the statistics: rows ok with a finite value.", ""]
    rows = [(k, *(m["summary"].get(k, "") for m in methods)) for k in stats]
    lines += markdown_table(["stat", *labels], rows)
    lines += ["", *(f"- {note}" for note in report["notes"])] if report["notes"] else []
    return "\n".join(lines) + "\n"

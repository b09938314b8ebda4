"""Analyses of scoring runs: ``run(AnalyzeConfig(...))``, the mode picked by ``config.mode``.

``scores``: the agreement of two score files (:mod:`resofilter_jax.analysis.report`);
``compare``: N methods (score files or columns) pairwise (:mod:`resofilter_jax.analysis.compare`);
``gradient_cosine``: projected gradients vs a target set's mean direction
(:mod:`resofilter_jax.analysis.gradient_cosine`, imported only for that mode: it imports jax).
The command is ``python -m resofilter_jax.analyze``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.analysis.compare import compare_methods
from resofilter_jax.analysis.report import (
    agreement,
    load,
    markdown_table,
    match,
    plot_hist,
    plot_scatter,
    render_markdown,
    resolve_threshold,
    summary,
    usable,
)
from resofilter_jax.scoring.outputs import write_json
from resofilter_jax.selection.score_file import release_memory

__all__ = ["MODES", "AnalyzeConfig", "run", "run_compare", "run_gradient_cosine", "run_scores"]


@dataclasses.dataclass
class AnalyzeConfig:
    """What to compare and where to write the report."""

    out: str
    a: str = ""  # modes scores and gradient_cosine
    b: str = ""  # "" = summarise `a` alone
    column: str = ""  # "" = the first of report.DEFAULT_COLUMNS present (ifd, rifd, score, ...)
    label_a: str = ""  # "" = "A"
    label_b: str = ""  # "" = "B"
    threshold: float | str | None = "auto"  # "auto" = 1.0 for the IFD family, none otherwise
    top: str = "high"  # high | low: which end of the order is "the top k%"
    rates: Sequence[float] = (0.05, 0.10, 0.15)
    max_scatter_points: int = 20_000  # larger inputs are subsampled (deterministically)
    scale: str = "auto"  # auto | linear | log (axes of the plots)
    seed: int = 0
    bins: int = 60
    mode: str = "scores"
    target: str = ""  # gradient_cosine: a projection dir or rows:SPEC
    # compare: one PATH[:COLUMN] per method, and per method (or empty: defaults) its label,
    # top direction (high | low | auto) and threshold (a number | none | auto); see compare.py
    inputs: Sequence[str] = ()
    labels: Sequence[str] = ()
    directions: Sequence[str] = ()
    thresholds: Sequence[float | str | None] = ()


def run_scores(config: AnalyzeConfig) -> dict[str, Any]:
    """The ``scores`` mode: agreement of two score files (or the summary of one)."""
    if config.top not in ("high", "low"):
        raise ValueError(f"top must be 'high' or 'low', got {config.top!r}")
    _check_inputs(config, "scores")
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
    del a, b, loaded, series  # only the matched pairs are needed from here on
    release_memory()
    if m is not None:
        x, y = m["a"], m["b"]
        report["counts"] = m["counts"]
        metrics = agreement(x, y, rates=config.rates, threshold=threshold, top=config.top)
        report["metrics"] = metrics
        top = metrics["top_overlap"]
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
    _check_inputs(config, "gradient_cosine")
    from resofilter_jax.analysis import gradient_cosine  # imports jax: only for this mode

    res = gradient_cosine.gradient_cosine(config.a, config.target)  # errors before any write
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
    gradient_cosine.write_cosine(out / "cosine.parquet", cols)
    write_json(out / "report.json", report)
    p = report["projection"]
    lines = ["# Gradient cosine to a target set", "", f"- A: `{info['a']}`"]
    lines += [f"- target: `{json.dumps(info['target'])}`"]
    lines += [f"- projection: K={p['dim']}, seed {p['seed']}, {p['kind']}, D={p['grad_dim']}"]
    lines += [f"- parameters: {', '.join(f'`{n}`' for n in info['params'])}", ""]
    lines += ["Cosine of each row's projected gradient with the mean of the target's normalised"]
    lines += ["projected gradients; rows without a gradient get NaN (status kept).", ""]
    stats = [k for k in report["summary"] if k not in ("statuses", "threshold")]
    lines += markdown_table(["stat", "cosine"], [(k, report["summary"][k]) for k in stats])
    lines += ["", "Highest:", ""]
    lines += markdown_table(["index", "turn", "cosine"], [list(t.values()) for t in report["top"]])
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report["outputs"] = {n: str(out / n) for n in ("cosine.parquet", "report.md", "report.json")}
    return report


def run_compare(config: AnalyzeConfig) -> dict[str, Any]:
    """The ``compare`` mode: N methods (score files or columns of one) pairwise."""
    if config.a or config.b:
        raise ValueError("mode compare takes --inputs PATH[:COLUMN],... instead of --a / --b")
    return compare_methods(
        config.inputs,
        config.out,
        labels=config.labels,
        directions=config.directions,
        thresholds=config.thresholds,
        rates=config.rates,
        column=config.column,
    )


def _check_inputs(config: AnalyzeConfig, mode: str) -> None:
    """``--a`` is required and ``--inputs`` (mode compare) refused by the other modes."""
    if config.inputs:
        raise ValueError(f"--inputs is for --mode compare; mode {mode} takes --a (and --b)")
    if not config.a:
        raise ValueError(f"mode {mode} needs --a")


MODES: dict[str, Callable[[AnalyzeConfig], dict[str, Any]]] = {
    "scores": run_scores,
    "compare": run_compare,
    "gradient_cosine": run_gradient_cosine,
}


def run(config: AnalyzeConfig) -> dict[str, Any]:
    """Runs the analysis named by ``config.mode``; returns the report (as in report.json)."""
    if config.mode not in MODES:
        raise ValueError(f"unknown mode {config.mode!r}; available: {', '.join(MODES)}")
    return MODES[config.mode](config)

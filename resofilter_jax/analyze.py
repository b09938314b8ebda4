"""Compare scoring runs on the same data: two score files (e.g. a weak and a strong model), N
methods, or projected gradients against a target set.

    python -m resofilter_jax.analyze --a weak/scores.parquet --b strong/scores.parquet \
        --out report_dir [--column ifd] [--label_a gpt2 --label_b smollm2]

Rows are matched by (``index``, ``turn``), turn 0 when a file has none; a row counts only
when its status is ``ok`` and its score is finite in BOTH files. Reported: Spearman rho and
Kendall tau-b (scipy.stats), Pearson r, the overlap of the top 5/10/15%
sets (k = floor(rate x matched rows); ``--top high`` with a threshold of 1 is the policy of
:func:`resofilter_jax.selection.policies.superfiltering_select`), per-file summary statistics,
``hist.png``, ``scatter.png`` (subsampled above ``--max_scatter_points``), ``report.md`` and
``report.json``. Without ``--b`` only the summary and the histogram are written.

``--mode compare`` compares N methods pairwise: N score files, N columns of one file, or a mix::

    python -m resofilter_jax.analyze --mode compare --out report_dir \
        --inputs ifd/scores.parquet:ifd,ifd/scores.parquet:ifd_loss_ratio,reso/scores.parquet \
        [--labels IFD,IFD-loss,resonance] [--directions auto,auto,low] [--thresholds auto,1,none]

(``PATH[:COLUMN]`` per method, split at the last ``:``; per method a top direction and threshold,
by default from the column's name) and writes N x N Spearman, Kendall tau-b and per-rate top-set
overlap matrices (``report.md``, ``report.json``, heatmap PNGs); the syntax, defaults and
definitions are in :mod:`resofilter_jax.analysis.compare`.

``--mode`` picks the analysis (``scores``, ``compare`` or ``gradient_cosine``). ``gradient_cosine``
compares projected gradients (a resonance run with ``--config.features.projection_dim=K``)::

    python -m resofilter_jax.analyze --mode gradient_cosine --a OUTPUT_DIR \
        --target TARGET_OUTPUT_DIR --out report_dir     # or --target rows:0:100,250

and writes ``cosine.parquet`` (``index``, ``turn`` when used, ``status``, ``cosine``: each row's
cosine with the mean of the target's normalised gradients, as LESS does), ``report.json`` and
``report.md``. The target is another run's projections (same model, parameters, K and seed,
else an error) or ``rows:SPEC``, rows of A by ``index`` (half-open ranges ``a:b`` and numbers).

Only the ``index``, ``turn``, ``status`` and score columns of a ``scores.parquet`` are read (once
per file, however many of its columns are compared), so millions of rows fit in a few numbers
per row (``bench/bench_memory.py``).

The command only parses flags; the library is :mod:`resofilter_jax.analysis`
(``analysis.pipeline.run(AnalyzeConfig(...))``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from absl import app, flags

from resofilter_jax.analysis.pipeline import MODES, AnalyzeConfig, run


def _define_flags() -> None:
    """One flag per AnalyzeConfig field (same name), mapped onto it by main()."""
    flags.DEFINE_string("a", "", "score file (or run directory) A, e.g. the weak model's")
    flags.DEFINE_string("b", "", "score file B; omit to summarise A alone")
    flags.DEFINE_string("out", None, "report directory")
    col_help = "score column (default: the first of ifd, rifd, score, rds_score, cosine present)"
    flags.DEFINE_string("column", "", col_help)
    flags.DEFINE_string("label_a", "", "name of A in the report")
    flags.DEFINE_string("label_b", "", "name of B in the report")
    thr_help = "top sets only among scores < this: a number, none, or auto (IFD family: 1)"
    flags.DEFINE_string("threshold", "auto", thr_help)
    flags.DEFINE_enum("top", "high", ["high", "low"], "which end of the order is the top k%")
    flags.DEFINE_list("rates", ["0.05", "0.1", "0.15"], "top-set rates")
    flags.DEFINE_integer("max_scatter_points", 20_000, "scatter subsample size")
    flags.DEFINE_enum("scale", "auto", ["auto", "linear", "log"], "plot axes")
    flags.DEFINE_integer("seed", 0, "seed of the scatter subsample")
    flags.DEFINE_integer("bins", 60, "histogram bins")
    flags.DEFINE_enum("mode", "scores", list(MODES), "analysis to run")
    flags.DEFINE_string("target", "", "gradient_cosine: a projection dir, or rows:SPEC of A")
    flags.DEFINE_list("inputs", [], "compare: PATH[:COLUMN] per method (split at the last :)")
    flags.DEFINE_list("labels", [], "compare: one name per input (default: from the column)")
    flags.DEFINE_list("directions", [], "compare: high, low or auto per input (auto: by column)")
    flags.DEFINE_list("thresholds", [], "compare: a number, none or auto per input")
    flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
    """absl entry point: runs the analysis with the flags and prints report.json."""
    del argv
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(AnalyzeConfig)}
    values["rates"] = [float(r) for r in values["rates"]]
    report = run(AnalyzeConfig(**values))
    print(Path(report["outputs"]["report.json"]).read_text(), file=sys.stdout)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

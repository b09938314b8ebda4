"""Select rows from a score file and write them, scores attached or in ResoFilter's training format.

    python -m resofilter_jax.select --scores outputs/ifd/scores.parquet \
        --data data.json --rate 0.1 --output selected.json
    python -m resofilter_jax.select --scores outputs/ifd/scores.parquet \
        --data data.json --ifd_num 10400 --fla_num 1040 --output selected_d.json
    python -m resofilter_jax.select --scores outputs/reso/scores.parquet \
        --data gsm8k.jsonl --drop_rates 0.25,0.5,0.75 --output sel.jsonl  # sel.p75/p50/p25.jsonl

``--policy`` (default ``auto``: an ``ifd`` column, or without one an ``rifd`` column, means
superfiltering on that column, a ``score`` column resofilter; a file with both kinds or
neither is refused). ``representation`` and ``gradient`` are chosen explicitly.

``--column NAME``: the numeric column the superfiltering or resofilter policy ranks (default
``ifd``, else ``rifd``, for superfiltering and ``score`` for resofilter), e.g.
``ifd_loss_ratio``, ``ifd_informative``, ``loss_direct`` or ``reso/<param>/<feature>``, with
that policy's rules unchanged. ``--threshold`` applies to whichever column superfiltering
ranks (strictly below it; the 1.0 cut is the natural one for the ratio columns ``ifd``,
``ifd_loss_ratio``, ``ifd_informative`` and ``rifd``; ``--threshold inf`` turns it off for
a column such as a loss). The column is attached to the output rows when it is not among the
usual ones, and the summary names it (and the threshold) when it is not the default.
List columns (``token_losses_*``) and strings are refused.

Superfiltering policy (docs/DESIGN.md §3.3): keep rows whose IFD is a number strictly below
`--threshold` (1.0), order them by IFD descending (ties: lower index first) and keep the first
k = floor(rate x rows in THIS score file) (the reference hard-codes Alpaca's 52002), or
`--count` rows. `--order original` restores input order. Rows with a non-ok status are never
selected but still counted in the dataset size.

Superfiltering.D (``--fla_num N``, :mod:`resofilter_jax.selection.diversity`): the IFD stage
keeps the top ``--ifd_num M`` rows of that order (0: the rows ``--rate`` / ``--count`` keep;
with M set, ``--rate`` is not used), their texts (``--embed_type``, built from the records as
the scorer built them) are embedded with ``--model`` (default: the scorer's model from
``run_config.json``, else the embedded SmolLM2; mean-pooled final hidden states where the
reference uses all-MiniLM-L6-v2), and facility location (``--fla_metric``, ``--fla_ties``)
picks N of them greedily. The rows come out in greedy order, as the reference writes them
(``--order score``: IFD order, ``original``: input order), with a ``fla_rank`` column (the
0-based greedy position; rows format only).

ResoFilter policy (docs/DESIGN.md §3.3, the reference's ``reso_filter.py``):

* The candidates are the *scored* rows: ``status == "ok"`` with a finite ``score``; N is their
  number. The reference removes exact-duplicate queries before scoring and takes N as the
  size of that de-duplicated set; our scorer keeps those rows as ``duplicate_of:<i>`` rows
  without a score, so they are not counted, and N is the same. Rows that could not be
  scored (``error:...``, ``no_response_tokens``, an ok row with a NaN score) are never
  selected and not counted either (the reference has no such rows: a bad row crashes it,
  and a row without response tokens would carry a NaN score into its sort).
* Rank the candidates by ``score`` descending, ties by lower index first (ShareGPT "all"
  mode: then lower turn), and drop the first int(N x p) of them, p = ``--drop_rate``
  (the reference's ``int(len * percent)``, a truncated float product). ``--keep low`` (the
  default, the paper's choice) thus keeps the low-change "resonant" rows; ``--keep high``
  ranks ascending instead (ties still lower index first) and keeps the high-change rows.
* The kept rows are written in input order (``--order score`` keeps the ranking order).
* ``--drop_rates 0.25,0.5,0.75`` writes one file per rate, named by the percent kept as the
  paper's p75/p50/p25: ``sel.jsonl`` -> ``sel.p75.jsonl``, ``sel.p50.jsonl``,
  ``sel.p25.jsonl``. One ranking serves all rates, so with either ``--keep`` a smaller subset
  is contained in every larger one.

Target-aware policies (the budget: ``--count`` rows, else floor(``--rate`` x rows of the
score file), at most the candidates; ``--order auto``/``score``: selection order,
``original``: input order):

* ``representation`` (RDS+, Ivison et al. 2025; :mod:`resofilter_jax.selection.representation`):
  ``--target FILE`` (any data file the project reads, ``--target_format``, default auto; the
  first ``--target_limit`` ok records) describes the task. Candidates are the ``ok`` rows of
  ``--scores``, their texts rebuilt from ``--data``; every text is the whole formatted example
  (the scorer's template prompt + response), embedded with the scoring model (``--model``
  overrides) as the position-weighted mean of its final hidden states (weights 1..n),
  L2-normalised, batched on the mesh and cached in ``<scores dir>/embeddings/`` (reused while
  the model, pooling, max_length, template and rows are the same). ``rds_score`` = max cosine
  over the targets. Selection: round-robin over the targets (target 1, 2, ..., T, 1, ...: each
  takes its most similar row not yet taken; ties: the earlier row) until k rows, or with
  ``--round_robin=false`` the top k by ``rds_score``. Columns ``rds_score`` and ``rds_target``
  (the picking / nearest target's row number in ``--target``). ``--scores_out FILE.parquet``
  also writes every row's ``rds_score`` (a score file: ``index``, ``turn``, ``status``; NaN
  where not a candidate), e.g. for ``analyze --mode compare``.
* ``gradient`` (LESS, Xia et al. 2024; :mod:`resofilter_jax.selection.gradient`): a resonance
  run's projected gradients (``--config.features.projection_dim=K``, next to ``--scores``);
  ``--target_rows 0:100,205`` (rows of the run by ``index``) are the target. Default: the top
  k by the cosine with the targets' mean direction, what ``analyze --mode gradient_cosine``
  writes (column ``grad_cosine``); ``--round_robin``: max cosine over the target rows
  (``grad_max_cosine``) with the round-robin above (``grad_target``: the picking target's
  index).

Output rows (``--format rows``, the default): the input's own rows with the score columns
attached (IFD: losses, ppls, ifd, token counts; resonance: ``score, loss, ppl, n_tokens``,
plus every ``reso/<param>/<feature>`` column with ``--with_features``), ``turn`` added in
ShareGPT "all" mode; without ``--data`` just the index and the scores.
``--format reference``: the reference's training rows ``{"instruction": "", "input": <query>,
"output": <response>, "idx": <input row number>}``, where query/response come from the
records as the scorer built them (format, fields and ShareGPT mode are read from the
scorer's ``run_config.json`` next to the score file; ``--data_format`` and
``--sharegpt_turns`` override them).

Memory: a ``scores.parquet`` is read column by column (only the key, status and score
columns the policy needs; the attached columns only for the selected rows, streamed), and
``--data`` is read once, in input order, parsing only the selected rows (JSONL, Parquet); the
output files are written as the rows arrive (a file in another order, e.g. the IFD ranking, is
filled from a temporary file of encoded rows next to it). Memory grows with a few numbers per
score row, not with the data (about 0.5-1 GiB for 10M rows; ``bench/bench_memory.py``).
The target-aware policies add a few numbers per candidate and, for round-robin, each
target's first m candidates (m = ceil(k / targets) + 16, doubled while targets compete for
the same rows); the embeddings / projections are read from their files block by block.

The command only parses flags; the library is :mod:`resofilter_jax.selection`
(``selection.pipeline.run(SelectConfig(...))``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from absl import app, flags

from resofilter_jax.selection.pipeline import SelectConfig, run
from resofilter_jax.selection.policies import (
    EMBED_TYPES,
    FLA_METRICS,
    FLA_TIES,
    FORMATS,
    KEEPS,
    ORDERS,
    POLICIES,
)


def _define_flags() -> None:
    """One flag per SelectConfig field (same name), mapped onto it by main()."""
    flags.DEFINE_string("scores", None, "scores.parquet or scores.jsonl of a scoring run")
    flags.DEFINE_string("output", None, "output file (.json array or .jsonl)")
    flags.DEFINE_string("data", "", "the scored input file; rows are copied from it")
    flags.DEFINE_enum(
        "policy", "auto", ["auto", *POLICIES], "auto: from the ifd / rifd / score column"
    )
    flags.DEFINE_string("column", "", "superfiltering / resofilter: the numeric column ranked")
    flags.DEFINE_float(
        "rate", 0.1, "superfiltering, representation, gradient: fraction of the rows to keep"
    )
    flags.DEFINE_integer("count", 0, "number of rows (overrides --rate)")
    flags.DEFINE_float("threshold", 1.0, "superfiltering: keep values strictly below this")
    flags.DEFINE_integer(
        "fla_num", 0, "Superfiltering.D: rows picked by facility location; 0 = off"
    )
    flags.DEFINE_integer(
        "ifd_num", 0, "Superfiltering.D: IFD stage size; 0 = what --rate/--count keep"
    )
    flags.DEFINE_enum("fla_metric", "euclidean", list(FLA_METRICS), "FL: similarity of embeddings")
    flags.DEFINE_enum("fla_ties", "low", list(FLA_TIES), "FL: equal gains go to the low/high index")
    flags.DEFINE_enum("embed_type", "whole", list(EMBED_TYPES), "FL: the text that is embedded")
    flags.DEFINE_bool("embed_input_line", True, "FL: keep the input line when the input is empty")
    flags.DEFINE_string(
        "model", "", "FL / representation: embedding model (default: the scorer's, else SmolLM2)"
    )
    flags.DEFINE_string("dtype", "", "FL / representation: float32 | bfloat16 (default: scorer's)")
    flags.DEFINE_integer("max_length", 0, "FL / representation: tokens per text (0: scorer's)")
    flags.DEFINE_integer("token_budget", 16384, "FL / representation: tokens per embedding batch")
    flags.DEFINE_integer("num_devices", 0, "FL / representation: local devices to use (0: all)")
    flags.DEFINE_bool("progress", False, "FL / representation: show progress bars")
    flags.DEFINE_float("drop_rate", 0.5, "resofilter: drop int(N x p) of the ranking")
    flags.DEFINE_list(
        "drop_rates",
        [],
        "resofilter: several rates, one file each (OUTPUT stem + .pXX, XX = % kept)",
    )
    flags.DEFINE_enum("keep", "low", list(KEEPS), "resofilter: keep low- or high-score rows")
    flags.DEFINE_string("target", "", "representation: data file of the target rows")
    flags.DEFINE_string("target_format", "auto", "representation: format of --target")
    flags.DEFINE_integer("target_limit", 0, "representation: first N ok target rows (0: all)")
    flags.DEFINE_string("target_rows", "", "gradient: target rows of the run, e.g. 0:100,205")
    flags.DEFINE_bool(
        "round_robin",
        None,
        "representation (default true) / gradient (default false): round-robin over targets",
    )
    flags.DEFINE_string(
        "scores_out", "", "representation / gradient: also write every row's score (parquet)"
    )
    flags.DEFINE_enum("order", "auto", list(ORDERS), "output order (auto: per policy)")
    flags.DEFINE_enum("format", "rows", list(FORMATS), "input rows + scores | reference")
    flags.DEFINE_bool("with_features", False, "attach the reso/... feature columns")
    flags.DEFINE_string("data_format", "", "data format (default: the scorer's)")
    flags.DEFINE_string("sharegpt_turns", "", "first | all (default: the scorer's)")
    flags.mark_flags_as_required(["scores", "output"])


def _floats(values: Sequence[str]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError as e:
        raise app.UsageError(f"--drop_rates must be comma-separated numbers: {e}") from e


def main(argv: list[str]) -> None:
    """absl entry point: selects with the flags and prints the summary."""
    del argv
    values = {
        f.name: flags.FLAGS[f.name].value
        for f in dataclasses.fields(SelectConfig)
        if f.name in flags.FLAGS
    }
    values["drop_rates"] = _floats(values["drop_rates"])
    summary = run(SelectConfig(**values))
    print(json.dumps(summary, indent=2), file=sys.stdout)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

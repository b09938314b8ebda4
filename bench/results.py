"""Benchmark results: one ``Measure`` per configuration, the printed table, the ratios against
the PyTorch loop, score agreement and the ``--json`` report (imported as ``results``)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from common import write_json

from resofilter_jax.analysis import rank_stats


@dataclasses.dataclass
class Measure:
    """One timed run: counts, seconds and the FLOPs to rate it by."""

    name: str
    samples: int
    tokens: int
    seconds: float
    useful_flops: float
    peak: float
    executed_flops: float | None = None
    host_rss_mb: float | None = None
    device_mb: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def rate(self, x: float) -> float:
        return x / self.seconds if self.seconds > 0 else float("nan")

    @property
    def gflops(self) -> float:
        """Useful model GFLOP/s."""
        return self.rate(self.useful_flops) / 1e9

    @property
    def mfu(self) -> float:
        """Useful model FLOP/s over the peak."""
        return self.rate(self.useful_flops) / self.peak

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            samples_per_s=self.rate(self.samples),
            tokens_per_s=self.rate(self.tokens),
            useful_gflop_s=self.gflops,
            mfu=self.mfu,
        )
        if self.executed_flops is not None:
            d["executed_gflop_s"] = self.rate(self.executed_flops) / 1e9
        return d


def _fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a right-aligned ``-`` for None / NaN."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None or x != x else format(x, spec)


def print_table(rows: Sequence[Measure]) -> None:
    """The result table (useful GFLOP/s and MFU; executed GFLOP/s where it differs)."""
    head = (
        f"{'run':<34}{'samples':>8}{'seconds':>9}{'samples/s':>10}{'tokens/s':>10}"
        f"{'GFLOP/s':>9}{'MFU':>8}{'exec GF/s':>10}{'RSS MB':>8}{'dev MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for m in rows:
        ex = m.rate(m.executed_flops) / 1e9 if m.executed_flops is not None else None
        print(
            f"{m.name:<34}{m.samples:>8}{m.seconds:>9.2f}{_fmt(m.rate(m.samples), '10.3f')}"
            f"{_fmt(m.rate(m.tokens), '10.0f')}{_fmt(m.gflops, '9.1f')}{_fmt(m.mfu * 100, '7.2f')}%"
            f"{_fmt(ex, '10.1f')}{_fmt(m.host_rss_mb, '8.0f')}{_fmt(m.device_mb, '8.0f')}"
        )


def print_ratios(rows: Sequence[Measure], torch_m: Measure, subset_note: str) -> dict:
    """Prints and returns project / torch of the per-sample, per-token and FLOP rates."""
    out = {}
    print(f"\nratio project / torch batch-of-one ({subset_note}):")
    for m in rows:
        r = out[m.name] = {
            "samples_per_s": m.rate(m.samples) / torch_m.rate(torch_m.samples),
            "tokens_per_s": m.rate(m.tokens) / torch_m.rate(torch_m.tokens),
            "useful_gflop_s": m.gflops / torch_m.gflops,
        }
        print(
            f"  {m.name:<34} samples/s {r['samples_per_s']:6.2f}x   tokens/s "
            f"{r['tokens_per_s']:6.2f}x   useful GFLOP/s {r['useful_gflop_s']:6.2f}x"
        )
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    """(Spearman rho, n) over the positions where both are finite (NaN when n < 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan"), int(ok.sum())
    return rank_stats.spearman(a[ok], b[ok]), int(ok.sum())


def max_rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """max |a - b| / |b| over the positions where both are finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (b != 0)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.abs(b[ok]))) if ok.any() else float("nan")


def finish_report(
    args: argparse.Namespace,
    rows: list[Measure],
    torch_m: Measure | None,
    scores: dict[str, dict[int, float]],
    out: dict[str, Any],
    notes: str,
) -> None:
    """Prints the table, the ratios and the score agreement checks; writes ``--json``.

    ``scores`` holds ``project`` and, where run, ``torch`` and ``other`` (the project in the
    other dtype) scores by record index.
    """
    print()
    print_table(rows + ([torch_m] if torch_m else []))
    print(notes)
    out["measures"] = [m.to_dict() for m in rows]
    ours = scores["project"]
    if torch_m is not None:
        note = (
            f"torch ran the first {torch_m.samples} of the {rows[-1].samples} rows: per-sample "
            "rates; tokens/s and GFLOP/s are the fair comparison"
        )
        out["torch"] = torch_m.to_dict()
        out["ratios"] = print_ratios(rows, torch_m, note)
        keys = sorted(scores["torch"])
        a, b = [ours[i] for i in keys], [scores["torch"][i] for i in keys]
        rho, n = spearman(a, b)
        rel = max_rel_diff(a, b)
        print(
            f"score agreement, project {args.dtype} vs torch {args.torch_dtype} on those {n} "
            f"samples: max rel diff {rel:.2e}, Spearman {rho:.4f}"
        )
        out["torch_agreement"] = {"max_rel_diff": rel, "spearman": rho, "n": n}
    if "other" in scores:
        keys = sorted(ours)
        rho, n = spearman([ours[i] for i in keys], [scores["other"][i] for i in keys])
        print(f"ranking check: Spearman(bf16 scores, fp32 scores) = {rho:.5f} over {n} samples")
        out["rank_check"] = {"spearman_bf16_vs_fp32": rho, "n": n}
    machine = vars(args).pop("machine", None)  # out["args"] is vars(args): listed once
    if machine is not None:
        out["machine"] = machine
    if args.json:
        if getattr(args, "json_scores", False):
            out["scores"] = {
                k: {str(i): float(v) for i, v in sorted(d.items())} for k, d in scores.items()
            }
        write_json(args.json, out)


def process_measure(r: dict[str, Any], flops: float, peak: float) -> Measure:
    """A whole-process run as a :class:`Measure` (wall time of the process)."""
    run = r["run"]
    return Measure(
        f"project whole process, {r['kind']} cache",
        run["rows"],
        run["loop"]["tokens"],
        r["wall_s"],
        flops,
        peak,
        host_rss_mb=r["rss_mb"],
        extra={
            "seconds_in_run": run["seconds"],
            "first_result_s": run["loop"]["first_result_s"],
            "outside_run_s": r["wall_s"] - run["seconds"]["total"],
            "command": " ".join(r["command"]),
        },
    )


def steady_measure(
    name: str, stats: dict[str, Any], flops: float, peak: float, **kw: Any
) -> Measure:
    """An in-process loop (``RunStats.summary()``) as a :class:`Measure`."""
    return Measure(name, stats["rows"], stats["tokens"], stats["seconds"], flops, peak, **kw)

"""The CPU targets of the fast-mode issue (13) against the JSON reports of ``bench/cpu_check.sh``.

    python bench/cpu_targets.py cpu_out   # prints the table, writes cpu_out/summary.json

Each figure is a ratio measured within one benchmark run (the project against the fp32
PyTorch loop of that run) or a ranking agreement; a report that is missing (its step failed or
was not run) shows as "-". The bf16 targets apply on a CPU with bf16 units (AVX512_BF16 or
AMX-BF16); elsewhere the figures are recorded and the summary says the targets do not apply.

The bf16 throughput targets also get a GEMM ceiling where the machine step ran: the rate of
one forward pass's GEMMs at XLA's bf16 (fp32-accumulating) rates (`machine.
forward_gemm_rates`; from the GEMM table of the same benchmark run) over the loop's measured
GFLOP/s: the ratio the project would reach
if its GEMMs ran at the measured kernel rate and everything else were free. A target above
it cannot be met on that CPU by any change outside the GEMM kernels. For the SFT step the
forward's shapes stand in for the backward pass's products (the same matrices, transposed
operands; their rates differ somewhat), so its ceiling is an estimate. The ceiling assumes
the loop's FLOPs; the project runs the LM head on scored tokens only (``scoring/losses.py``),
so where many positions carry no loss (padding, prompts) it can go past it. Where the table
also has torch's bf16 GEMMs (oneDNN on a CPU), a second ceiling takes each GEMM at the faster
library's rate: a target above that one is out of reach of both libraries' kernels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import BEST_BF16, forward_gemm_rates  # noqa: E402

from resofilter_jax.models.precision import CPU_BF16_FLAGS  # noqa: E402

STEADY = "project steady state"
WARM = "project whole process, warm cache"
MIN_RANKED_ROWS = 64
RANKING = ("rank_check", "spearman_bf16_vs_fp32")


class Target(NamedTuple):
    """One figure of a report: ``path`` into ``report``.json, at least ``least`` (None: no
    target, recorded only); ``bf16`` targets apply only on a CPU with bf16 units;
    ``loop_rate``: where the report holds the loop's GFLOP/s (for the GEMM ceiling)."""

    name: str
    report: str
    path: tuple[str, ...]
    least: float | None
    bf16: bool = False
    loop_rate: tuple[str, ...] | None = None


# where the figures sit in the reports: ratios against the loop of the same run, rankings
STEADY_RATIO = ("ratios", STEADY, "tokens_per_s")
WARM_RATIO = ("ratios", WARM, "tokens_per_s")
TRAIN_RATIO = ("ratio", "tokens_per_s")

TARGETS = [
    Target("IFD fp32, steady, tokens/s vs loop", "ifd_fp32", STEADY_RATIO, 1.0),
    Target("IFD fp32, whole process (warm cache)", "ifd_fp32", WARM_RATIO, 1.0),
    Target(
        "IFD bf16, steady, tokens/s vs fp32 loop",
        "ifd_bf16",
        STEADY_RATIO,
        3.0,
        True,
        ("torch", "useful_gflop_s"),  # the loop's forwards, as the project's useful FLOPs
    ),
    Target("resonance bf16, steady, tokens/s vs fp32 loop", "reso_bf16", STEADY_RATIO, 5.0, True),
    Target(
        "SFT step bf16, tokens/s vs fp32 torch",
        "train_bf16",
        TRAIN_RATIO,
        2.0,
        True,
        ("torch", "executed_gflop_s"),  # the same padded batches on both sides
    ),
    # the same steps with data.pack_batches (the same examples and loss in fewer rows; the
    # torch loop keeps the padded rows): fewer FLOPs than the loop, so no GEMM ceiling
    Target(
        "SFT step bf16, packed steps, vs fp32 torch",
        "train_bf16_packed",
        TRAIN_RATIO,
        2.0,
        True,
    ),
    Target("SFT step fp32, tokens/s vs fp32 torch (no target)", "train_fp32", TRAIN_RATIO, None),
    Target("Spearman(IFD bf16, fp32)", "ifd_bf16", RANKING, 0.99),
    Target("Spearman(resonance bf16, fp32)", "reso_bf16", RANKING, 0.99),
]


def _get(report: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _status(t: Target, report: dict[str, Any] | None, bf16_units: bool) -> str:
    value = _get(report, t.path)
    torch_dtype = _get(report, ("args", "torch_dtype"))
    ranked = _get(report, ("rank_check", "n"))
    if value is None:
        return "missing"
    if t.path != RANKING and torch_dtype not in (None, "float32"):
        return f"loop ran {torch_dtype}, not fp32"  # the targets are against fp32 loops
    if t.least is None:
        return "recorded"
    if t.bf16 and not bf16_units:
        return "n/a (no bf16 units)"
    if t.path == RANKING and ranked is not None and ranked < MIN_RANKED_ROWS:
        return f"too few rows (< {MIN_RANKED_ROWS})"
    return "met" if value >= t.least else "NOT met"


def _measure(report: dict[str, Any] | None, name: str, key: str) -> Any:
    """``key`` of the report's measure called ``name`` (the torch loop's: ``torch``)."""
    for m in (report or {}).get("measures", []):
        if m.get("name", "").startswith(name):
            return m.get(key)
    return None


def gemm_ceiling(
    t: Target,
    report: dict[str, Any] | None,
    machine: dict[str, Any],
    kind: str = "xla_bf16_f32acc",
) -> Any:
    """The ratio the bf16 GEMM rate of ``kind`` allows against this report's loop (None: not
    known): the rates of the report's own GEMM table (measured in the same run as its loop;
    the VM's speed drifts between steps) where the machine step gave the layer count, else the
    machine step's. ``kind`` ``best_bf16``: each GEMM at the faster of XLA's and torch's
    (oneDNN's) bf16 kernels, the ceiling of the kernels this machine has, not only XLA's."""
    layers, table = _get(machine, ("model", "layers")), _get(report, ("machine", "gemm"))
    if layers and table:
        rate = forward_gemm_rates(table, layers).get(kind)
    else:
        rate = _get(machine, ("model", "forward_gemm_gflop_s", kind))
    if t.loop_rate is None or not rate:
        return None
    where, key = t.loop_rate
    loop = _get(report, (where, key)) or _measure(report, where, key)
    return rate / loop if loop else None


def summarize(out: Path) -> dict[str, Any]:
    """Every target with its measured figure and whether it is met; the machine it ran on."""
    reports = {name: _load(out, name) for name in sorted({t.report for t in TARGETS})}
    # the machine step's CPU facts, else those every benchmark report carries (a rerun of
    # some steps with CPU_CHECK_ONLY leaves no machine.json behind)
    carried = (_get(r, ("machine", "cpu")) for r in reports.values())
    machine = _load(out, "machine") or {}
    cpu = machine.get("cpu") or next(filter(None, carried), {})
    flags = cpu.get("flags", {})
    bf16_units = any(flags.get(f) for f in CPU_BF16_FLAGS)
    rows = []
    for t in TARGETS:
        report = reports[t.report]
        rows.append(
            {
                "target": t.name,
                "value": _get(report, t.path),
                "at_least": t.least,
                "status": _status(t, report, bf16_units),
                "rows": _get(report, ("rank_check", "n")) if t.path == RANKING else None,
                "gemm_ceiling": gemm_ceiling(t, report, machine),
                "best_kernel_ceiling": gemm_ceiling(t, report, machine, BEST_BF16),
            }
        )
    return {"cpu": cpu.get("model"), "flags": flags, "bf16_units": bf16_units, "targets": rows}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "cpu_out")
    summary = summarize(out)
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in summary["flags"].items())
    print(f"CPU: {summary['cpu']} ({flags or 'flags unknown: machine step missing'})")
    if not summary["bf16_units"]:
        print("no bf16 units: the bf16 targets do not apply here; figures recorded")
    print(f"{'target':<52}{'measured':>10}{'needed':>9}  status")
    for r in summary["targets"]:
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        need = "-" if r["at_least"] is None else f">={r['at_least']:g}"
        rows = f" ({r['rows']} rows)" if r["rows"] is not None else ""
        ceiling, best = r["gemm_ceiling"], r["best_kernel_ceiling"]
        cap = "" if ceiling is None else f"; bf16 GEMM ceiling {ceiling:.2f}x"
        cap += "" if best is None else f" (best of XLA/oneDNN: {best:.2f}x)"
        print(f"{r['target']:<52}{value:>10}{need:>9}  {r['status']}{rows}{cap}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""The CPU targets of the fast-mode issue (13) against the JSON reports of ``bench/cpu_check.sh``.

    python bench/cpu_targets.py cpu_out   # prints the table, writes cpu_out/summary.json

Each figure is a ratio measured within one benchmark run (the project against the fp32
PyTorch loop of that run) or a ranking agreement; a report that is missing (its step failed or
was not run) shows as "-". The bf16 targets apply on a CPU with bf16 units (AVX512_BF16 or
AMX-BF16); elsewhere the figures are recorded and the summary says the targets do not apply.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STEADY = "project steady state"
WARM = "project whole process, warm cache"
MIN_RANKED_ROWS = 64

# (name, report file, path of the figure in it, at least, needs bf16 units)
TARGETS: list[tuple[str, str, tuple[str, ...], float, bool]] = [
    (
        "IFD fp32, steady, tokens/s vs loop",
        "ifd_fp32",
        ("ratios", STEADY, "tokens_per_s"),
        1.0,
        False,
    ),
    (
        "IFD fp32, whole process (warm cache)",
        "ifd_fp32",
        ("ratios", WARM, "tokens_per_s"),
        1.0,
        False,
    ),
    (
        "IFD bf16, steady, tokens/s vs fp32 loop",
        "ifd_bf16",
        ("ratios", STEADY, "tokens_per_s"),
        3.0,
        True,
    ),
    (
        "resonance bf16, steady, tokens/s vs fp32 loop",
        "reso_bf16",
        ("ratios", STEADY, "tokens_per_s"),
        5.0,
        True,
    ),
    ("SFT step bf16, tokens/s vs fp32 torch", "train_bf16", ("ratio", "tokens_per_s"), 2.0, True),
    (
        "SFT step fp32, tokens/s vs fp32 torch (no target)",
        "train_fp32",
        ("ratio", "tokens_per_s"),
        0.0,
        False,
    ),
    ("Spearman(IFD bf16, fp32)", "ifd_bf16", ("rank_check", "spearman_bf16_vs_fp32"), 0.99, False),
    (
        "Spearman(resonance bf16, fp32)",
        "reso_bf16",
        ("rank_check", "spearman_bf16_vs_fp32"),
        0.99,
        False,
    ),
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


def summarize(out: Path) -> dict[str, Any]:
    """Every target with its measured figure and whether it is met; the machine it ran on."""
    machine = _load(out, "machine") or {}
    cpu = machine.get("cpu", {})
    flags = cpu.get("flags", {})
    bf16_units = bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))
    rows = []
    for name, report_name, path, least, needs_units in TARGETS:
        report = _load(out, report_name)
        value = _get(report, path)
        ranked = _get(report, ("rank_check", "n")) if "rank_check" in path else None
        torch_dtype = _get(report, ("args", "torch_dtype"))
        if value is None:
            status = "missing"
        elif "rank_check" not in path and torch_dtype not in (None, "float32"):
            status = f"loop ran {torch_dtype}, not fp32"  # the targets are against fp32 loops
        elif least == 0.0:
            status = "recorded"
        elif needs_units and not bf16_units:
            status = "n/a (no bf16 units)"
        elif ranked is not None and ranked < MIN_RANKED_ROWS:
            status = f"too few rows (< {MIN_RANKED_ROWS})"
        else:
            status = "met" if value >= least else "NOT met"
        rows.append(
            {"target": name, "value": value, "at_least": least, "status": status, "rows": ranked}
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
        need = "-" if r["at_least"] == 0.0 else f">={r['at_least']:g}"
        rows = f" ({r['rows']} rows)" if r["rows"] is not None else ""
        print(f"{r['target']:<52}{value:>10}{need:>9}  {r['status']}{rows}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

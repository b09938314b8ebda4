"""bench/cpu_targets.py: the fast-mode issue's CPU targets read off cpu_check.sh's reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cpu_targets  # noqa: E402


def write(out: Path, name: str, report: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps(report))


def steady(ratio: float) -> dict[str, Any]:
    return {"ratios": {cpu_targets.STEADY: {"tokens_per_s": ratio}}}


def statuses(out: Path) -> dict[str, str]:
    return {r["target"]: r["status"] for r in cpu_targets.summarize(out)["targets"]}


def test_targets_on_a_cpu_with_bf16_units(tmp_path: Path) -> None:
    write(tmp_path, "machine", {"cpu": {"model": "Xeon", "flags": {"amx_bf16": True}}})
    ifd32 = steady(1.2)
    ifd32["ratios"][cpu_targets.WARM] = {"tokens_per_s": 0.9}
    write(tmp_path, "ifd_fp32", ifd32)
    write(
        tmp_path,
        "ifd_bf16",
        {**steady(3.1), "rank_check": {"spearman_bf16_vs_fp32": 0.995, "n": 128}},
    )
    write(
        tmp_path,
        "reso_bf16",
        {**steady(4.0), "rank_check": {"spearman_bf16_vs_fp32": 0.999, "n": 12}},
    )
    write(
        tmp_path, "train_bf16", {"ratio": {"tokens_per_s": 2.5}, "args": {"torch_dtype": "float32"}}
    )
    got = statuses(tmp_path)
    assert got["IFD fp32, steady, tokens/s vs loop"] == "met"
    assert got["IFD fp32, whole process (warm cache)"] == "NOT met"
    assert got["IFD bf16, steady, tokens/s vs fp32 loop"] == "met"
    assert got["resonance bf16, steady, tokens/s vs fp32 loop"] == "NOT met"
    assert got["SFT step bf16, tokens/s vs fp32 torch"] == "met"
    assert got["SFT step fp32, tokens/s vs fp32 torch (no target)"] == "missing"
    assert got["Spearman(IFD bf16, fp32)"] == "met"
    assert got["Spearman(resonance bf16, fp32)"].startswith("too few rows")


def test_bf16_targets_do_not_apply_without_bf16_units(tmp_path: Path) -> None:
    write(
        tmp_path, "machine", {"cpu": {"model": "EPYC", "flags": {"avx2": True, "amx_bf16": False}}}
    )
    write(tmp_path, "ifd_bf16", steady(0.9))
    write(tmp_path, "reso_bf16", {**steady(9.0), "args": {"torch_dtype": "bfloat16"}})
    write(tmp_path, "train_fp32", {"ratio": {"tokens_per_s": 0.8}})
    summary = cpu_targets.summarize(tmp_path)
    assert not summary["bf16_units"]
    got = statuses(tmp_path)
    assert got["IFD bf16, steady, tokens/s vs fp32 loop"] == "n/a (no bf16 units)"
    assert got["SFT step fp32, tokens/s vs fp32 torch (no target)"] == "recorded"
    assert got["IFD fp32, steady, tokens/s vs loop"] == "missing"
    # a ratio against a bf16 torch loop is not the target's (the fp32 published loop)
    assert got["resonance bf16, steady, tokens/s vs fp32 loop"] == "loop ran bfloat16, not fp32"


def test_cpu_facts_from_a_benchmark_report_without_the_machine_step(tmp_path: Path) -> None:
    cpu = {"model": "Xeon", "flags": {"avx512f": True, "amx_bf16": True}}
    write(tmp_path, "ifd_bf16", {**steady(3.2), "machine": {"cpu": cpu}})
    summary = cpu_targets.summarize(tmp_path)
    assert summary["bf16_units"] and summary["cpu"] == "Xeon"
    assert statuses(tmp_path)["IFD bf16, steady, tokens/s vs fp32 loop"] == "met"


def test_gemm_ceiling_from_the_machine_table(tmp_path: Path) -> None:
    """The bf16 GEMM rate of one forward (layers x per-layer GEMMs + the LM head once) over
    the loop's GFLOP/s; no ceiling where the machine step left no model rates."""
    import machine

    table = [  # seconds per GEMM: the layers' pair runs at 100 GFLOP/s, the head at 400
        {"label": "q_proj+o_proj", "gflop": 1.0, "seconds": {"xla_bf16_f32acc": 0.01}},
        {"label": "lm_head", "gflop": 4.0, "seconds": {"xla_bf16_f32acc": 0.01}},
    ]
    rates = machine.forward_gemm_rates(table, layers=3)  # 6 GFLOP in 0.06 s + 4 in 0.01 s
    assert abs(rates["xla_bf16_f32acc"] - 10.0 / 0.07) < 1e-9
    write(tmp_path, "machine", {"cpu": {"flags": {"avx512_bf16": True}}})
    write(tmp_path, "ifd_bf16", {**steady(1.5), "torch": {"useful_gflop_s": 50.0}})
    measures = [{"name": "torch float32", "executed_gflop_s": 100.0}]
    write(tmp_path, "train_bf16", {"ratio": {"tokens_per_s": 1.2}, "measures": measures})
    rows = {r["target"]: r for r in cpu_targets.summarize(tmp_path)["targets"]}
    assert all(r["gemm_ceiling"] is None for r in rows.values())
    model = {"layers": 3, "forward_gemm_gflop_s": {"xla_bf16_f32acc": 150.0}}
    write(tmp_path, "machine", {"cpu": {"flags": {"avx512_bf16": True}}, "model": model})
    rows = {r["target"]: r for r in cpu_targets.summarize(tmp_path)["targets"]}
    assert rows["IFD bf16, steady, tokens/s vs fp32 loop"]["gemm_ceiling"] == 3.0
    assert rows["SFT step bf16, tokens/s vs fp32 torch"]["gemm_ceiling"] == 1.5
    assert rows["IFD fp32, steady, tokens/s vs loop"]["gemm_ceiling"] is None
    # a report's own GEMM table (same run as its loop) wins over the machine step's rates
    own = {"gemm": table}  # 10 / 0.07 GFLOP/s at 3 layers
    write(tmp_path, "ifd_bf16", {**steady(1.5), "torch": {"useful_gflop_s": 50.0}, "machine": own})
    rows = {r["target"]: r for r in cpu_targets.summarize(tmp_path)["targets"]}
    got = rows["IFD bf16, steady, tokens/s vs fp32 loop"]["gemm_ceiling"]
    assert abs(got - 10.0 / 0.07 / 50.0) < 1e-9
    assert rows["IFD bf16, steady, tokens/s vs fp32 loop"]["best_kernel_ceiling"] is None


def test_best_kernel_ceiling_takes_each_gemm_at_the_faster_library() -> None:
    """With torch's bf16 GEMMs in the table, ``best_bf16`` runs each GEMM at the faster of
    the two kinds (per shape, not the faster forward): here 6 GFLOP in 0.03 s + 4 in 0.01."""
    import machine

    table = [
        {"label": "a+b", "gflop": 1.0, "seconds": {"xla_bf16_f32acc": 0.01, "torch_bf16": 0.005}},
        {
            "label": "lm_head",
            "gflop": 4.0,
            "seconds": {"xla_bf16_f32acc": 0.01, "torch_bf16": 0.02},
        },
    ]
    rates = machine.forward_gemm_rates(table, layers=3)
    assert abs(rates["xla_bf16_f32acc"] - 10.0 / 0.07) < 1e-9
    assert abs(rates["torch_bf16"] - 10.0 / 0.05) < 1e-9
    assert abs(rates[machine.BEST_BF16] - 10.0 / 0.04) < 1e-9
    fp32_only = [{"label": "lm_head", "gflop": 4.0, "seconds": {"xla_fp32": 0.02}}]
    assert machine.BEST_BF16 not in machine.forward_gemm_rates(fp32_only, layers=3)

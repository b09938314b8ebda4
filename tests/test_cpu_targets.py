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

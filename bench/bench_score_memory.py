"""Host memory of the score command against the number of input rows.

    python bench/bench_score_memory.py --rows 20000,100000,400000 --method ifd [--json out.json]

For each size, a synthetic alpaca-style JSONL pool (short texts; every 50th query repeats an
earlier one) is written to ``--workdir`` and scored by ``python -m resofilter_jax.score`` in
a fresh subprocess under a tiny random model (GPT-2 for IFD, Llama for resonance, the byte-level
test tokenizer) so the host side (read, tokenize, pack, collate, write, merge) is what is
measured. Reported per size: the child's peak RSS (``ru_maxrss``) and wall time; then the
least-squares slope of peak RSS against rows (bytes per row) and its extrapolation to 10M rows.
The encoded-shard cache is off (it lives on disk and is not what this measures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

WORDS = (
    "alpha beta gamma delta apple river stone cloud quick brown fox jumps over lazy dog "
    "compute the sum of two numbers write a poem about rain explain why sky is blue list "
    "three colors name capital city of france translate hello into spanish"
).split()
RECIPES = {"ifd": "ifd_gpt2_alpaca", "resonance": "reso_smollm2_gsm8k"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="20000,100000,400000", help="comma-separated pool sizes")
    p.add_argument("--method", choices=sorted(RECIPES), default="ifd")
    p.add_argument("--workdir", default="/tmp/resofilter_score_memory")
    p.add_argument("--shard_size", type=int, default=2048)
    p.add_argument("--json", default="")
    return p.parse_args()


def write_pool(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` alpaca rows of 4-10 word instructions and outputs, written a block at a time."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, rows, 10_000):
            hi = min(rows, lo + 10_000)
            lines = []
            for i in range(lo, hi):
                q = i - 1 - int(rng.integers(0, i)) if i and i % 50 == 0 else i  # repeats
                r = np.random.default_rng(q)  # the query is a function of its row number q
                instr = " ".join(r.choice(WORDS, int(r.integers(4, 11))))
                out = " ".join(rng.choice(WORDS, int(rng.integers(4, 11))))
                lines.append(json.dumps({"instruction": f"{instr} {q}", "output": out}))
            f.write("\n".join(lines) + "\n")


def tiny_model(workdir: Path, method: str) -> Path:
    """A tiny random HF model + the byte-level test tokenizer (saved once per method)."""
    from support.data import build_tokenizer
    from support.models import save_tiny_model

    path = workdir / f"tiny_{method}"
    if not (path / "config.json").is_file():
        if method == "ifd":
            save_tiny_model("gpt2", build_tokenizer("none"), path)
        else:
            save_tiny_model("llama", build_tokenizer("bos"), path)
    return path


CHILD = """
import json, os, resource, runpy, sys, threading, time
t0 = time.perf_counter()
series, stop = [], threading.Event()
def sample():  # resident set size every 0.5 s
    page = os.sysconf("SC_PAGE_SIZE")
    while not stop.wait(0.5):
        with open("/proc/self/statm") as f:
            series.append((time.perf_counter() - t0, int(f.read().split()[1]) * page / 2**20))
threading.Thread(target=sample, daemon=True).start()
sys.argv = ["resofilter_jax.score", *sys.argv[1:]]
try:
    runpy.run_module("resofilter_jax.score", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
stop.set()
print("SERIES", json.dumps(series))
print("BENCH", time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def score_once(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, float]:
    """Runs the score command in a fresh process: wall seconds and peak RSS (MiB)."""
    recipe = ROOT / "configs" / f"{RECIPES[args.method]}.py"
    flags = [
        f"--config={recipe}",
        f"--config.model.path={model}",
        f"--config.data.path={data}",
        f"--config.output_dir={out}",
        "--config.overwrite=True",
        "--config.progress=False",
        f"--config.shard_size={args.shard_size}",
        "--config.max_length=64",
        "--config.min_bucket=16",
        "--config.host.encoded_cache_dir=",
        f"--config.compilation_cache_dir={args.workdir}/jax_cache",
    ]
    if args.method == "resonance":
        flags += ["--config.data.format=alpaca", "--config.resonance.last_k=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *flags], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"score failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH")][-1].split()
    series = json.loads([x for x in proc.stdout.splitlines() if x.startswith("SERIES")][-1][7:])
    return {
        "wall_s": time.perf_counter() - t0,
        "run_s": float(line[1]),
        "rss_mib": int(line[2]) / 1024,
        "rss_series": series,  # (seconds, MiB)
    }


def steady_growth(series: list[list[float]]) -> tuple[float, float]:
    """(RSS at 25% of the run, RSS at 95%) in MiB: growth while shards stream past, after
    start-up and compilation, before the merge."""
    if len(series) < 4:
        return float("nan"), float("nan")
    t_end = series[-1][0]
    at = lambda f: max(m for t, m in series if t <= f * t_end)  # noqa: E731
    return at(0.25), at(0.95)


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(workdir, args.method)
    results = []
    for n in (int(x) for x in args.rows.split(",")):
        data = workdir / f"pool_{n}.jsonl"
        if not data.is_file():
            write_pool(data, n)
        got = score_once(args, model, data, workdir / f"out_{args.method}_{n}")
        summary = json.loads((workdir / f"out_{args.method}_{n}" / "run.json").read_text())
        got.update(rows=n, statuses=summary["statuses"], tokens_per_s=summary["tokens_per_s"])
        results.append(got)
        got["rss_25"], got["rss_95"] = steady_growth(got["rss_series"])
        print(
            f"{n:>9} rows: peak RSS {got['rss_mib']:8.1f} MiB, {got['run_s']:7.1f} s "
            f"({summary['tokens_per_s']:.0f} tokens/s); RSS at 25% / 95% of the run "
            f"{got['rss_25']:.0f} / {got['rss_95']:.0f} MiB",
            flush=True,
        )
    rows = np.asarray([r["rows"] for r in results], np.float64)
    rss = np.asarray([r["rss_mib"] for r in results], np.float64)
    slope = float(np.polyfit(rows, rss, 1)[0]) if len(rows) > 1 else float("nan")  # MiB/row
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| rows | peak RSS (MiB) | RSS at 25% / 95% of the run (MiB) | wall (s) |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['rss_mib']:.0f} | {r['rss_25']:.0f} / {r['rss_95']:.0f} "
            f"| {r['run_s']:.1f} |"
        )
    last = results[-1]
    within = (last["rss_95"] - last["rss_25"]) * 2**20 / (0.7 * last["rows"])
    print(f"growth within the largest run (25% -> 95% of its time): {within:.1f} bytes/row")
    print(
        f"\nslope: {slope * 2**20:.1f} bytes/row; extrapolated to 10M rows: "
        f"{rss[-1] + slope * (10_000_000 - rows[-1]):.0f} MiB"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"method": args.method, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()

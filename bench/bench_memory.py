"""Peak memory and wall time of ``select`` (every policy) and ``analyze`` on large score files.

    python bench/bench_memory.py --rows 1000000,10000000 --workdir /tmp/resofilter_mem \
        [--format alpaca|sharegpt --turns first|all] [--reso_params 3] [--json out.json]

For each size a synthetic pool is generated with ``bench/make_pool.py`` (data JSONL, two IFD
score files, a resonance score file), then each command runs as a subprocess of its own
fresh wrapper process, which reports ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the
peak RSS of that one command) and the wall time. The pool and the outputs are deleted
afterwards unless ``--keep``. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Runs argv[2:] with stdout/stderr to argv[1]; prints the child's peak RSS (KiB) and seconds.
_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], "wb") as log:
    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc, "seconds": seconds, "maxrss_kib": rss}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1000000", help="comma-separated pool sizes (input rows)")
    p.add_argument("--workdir", default="/tmp/resofilter_mem")
    p.add_argument("--format", default="alpaca", choices=["alpaca", "sharegpt"])
    p.add_argument("--turns", default="first", choices=["first", "all"])
    p.add_argument("--reso_params", type=int, default=3, help="matrices in the resonance file")
    p.add_argument("--only", default="", help="comma-separated command names to run")
    p.add_argument("--keep", action="store_true", help="keep the pools and outputs")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args()


def commands(pool: Path, out: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of every measured command on one pool."""
    ifd, ifd_b = pool / "ifd" / "scores.parquet", pool / "ifd_b" / "scores.parquet"
    reso, data = pool / "reso" / "scores.parquet", pool / "data.jsonl"
    sel = [sys.executable, "-m", "resofilter_jax.select"]
    ana = [sys.executable, "-m", "resofilter_jax.analyze"]
    return [
        ("select sf --rate 0.1", [*sel, f"--scores={ifd}", f"--output={out}/a.jsonl"]),
        (
            "select sf --rate 0.1 --data",
            [*sel, f"--scores={ifd}", f"--data={data}", f"--output={out}/b.jsonl"],
        ),
        (
            "select sf --rate 0.1 --data --order original (.json)",
            [*sel, f"--scores={ifd}", f"--data={data}", "--order=original"]
            + [f"--output={out}/c.json"],
        ),
        (
            "select sf --count 200000 --threshold 0.9 --data",
            [*sel, f"--scores={ifd}", f"--data={data}", "--count=200000", "--threshold=0.9"]
            + [f"--output={out}/d.jsonl"],
        ),
        ("select rf --drop_rate 0.5", [*sel, f"--scores={reso}", f"--output={out}/e.jsonl"]),
        (
            "select rf --drop_rates 0.25,0.5,0.75 --data",
            [*sel, f"--scores={reso}", f"--data={data}", "--drop_rates=0.25,0.5,0.75"]
            + [f"--output={out}/f.jsonl"],
        ),
        (
            "select rf --drop_rate 0.9 --data --format reference",
            [*sel, f"--scores={reso}", f"--data={data}", "--drop_rate=0.9"]
            + ["--format=reference", f"--output={out}/g.jsonl"],
        ),
        ("analyze --a ifd", [*ana, f"--a={ifd}", f"--out={out}/rep_a"]),
        ("analyze --a ifd --b ifd_b", [*ana, f"--a={ifd}", f"--b={ifd_b}", f"--out={out}/rep_ab"]),
        ("analyze --a reso", [*ana, f"--a={reso}", f"--out={out}/rep_reso"]),
    ]


def measure(argv: list[str], log: Path) -> dict[str, Any]:
    """Runs ``argv`` under a fresh wrapper process; its peak RSS, seconds and exit code."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(log), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    a = parse_args()
    work = Path(a.workdir)
    results: list[dict[str, Any]] = []
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    for rows in (int(r) for r in a.rows.split(",")):
        pool, out = work / f"pool_{rows}", work / f"out_{rows}"
        shutil.rmtree(pool, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        make = [sys.executable, str(REPO / "bench" / "make_pool.py"), f"--rows={rows}"]
        make += [f"--out={pool}", f"--format={a.format}", f"--turns={a.turns}"]
        make += [f"--reso_params={a.reso_params}"]
        r = measure(make, out / "make_pool.log")
        pool_mib = _size_mib(pool)
        print(f"pool of {rows} rows: {pool_mib:.0f} MiB in {r['seconds']:.0f} s", flush=True)
        results.append({"rows": rows, "name": "make_pool", "argv": make, **r, "out_mib": pool_mib})
        for name, argv in commands(pool, out):
            if only and name not in only:
                continue
            before = set(out.iterdir())
            r = measure(argv, out / f"{len(results)}.log")
            made = [p for p in out.iterdir() if p not in before and p.suffix != ".log"]
            r["out_mib"] = sum(_size_mib(p) for p in made)
            results.append({"rows": rows, "name": name, "argv": argv, **r})
            status = "" if r["rc"] == 0 else f"  FAILED rc={r['rc']} (see {out})"
            print(
                f"{rows:>10} {name:<52} {r['maxrss_kib'] / 1024:>8.0f} MiB "
                f"{r['seconds']:>8.1f} s{status}",
                flush=True,
            )
            if not a.keep:
                for p in made:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not a.keep:
            shutil.rmtree(pool, ignore_errors=True)
    print()
    print(f"{_cpu()}, Python {platform.python_version()}")
    print()
    print("| rows | command | peak RSS MiB | wall s | written MiB |")
    print("|---:|---|---:|---:|---:|")
    for r in results:
        fail = "" if r["rc"] == 0 else f" (rc {r['rc']})"
        print(
            f"| {r['rows']:,} | `{r['name']}`{fail} | {r['maxrss_kib'] / 1024:.0f} | "
            f"{r['seconds']:.1f} | {r['out_mib']:.0f} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

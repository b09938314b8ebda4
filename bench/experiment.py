"""End-to-end experiment: score -> select -> train -> evaluate, several selections, one budget.

Usage (from the repository root; the numbers in EXPERIMENTS.md come from these commands):

    python bench/experiment.py --workdir runs/experiment_cpu             # 2-core CPU, < 1 h
    python bench/experiment.py --workdir runs/experiment_gpu --preset gpu  # one GPU

Data: the embedded GSM8K set (1319 question/answer rows). The first ``--pool`` rows are the
training pool; the last ``--eval`` rows are held out for evaluation (they never enter the pool).
Model: the embedded SmolLM2-135M-Instruct (``--model`` for another).

Arms, each trained by ``python -m resofilter_jax.train`` with the same recipe and evaluated by
``python -m resofilter_jax.evaluate`` (held-out response loss/perplexity, GSM8K exact match by
greedy decoding):
  base    the model as it is (no training)
  full    every pool row
  random  ``budget * pool`` rows drawn uniformly (seeded)
  ifd     Superfiltering: ``python -m resofilter_jax.score`` (IFD) then
          ``python -m resofilter_jax.select --count K`` (highest IFD below 1)
  reso    ResoFilter: resonance scores then ``select --drop_rate 1-budget`` (keep the
          lowest-change rows)
Every step is a subprocess running the user-facing command, logged to WORKDIR/commands.sh;
a step whose output exists is skipped, so an interrupted experiment resumes where it stopped.
The results table goes to WORKDIR/results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resofilter_jax import assets  # noqa: E402

ARMS = ("base", "full", "random", "ifd", "reso")

PRESETS: dict[str, dict[str, Any]] = {
    # Sized so that the whole experiment finishes in under an hour on a 2-core CPU.
    # Measured here: IFD scoring ~1.5 s and resonance ~2.4 s per GSM8K row after compilation,
    # a train step of 8 rows ~40 s, greedy decoding ~30 s per 16 rows x 128 tokens.
    "cpu": dict(
        pool=128,
        eval=40,
        budget=0.25,
        dtype="float32",  # this CPU has no fast bf16 matmul
        max_length=384,
        batch_size=8,
        epochs=1,
        lr=1e-4,
        max_new_tokens=128,
        gen_batch=16,
    ),
    # One GPU (H100-class): the whole GSM8K file, bf16 compute with fp32 master weights.
    "gpu": dict(
        pool=1000,
        eval=319,
        budget=0.25,
        dtype="bfloat16",
        max_length=512,
        batch_size=16,
        epochs=3,
        lr=5e-5,
        max_new_tokens=256,
        gen_batch=64,
    ),
}


class Runner:
    """Runs and logs the experiment's commands; skips those whose output already exists."""

    def __init__(self, workdir: Path, dry_run: bool = False):
        self.workdir = workdir
        self.dry_run = dry_run
        self.log = workdir / "commands.sh"
        self.seconds: dict[str, float] = {}
        timings = workdir / "timings.json"
        if timings.exists():
            self.seconds = json.loads(timings.read_text())

    def __call__(self, name: str, args: list[str], done: Path) -> None:
        """Runs `python -m <args>` unless `done` exists; its wall time is kept under `name`."""
        cmd = [sys.executable, "-m", *args]
        with open(self.log, "a") as f:
            f.write(f"# {name}\n{shlex.join(['python', '-m', *args])}\n")
        if done.exists():
            print(f"[{name}] done already ({done})", flush=True)
            return
        print(f"[{name}] {shlex.join(cmd[2:])}", flush=True)
        if self.dry_run:
            return
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        (self.workdir / "logs").mkdir(exist_ok=True)
        (self.workdir / "logs" / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"step {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        self.seconds[name] = elapsed
        (self.workdir / "timings.json").write_text(json.dumps(self.seconds, indent=2))
        print(f"[{name}] {elapsed:.0f} s", flush=True)


def split_data(source: Path, workdir: Path, pool: int, n_eval: int) -> tuple[Path, Path]:
    """Writes data/pool.jsonl (first `pool` rows) and data/eval.jsonl (last `n_eval` rows)."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    if pool + n_eval > len(lines):
        raise ValueError(f"pool {pool} + eval {n_eval} > the {len(lines)} rows of {source}")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    pool_path, eval_path = data / "pool.jsonl", data / "eval.jsonl"
    pool_path.write_text("\n".join(lines[:pool]) + "\n")
    eval_path.write_text("\n".join(lines[len(lines) - n_eval :]) + "\n")
    return pool_path, eval_path


def random_subset(pool_path: Path, out: Path, k: int, seed: int) -> None:
    """k rows of the pool drawn without replacement (kept in pool order)."""
    lines = [line for line in pool_path.read_text().splitlines() if line.strip()]
    picks = np.sort(np.random.default_rng(seed).choice(len(lines), size=k, replace=False))
    out.write_text("\n".join(lines[i] for i in picks) + "\n")


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _questions(path: Path) -> set[str]:
    return {json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole experiment; returns (and writes) the results."""
    p = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None}}
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(p, indent=2, default=str))
    step = Runner(workdir, dry_run=args.dry_run)
    t0 = time.perf_counter()
    pool_path, eval_path = split_data(assets.gsm8k_test(), workdir, p["pool"], p["eval"])
    k = int(p["budget"] * p["pool"])
    model = [f"--config.model.path={p['model']}"] if p.get("model") else []
    subsets = workdir / "subsets"
    subsets.mkdir(exist_ok=True)
    common_data = [f"--config.data.path={pool_path}", "--config.data.format=gsm8k"]

    # Score and select.
    scores = workdir / "scores"
    step(
        "score_ifd",
        [
            "resofilter_jax.score",
            "--config=configs/ifd_smollm2_sharegpt.py",
            *model,
            *common_data,
            f"--config.output_dir={scores / 'ifd'}",
            f"--config.max_length={p['max_length']}",
            "--config.progress=False",
        ],
        scores / "ifd" / "scores.parquet",
    )
    step(
        "score_reso",
        [
            "resofilter_jax.score",
            "--config=configs/reso_smollm2_gsm8k.py",
            *model,
            *common_data,
            f"--config.output_dir={scores / 'reso'}",
            f"--config.max_length={p['max_length']}",
            "--config.progress=False",
        ],
        scores / "reso" / "scores.parquet",
    )
    step(
        "select_ifd",
        [
            "resofilter_jax.select",
            f"--scores={scores / 'ifd' / 'scores.parquet'}",
            f"--data={pool_path}",
            f"--output={subsets / 'ifd.jsonl'}",
            f"--count={k}",
        ],
        subsets / "ifd.jsonl",
    )
    step(
        "select_reso",
        [
            "resofilter_jax.select",
            f"--scores={scores / 'reso' / 'scores.parquet'}",
            f"--data={pool_path}",
            f"--output={subsets / 'reso.jsonl'}",
            f"--drop_rate={1 - p['budget']}",
        ],
        subsets / "reso.jsonl",
    )
    if not (subsets / "random.jsonl").exists():
        random_subset(pool_path, subsets / "random.jsonl", k, args.seed)
    data_of = {
        "full": pool_path,
        "random": subsets / "random.jsonl",
        "ifd": subsets / "ifd.jsonl",
        "reso": subsets / "reso.jsonl",
    }

    # Train and evaluate.
    for arm in ARMS:
        hf_dir: Path | None = None
        if arm != "base":
            train_dir = workdir / "train" / arm
            hf_dir = train_dir / "hf"
            step(
                f"train_{arm}",
                [
                    "resofilter_jax.train",
                    "--config=configs/sft_smollm2.py",
                    *model,
                    f"--config.data.path={data_of[arm]}",
                    "--config.data.format=gsm8k",
                    f"--config.workdir={train_dir}",
                    f"--config.model.dtype={p['dtype']}",
                    f"--config.max_length={p['max_length']}",
                    f"--config.train.batch_size={p['batch_size']}",
                    f"--config.train.epochs={p['epochs']}",
                    f"--config.train.seed={args.seed}",
                    f"--config.optim.lr={p['lr']}",
                    "--config.optim.warmup_ratio=0.1",
                    "--config.checkpoint.every=100000",
                    "--config.tensorboard=False",
                    "--config.progress=False",
                ],
                hf_dir / "config.json",
            )
        eval_dir = workdir / "eval" / arm
        step(
            f"eval_{arm}",
            [
                "resofilter_jax.evaluate",
                "--config=configs/eval_smollm2_gsm8k.py",
                *([f"--config.model.path={hf_dir}"] if hf_dir else model),
                f"--config.data.path={eval_path}",
                "--config.data.format=gsm8k",
                f"--config.output_dir={eval_dir}",
                f"--config.model.dtype={p['dtype']}",
                f"--config.max_length={p['max_length']}",
                f"--config.generate.max_new_tokens={p['max_new_tokens']}",
                f"--config.generate.batch_size={p['gen_batch']}",
                "--config.progress=False",
            ],
            eval_dir / "eval.json",
        )
    if args.dry_run:
        return {}
    return summarize(workdir, p, data_of, step.seconds, time.perf_counter() - t0)


def summarize(
    workdir: Path,
    p: dict[str, Any],
    data_of: dict[str, Path],
    seconds: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    """Collects every arm's numbers into results.json and a Markdown table in results.md."""
    rows = []
    for arm in ARMS:
        ev = json.loads((workdir / "eval" / arm / "eval.json").read_text())
        row: dict[str, Any] = {
            "arm": arm,
            "train_rows": _count(data_of[arm]) if arm in data_of else 0,
            "heldout_loss": ev["loss"]["loss"],
            "heldout_ppl": ev["loss"]["ppl"],
            "gsm8k_correct": ev["gsm8k"]["correct"],
            "gsm8k_examples": ev["gsm8k"]["examples"],
            "gsm8k_accuracy": ev["gsm8k"]["accuracy"],
            "eval_s": seconds.get(f"eval_{arm}"),
        }
        if arm != "base":
            run_json = json.loads((workdir / "train" / arm / "run.json").read_text())
            row["train_steps"] = run_json["steps"]["total"]
            row["final_train_loss"] = (run_json.get("final_metrics") or {}).get("loss")
            row["train_s"] = seconds.get(f"train_{arm}")
        rows.append(row)
    overlap = len(_questions(data_of["ifd"]) & _questions(data_of["reso"]))
    result = {
        "settings": p,
        "arms": rows,
        "ifd_reso_overlap": overlap,
        "step_seconds": seconds,
        "wall_s": wall,
        "total_step_s": sum(seconds.values()),
    }
    (workdir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [
        "| arm | train rows | steps | final train loss | held-out loss | held-out ppl "
        "| GSM8K EM | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ftl = r.get("final_train_loss")
        lines.append(
            f"| {r['arm']} | {r['train_rows']} | {r.get('train_steps', 0)} "
            f"| {'-' if ftl is None else f'{ftl:.3f}'} | {r['heldout_loss']:.4f} "
            f"| {r['heldout_ppl']:.3f} | {r['gsm8k_correct']}/{r['gsm8k_examples']} "
            f"| {r.get('train_s') or 0:.0f} | {r['eval_s'] or 0:.0f} |"
        )
    lines.append("")
    lines.append(f"IFD and resonance subsets share {overlap} rows.")
    lines.append(f"Sum of step times: {sum(seconds.values()):.0f} s.")
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", default=None, help="model path (default: embedded SmolLM2)")
    parser.add_argument("--pool", type=int, default=None, help="training pool rows")
    parser.add_argument("--eval", type=int, default=None, help="held-out rows")
    parser.add_argument("--budget", type=float, default=None, help="subset fraction of pool")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

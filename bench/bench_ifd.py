"""IFD scoring throughput: resofilter_jax's real scoring path vs Superfiltering's batch-of-one loop.

Usage (the commands behind the BENCHMARKS.md figures; run from the repository root):

    # CPU, fp32 and bf16 (bf16 also checks bf16-vs-fp32 rankings):
    python bench/bench_ifd.py --samples 128 --torch_samples 32 --json ifd_cpu_fp32.json
    python bench/bench_ifd.py --samples 128 --torch_samples 32 --dtype bfloat16 \\
        --json ifd_cpu_bf16.json
    # GPU (H100 / H200): copy ~/.cache/resofilter_jax (or pass --model_path/--data_path) first;
    # on a multi-GPU host add --set num_devices=1 (torch uses one GPU, JAX all by default)
    python bench/bench_ifd.py --samples 2048 --torch_samples 256 --device gpu \\
        --json ifd_gpu_fp32.json
    python bench/bench_ifd.py --samples 2048 --torch_samples 256 --device gpu \\
        --dtype bfloat16 --json ifd_gpu_bf16.json

One run measures, on the same model (SmolLM2-135M-Instruct from the embedded GGUF), data
(ShareGPT first turns) and machine, with the recipe ``configs/ifd_smollm2_sharegpt.py``
(max_length 1024) and the flags as config overrides:

1. project, whole process: ``python -m resofilter_jax.score --config ...`` in a fresh process
   into a fresh output dir; wall time from process start to exit (imports, data reading,
   model load, tokenization, compilation, scoring, Parquet/JSON outputs). ``cold``: empty
   persistent compilation cache; ``warm``: the cache the cold run filled (``--process_runs``).
2. project, steady state: ``runner.score_ifd`` in this process, called twice on the same rows
   with one model and one jitted batch function; the second call's ``RunStats.seconds`` is
   reported. It includes tokenization, bucketing, host->device transfer, the device work and
   fetching results (the runner's whole loop); it excludes model loading, reading the data
   file, tracing/compilation and writing output files.
3. PyTorch batch of one: ``tests/torch_reference.ifd_one`` per sample (the published loop:
   ``tokenizer.encode`` + ``model(ids, labels=...)`` twice per sample) with transformers' model,
   over the first ``--torch_samples`` usable rows (one warm-up sample first, not timed).

Rates: samples/s (input rows), tokens/s (real tokens processed: direct + conditioned
sequences), useful model GFLOP/s and MFU. Useful FLOPs are the forward FLOPs of every
sequence (``bench/common.py``: ``n (L (2 P + 4 n nh d) + 2 V h)``), the same formula for both
sides (both run exactly these forwards). The torch loop may run a subset: compare its rates
(per sample, per token, per FLOP), not its seconds; tokens/s and GFLOP/s are the fairest.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
import numpy as np  # noqa: E402
import results  # noqa: E402
import torch_loop  # noqa: E402

DEFAULT_CONFIG = "configs/ifd_smollm2_sharegpt.py"


@contextlib.contextmanager
def shared_batch_fn() -> Iterator[None]:
    """Makes ``runner.make_batch_fn`` return one jitted function per (graphdef, chunk)."""
    from resofilter_jax.scoring import runner

    original, cache = runner.make_batch_fn, {}

    def make(graphdef: Any, *, chunk: int = 128) -> Any:
        key = (graphdef, chunk)
        if key not in cache:
            cache[key] = original(graphdef, chunk=chunk)
        return cache[key]

    runner.make_batch_fn = make
    try:
        yield
    finally:
        runner.make_batch_fn = original


def run_project(
    config: Any, tok: Any, records: list, model_path: str, dtype: str, param_dtype: str, calls: int
) -> dict[str, Any]:
    """``score_ifd`` ``calls`` times in this process; RunStats of each call and the IFD column."""
    import jax

    from resofilter_jax.models.loading import load_model
    from resofilter_jax.parallel import make_mesh
    from resofilter_jax.scoring import runner
    from resofilter_jax.scoring.runner import score_ifd

    t0 = time.perf_counter()
    lm = load_model(model_path, dtype=dtype, param_dtype=param_dtype, tokenizer=False)
    lm.model.scan_layers = bool(config.model.get("scan_layers", False))
    attention = common.configure_attention(config, lm.model)
    load_s = time.perf_counter() - t0
    devices = jax.local_devices()[: config.num_devices or None]
    stats, got = [], {}
    with shared_batch_fn(), common.precision_scope(config):
        for k in range(calls):
            print(f"[project] in-process {dtype} call {k + 1}/{calls} ...", file=sys.stderr)
            got = {}
            s = score_ifd(
                lm.model,
                tok,
                records,
                **runner.ifd_settings(config),
                mesh=make_mesh(devices),
                on_shard=got.__setitem__,
                progress=False,
            )
            stats.append(s.summary())
    scores = {}
    for cols in got.values():
        scores.update(zip(cols["index"], cols["ifd"], strict=True))
    return {
        "stats": stats,
        "scores": scores,
        "load_s": load_s,
        "attention": attention,
        "model_config": lm.config,
        "device_mb": common.jax_device_mb(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
    }


def run_torch(
    args: argparse.Namespace, tok: Any, records: list, model_path: str, max_length: int
) -> dict[str, Any]:
    """The published batch-of-one loop (``ifd_one``) over the first usable records, timed."""
    import torch
    from torch_reference import ifd_one

    device, sync = torch_loop.torch_setup(args)
    t0 = time.perf_counter()
    model = torch_loop.load_torch_model(model_path, args.torch_dtype, device)
    load_s = time.perf_counter() - t0
    lengths: list[int] = []
    torch_loop.attach_input_hook(model, device, lengths)
    recs = [r for r in records if r.ok][: args.torch_samples]
    if not recs:
        raise SystemExit("error: no usable record for the torch loop")
    print(f"[torch] batch of one, {len(recs)} samples on {device} ...", file=sys.stderr)
    ifd_one(tok, model, recs[0].instruction, recs[0].input, recs[0].output, max_length)
    lengths.clear()  # the warm-up sample is not counted
    times, scores = [], {}
    for r in recs:
        sync()
        t = time.perf_counter()
        out = ifd_one(tok, model, r.instruction, r.input, r.output, max_length)
        sync()
        times.append(time.perf_counter() - t)
        scores[r.index] = out["ifd"] if out else math.nan
    result = {
        "samples": len(recs),
        "seconds": float(np.sum(times)),
        "per_sample_s": times,
        "lengths": list(lengths),
        "scores": scores,
        "load_s": load_s,
        **torch_loop.torch_stats(device),
    }
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = common.parse_args(__doc__, config=DEFAULT_CONFIG, samples=128, torch_samples=32)
    model_path = common.asset_path(args.model_path, "smollm2")
    data_path = common.asset_path(args.data_path, "sharegpt")
    over = common.overrides_of(args, model_path, data_path)
    config = common.load_config(args.config, over)
    if config.method != "ifd":
        raise SystemExit(f"error: {args.config} is not an IFD config")
    wd = common.work_dir(args.work_dir)
    config.compilation_cache_dir = str(wd / "jax_cache")
    common.machine_block(args, model_path, config.token_budget or 4096)  # GEMM table rows

    from resofilter_jax.data import encode_ifd_pairs
    from resofilter_jax.data.sources import read_records
    from resofilter_jax.runtime import tune_allocator
    from resofilter_jax.scoring.ifd import ifd_sequences

    tok = common.load_tokenizer(model_path)
    records, _ = read_records(config, data_path)
    pairs = encode_ifd_pairs(records, tok, max_length=config.max_length, template=config.template)
    lengths = ifd_sequences(pairs).lengths  # every sequence the project scores

    procs = common.process_runs(
        args.process_runs, args.config, over, wd, common.child_env(args.jax_matmul_precision)
    )
    torch_r = None
    if args.torch_allocator == "tuned":
        tune_allocator()
    if args.torch_samples > 0:
        if config.template != "none":
            print("warning: the torch loop uses Superfiltering's prompt (template none)")
        torch_r = run_torch(args, tok, records, model_path, config.max_length)

    tune_allocator()  # the project runs as its commands do (resofilter_jax/runtime.py)
    import jax

    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    if args.jax_matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.jax_matmul_precision)
    proj = run_project(config, tok, records, model_path, args.dtype, args.param_dtype, calls=2)
    other = None
    if args.check_rankings:
        o = "float32" if args.dtype == "bfloat16" else "bfloat16"
        other = run_project(config, tok, records, model_path, o, o, calls=1)
    report(args, config, lengths, procs, proj, other, torch_r)
    if not args.keep_outputs:
        shutil.rmtree(wd, ignore_errors=True)


def report(
    args: argparse.Namespace,
    config: Any,
    lengths: list[int],
    procs: list[dict],
    proj: dict,
    other: dict | None,
    torch_r: dict | None,
) -> None:
    """Builds the measures (useful FLOPs = forwards of all sequences) and reports them."""
    fm = common.FlopModel.from_config(proj["model_config"])
    flops = float(sum(fm.forward(n) for n in lengths))
    peak, peak_note = common.peak_flops(
        proj["device_kind"],
        proj["platform"],
        args.dtype,
        cpu_gflops=args.cpu_peak_gflops,
        tflops=args.peak_tflops,
    )
    rows = [results.process_measure(r, flops, peak) for r in procs]
    first, steady = proj["stats"]
    rows.append(results.steady_measure("project in-process, 1st call", first, flops, peak))
    rows.append(
        results.steady_measure(
            "project steady state", steady, flops, peak, device_mb=proj["device_mb"]
        )
    )
    print(
        f"\nIFD scoring benchmark ({args.config}), {config.data.limit} rows, max_length "
        f"{config.max_length}, project {args.dtype} (params {args.param_dtype}) on "
        f"{proj['devices']}"
    )
    print(
        f"project peak: {peak_note}; real tokens {steady['tokens']}, padded "
        f"{steady['padded_tokens']}, {len(steady['shapes'])} batch shapes"
    )
    out: dict[str, Any] = {
        "args": vars(args),
        "versions": common.versions(),
        "peak": peak_note,
        "attention": proj.get("attention"),
        "matmul_precision": config.model.get("matmul_precision"),
    }
    scores = {"project": proj["scores"]}
    torch_m = None
    if torch_r is not None:
        tpeak, tnote = common.peak_flops(
            torch_r["device_kind"],
            "cpu" if torch_r["device"] == "cpu" else "gpu",
            args.torch_dtype,
            cpu_gflops=args.cpu_peak_gflops,
            tflops=args.peak_tflops,
        )
        tflops = float(sum(fm.forward(n) for n in torch_r["lengths"]))
        torch_m = results.Measure(
            "torch batch-of-one",
            torch_r["samples"],
            int(sum(torch_r["lengths"])),
            torch_r["seconds"],
            tflops,
            tpeak,
            executed_flops=tflops,
            host_rss_mb=torch_r["host_rss_mb"],
            device_mb=torch_r["device_mb"],
            extra={k: torch_r[k] for k in ("load_s", "per_sample_s", "lengths")},
        )
        scores["torch"] = torch_r["scores"]
        print(
            f"torch: {args.torch_dtype} on {torch_r['device_kind']}, {torch_r['threads']} "
            f"threads, tf32={torch_r['tf32']}, allocator {args.torch_allocator}; peak: {tnote}"
        )
    if other is not None:
        scores["other"] = other["scores"]
    notes = (
        "(GFLOP/s, MFU: useful model FLOPs = the forwards of all scored sequences, the same for "
        "both sides; RSS: peak host RSS of the scoring process (whole-process rows) / of this "
        "process up to the end of the torch phase; dev MB: peak device memory where reported)"
    )
    results.finish_report(args, rows, torch_m, scores, out, notes)


if __name__ == "__main__":
    main()

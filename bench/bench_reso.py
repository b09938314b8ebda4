"""Resonance scoring throughput: resofilter_jax's real scoring path vs the ResoFilter loop.

Usage (the commands behind the BENCHMARKS.md figures; run from the repository root):

    # CPU, fp32 and bf16 (bf16 also checks bf16-vs-fp32 rankings):
    python bench/bench_reso.py --samples 64 --torch_samples 16 --json reso_cpu_fp32.json
    python bench/bench_reso.py --samples 64 --torch_samples 16 --dtype bfloat16 \\
        --json reso_cpu_bf16.json
    # GPU (H100 / H200): copy ~/.cache/resofilter_jax (or pass --model_path/--data_path) first;
    # on a multi-GPU host add --set num_devices=1 (torch uses one GPU, JAX all by default)
    python bench/bench_reso.py --samples 1319 --torch_samples 128 --device gpu \\
        --json reso_gpu_fp32.json
    python bench/bench_reso.py --samples 1319 --torch_samples 128 --device gpu \\
        --dtype bfloat16 --json reso_gpu_bf16.json

One run measures, on the same model (SmolLM2-135M-Instruct from the embedded GGUF), data
(GSM8K test) and machine, with the recipe ``configs/reso_smollm2_gsm8k.py`` (ChatML,
max_length 768, ``mlp.up_proj.weight`` of the last 3 layers, AdamW lr 1e-5) and the flags as
config overrides:

1. project, whole process: ``python -m resofilter_jax.score --config ...`` in a fresh process
   into a fresh output dir; wall time from process start to exit (imports, data reading,
   model load, tokenization, compilation, scoring, Parquet/JSON outputs). ``cold``: empty
   persistent compilation cache; ``warm``: the cache the cold run filled (``--process_runs``).
2. project, steady state: ``reso_runner.score_resonance`` in this process, called twice on the
   same rows with one model and one jitted resonance function; the second call's
   ``RunStats.seconds`` is reported. It includes duplicate detection, tokenization, bucketing,
   host->device transfer, per-example gradients, the closed-form AdamW update and all features
   on device, and fetching the columns; it excludes model loading, reading the data file,
   tracing/compilation and writing output files.
3. PyTorch batch of one: ``tests/torch_resonance_reference.resonance_loop`` (the published
   loop: per sample restore the weights, fresh ``torch.optim.AdamW``, forward/backward on that
   sample alone, ``step()``, then the features of ``theta_before - theta_after``) over the first
   ``--torch_samples`` scorable examples, fed the project's token ids. By default every
   parameter requires grad and is stepped, as in the published loop (``--torch_chosen_only``:
   only the chosen matrices). One warm-up sample first, not timed. With ``--torch_dtype
   bfloat16`` the model runs in bf16 and the step is taken on fp32 copies of the chosen matrices
   (``torch.quantile`` of the features rejects bf16).

FLOPs per example of ``n`` tokens (formulas of ``bench/common.py``; ``K`` = layers from the
lowest chosen layer up, ``S`` = elements of the chosen matrices):

* useful = forward + backward through the LM head and the top ``K`` layers + chosen weight
  grads = ``n (L (2P + 4 n nh d) + 2Vh) + n (2Vh + K (2P + 8 n nh d) + 2 S)``. This is what the
  project needs (the backward stops at the lowest chosen layer) and is the figure behind
  GFLOP/s and MFU for BOTH sides.
* torch executed (published loop: every weight's gradient) = ``3 x forward`` (~ 6 N n), shown
  as "exec GF/s"; with ``--torch_chosen_only`` it equals the useful count.

Rates: samples/s, tokens/s (the SFT tokens of the scored examples), useful GFLOP/s, MFU. The
torch loop may run a subset: compare its rates (tokens/s, GFLOP/s are the fairest).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
import numpy as np  # noqa: E402
import results  # noqa: E402
import torch_loop  # noqa: E402

DEFAULT_CONFIG = "configs/reso_smollm2_gsm8k.py"
AGGREGATE = {"mean": np.mean, "sum": np.sum, "max": np.max}


class TimedItems(Sequence):
    """The examples, stamping the time (after a device sync) as each one is taken.

    ``resonance_loop`` iterates over its examples once, so the stamps delimit the per-sample
    work (restore, optimizer, forward/backward, step, features) without its one-time setup.
    """

    def __init__(self, items: Sequence[Any], sync: Callable[[], None]) -> None:
        self.items, self.sync, self.marks = list(items), sync, []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.items[i]

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.sync()
            self.marks.append(time.perf_counter())
            yield item
        self.sync()
        self.marks.append(time.perf_counter())


def chosen_names(config: Any, names: Sequence[str]) -> list[str]:
    """The matrices ``config.resonance`` chooses among ``names`` (as ``spec_from_config``)."""
    from resofilter_jax.scoring.param_select import select_params

    r = config.resonance
    if r.pattern:
        return select_params(names, pattern=r.pattern)
    return select_params(names, param_type=r.params_type, last_k=r.last_k or None)


def scorable(config: Any, tok: Any, records: list) -> list[tuple[int, Any]]:
    """(record index, SFT example) of every row the project scores (not a duplicate, ok)."""
    from resofilter_jax.data import encode_sft_examples
    from resofilter_jax.scoring.record_stream import duplicate_of

    keep = [r for r, d in zip(records, duplicate_of(records), strict=True) if d < 0]
    ex = encode_sft_examples(keep, tok, max_length=config.max_length, template=config.template)
    return [(r.index, e) for r, e in zip(keep, ex, strict=True) if e.status == "ok"]


@contextlib.contextmanager
def shared_resonance_fn() -> Iterator[None]:
    """Makes ``reso_runner.make_resonance_fn`` return one jitted function per (model, spec)."""
    from resofilter_jax.scoring import reso_runner

    original, cache = reso_runner.make_resonance_fn, {}

    def make(model: Any, spec: Any, *, data_shards: int = 1) -> Any:
        key = (id(model), id(spec), data_shards)  # both stay alive while the cache does
        if key not in cache:
            cache[key] = original(model, spec, data_shards=data_shards)
        return cache[key]

    reso_runner.make_resonance_fn = make
    try:
        yield
    finally:
        reso_runner.make_resonance_fn = original


def run_project(
    config: Any, tok: Any, records: list, model_path: str, dtype: str, param_dtype: str, calls: int
) -> dict[str, Any]:
    """``score_resonance`` ``calls`` times in this process; RunStats, scores, chosen sizes."""
    import jax

    from resofilter_jax.models.loading import load_model
    from resofilter_jax.models.registry import named_params
    from resofilter_jax.parallel import make_mesh
    from resofilter_jax.scoring import reso_runner

    t0 = time.perf_counter()
    lm = load_model(model_path, dtype=dtype, param_dtype=param_dtype, tokenizer=False)
    lm.model.scan_layers = bool(config.model.get("scan_layers", False))
    attention = common.configure_attention(config, lm.model)
    load_s = time.perf_counter() - t0
    cfg = config.copy_and_resolve_references()
    cfg.model.dtype = dtype
    spec = reso_runner.spec_from_config(cfg, lm.model)
    devices = jax.local_devices()[: config.num_devices or None]
    stats, got = [], {}
    with shared_resonance_fn(), common.precision_scope(config):
        for k in range(calls):
            print(f"[project] in-process {dtype} call {k + 1}/{calls} ...", file=sys.stderr)
            got = {}
            s = reso_runner.score_resonance(
                lm.model,
                tok,
                records,
                spec,
                max_length=config.max_length,
                template=config.template,
                token_budget=config.token_budget,
                min_bucket=config.min_bucket,
                bucket_step=config.get("bucket_step", 0),
                pack=config.get("pack", True),
                max_segments=config.resonance.get("max_segments", 8),
                shard_size=config.shard_size,
                mesh=make_mesh(devices),
                on_shard=got.__setitem__,
                progress=False,
            )
            stats.append(s.summary())
    scores = {}
    for cols in got.values():
        scores.update(zip(cols["index"], cols["score"], strict=True))
    params = named_params(lm.model)
    return {
        "stats": stats,
        "scores": scores,
        "load_s": load_s,
        "attention": attention,
        "model_config": lm.config,
        "params": list(spec.params),
        "chosen_size": int(sum(params[p].size for p in spec.params)),
        "device_mb": common.jax_device_mb(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
    }


def run_torch(
    args: argparse.Namespace, config: Any, examples: list[tuple[int, Any]], model_path: str
) -> dict[str, Any]:
    """The published loop (``resonance_loop``) over the first examples, timed per sample."""
    import torch
    from torch_resonance_reference import resonance_loop

    device, sync = torch_loop.torch_setup(args)
    t0 = time.perf_counter()
    model = torch_loop.load_torch_model(model_path, args.torch_dtype, device)
    load_s = time.perf_counter() - t0
    names = chosen_names(config, [n for n, _ in model.named_parameters()])
    lengths: list[int] = []
    torch_loop.attach_input_hook(model, device, lengths)
    todo = examples[: args.torch_samples]
    if not todo:
        raise SystemExit("error: no scorable example for the torch loop")
    pairs = [(e.ids, e.labels) for _, e in todo]
    dtype = getattr(torch, args.torch_dtype)
    r = config.resonance
    default_wd = 0.01 if r.rule == "adamw" else 0.0  # weight_decay -1: torch's default
    kw = {
        "dtype": dtype,
        "optimizer": r.rule,
        "lr": float(r.lr),
        "weight_decay": float(r.weight_decay) if r.weight_decay >= 0 else default_wd,
        "all_params": not args.torch_chosen_only,
        "step_dtype": torch.float32 if dtype != torch.float32 else None,
    }
    print(f"[torch] batch of one, {len(todo)} samples on {device} ...", file=sys.stderr)
    with torch.device(device) if device != "cpu" else contextlib.nullcontext():
        resonance_loop(model, pairs[:1], names, **kw)  # warm-up, not counted
        lengths.clear()
        timed = TimedItems(pairs, sync)
        res = resonance_loop(model, timed, names, **kw)
    times = np.diff(timed.marks)
    agg = AGGREGATE[r.aggregate]
    scores = {
        i: float(agg([x["features"][n]["mean_abs"] for n in names]))
        for (i, _), x in zip(todo, res, strict=True)
    }
    out = {
        "samples": len(todo),
        "seconds": float(times.sum()),
        "per_sample_s": times.tolist(),
        "lengths": list(lengths),
        "scores": scores,
        "names": names,
        "load_s": load_s,
        **torch_loop.torch_stats(device),
    }
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def extra_args(ap: argparse.ArgumentParser) -> None:
    """The resonance bench's own flag."""
    ap.add_argument(
        "--torch_chosen_only",
        action="store_true",
        help="torch: only the chosen matrices require grad (default: all, as published)",
    )


def main() -> None:
    args = common.parse_args(
        __doc__, config=DEFAULT_CONFIG, samples=64, torch_samples=16, extra=extra_args
    )
    model_path = common.asset_path(args.model_path, "smollm2")
    data_path = common.asset_path(args.data_path, "gsm8k")
    over = common.overrides_of(args, model_path, data_path)
    config = common.load_config(args.config, over)
    if config.method != "resonance":
        raise SystemExit(f"error: {args.config} is not a resonance config")
    wd = common.work_dir(args.work_dir)
    config.compilation_cache_dir = str(wd / "jax_cache")
    common.machine_block(args, model_path, 4096)  # GEMMs at 4096 token rows

    from resofilter_jax.data.sources import read_records
    from resofilter_jax.runtime import tune_allocator

    tok = common.load_tokenizer(model_path)
    records, _ = read_records(config, data_path)
    examples = scorable(config, tok, records)
    lengths = [len(e.ids) for _, e in examples]

    env = common.child_env(args.jax_matmul_precision)
    procs = common.process_runs(args.process_runs, args.config, over, wd, env)
    if args.torch_allocator == "tuned":
        tune_allocator()
    torch_r = run_torch(args, config, examples, model_path) if args.torch_samples > 0 else None
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
    """Prints the table, ratios and ranking checks; writes --json."""
    from resofilter_jax.scoring.param_select import layer_index

    fm = common.FlopModel.from_config(proj["model_config"])
    idx = [layer_index(p) for p in proj["params"]]
    crossed = fm.layers - min((i for i in idx if i is not None), default=0)
    size = proj["chosen_size"]

    def useful(n: int) -> float:
        return fm.forward(n) + fm.partial_backward(n, crossed, size)

    flops = float(sum(useful(n) for n in lengths))
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
        f"\nResonance scoring benchmark ({args.config}), {config.data.limit} rows "
        f"({len(lengths)} scorable), max_length {config.max_length}, project {args.dtype} "
        f"(params {args.param_dtype}) on {proj['devices']}"
    )
    print(
        f"chosen: {len(proj['params'])} matrices ({size} elements), backward crosses {crossed} "
        f"of {fm.layers} layers; project peak: {peak_note}"
    )
    print(
        f"real tokens {steady['tokens']}, padded {steady['padded_tokens']}, "
        f"{len(steady['shapes'])} batch shapes"
    )
    out: dict[str, Any] = {
        "args": vars(args),
        "versions": common.versions(),
        "peak": peak_note,
        "attention": proj.get("attention"),
        "matmul_precision": config.model.get("matmul_precision"),
        "flops": {"crossed_layers": crossed, "chosen_size": size, "params": proj["params"]},
    }
    scores = {"project": proj["scores"]}
    torch_m = None
    if torch_r is not None:
        if torch_r["names"] != proj["params"]:
            print(f"warning: torch chose {torch_r['names']}, project {proj['params']}")
        tpeak, tnote = common.peak_flops(
            torch_r["device_kind"],
            "cpu" if torch_r["device"] == "cpu" else "gpu",
            args.torch_dtype,
            cpu_gflops=args.cpu_peak_gflops,
            tflops=args.peak_tflops,
        )
        tl = torch_r["lengths"]
        executed = sum(useful(n) if args.torch_chosen_only else fm.train_step(n) for n in tl)
        torch_m = results.Measure(
            "torch batch-of-one",
            torch_r["samples"],
            int(sum(tl)),
            torch_r["seconds"],
            float(sum(useful(n) for n in tl)),
            tpeak,
            executed_flops=float(executed),
            host_rss_mb=torch_r["host_rss_mb"],
            device_mb=torch_r["device_mb"],
            extra={k: torch_r[k] for k in ("load_s", "per_sample_s", "lengths")},
        )
        scores["torch"] = torch_r["scores"]
        step = "fp32 copies of the chosen matrices" if args.torch_dtype != "float32" else "fp32"
        grads = "the chosen matrices" if args.torch_chosen_only else "all parameters"
        print(
            f"torch: {args.torch_dtype} on {torch_r['device_kind']}, {torch_r['threads']} "
            f"threads, tf32={torch_r['tf32']}, allocator {args.torch_allocator}, "
            f"grads of {grads}, AdamW step in {step}; "
            f"peak: {tnote}"
        )
    if other is not None:
        scores["other"] = other["scores"]
    notes = (
        "(GFLOP/s, MFU: useful FLOPs = forward + backward down to the lowest chosen layer, the "
        "same formula for both sides; exec GF/s: FLOPs the torch loop executes; RSS: peak host "
        "RSS of the scoring process (whole-process rows) / of this process up to the end of the "
        "torch phase; dev MB: peak device memory where reported)"
    )
    results.finish_report(args, rows, torch_m, scores, out, notes)


if __name__ == "__main__":
    main()

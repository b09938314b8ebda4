"""The IFD host pipeline alone (no model): read, tokenize, pack, plan and collate, on ShareGPT.

    python bench/bench_host.py --rows 4000 --workers 1,2 [--json out.json]

For each worker count, the same work the IFD runner does on the host for every shard
(``encode_ifd_pairs`` with ``workers`` tokenizing threads, ``ifd_sequences``,
``pack_sequences``, ``plan_batches``, ``collate_packed``), shard by shard, timed per stage.
"Real tokens" are the tokens of the direct and conditioned sequences the device scores (no
padding). Then the arithmetic: the IFD tokens/s one accelerator consumes at a given MFU for
the model (``model_flops_per_token`` at the mean sequence length, forward only), and how many
host cores at the measured per-core rate keep it busy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # threads are ours (host.workers)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ifd_smollm2_sharegpt.py")
    p.add_argument("--rows", type=int, default=4000, help="input rows (data.limit)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--model_path", default="", help="default: the embedded SmolLM2 GGUF")
    p.add_argument("--data_path", default="", help="default: the embedded ShareGPT file")
    p.add_argument("--device_peak_tflops", type=float, default=989.0, help="H100 SXM bf16")
    p.add_argument("--mfu", type=float, default=0.5, help="device MFU assumed for the arithmetic")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per worker count (best)")
    p.add_argument("--cache_dir", default="", help="also time a cold and a warm encoded cache")
    p.add_argument("--json", default="")
    return p.parse_args()


def host_pass(config, records, tokenizer, workers: int, cache=None) -> dict[str, float]:
    """One pass of the runner's host work over ``records``: seconds per stage, real tokens."""
    from resofilter_jax.data import (
        collate_packed,
        encode_ifd_pairs,
        pack_sequences,
        packed_lengths,
        plan_batches,
    )
    from resofilter_jax.scoring.ifd import ifd_sequences
    from resofilter_jax.scoring.shard_loop import length_buckets, resolve_token_budget

    t = {"encode": 0.0, "pack_plan": 0.0, "collate": 0.0, "tokens": 0, "rows": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for lo in range(0, len(records), config.shard_size):
        recs = records[lo : lo + config.shard_size]
        t0 = time.perf_counter()

        def encode(recs=recs):
            return encode_ifd_pairs(
                recs, tokenizer, max_length=config.max_length, template=config.template,
                workers=workers,
            )  # fmt: skip

        pairs = cache.get_or_encode(lo, lo + len(recs), len(recs), encode) if cache else encode()
        t1 = time.perf_counter()
        seq = ifd_sequences(pairs)
        buckets = length_buckets(
            seq.lengths, config.max_length, config.min_bucket, config.bucket_step
        )
        rows = pack_sequences(seq.lengths, buckets, pack=config.pack)
        lengths = packed_lengths(rows, seq.lengths)
        plans = plan_batches(
            lengths,
            buckets=length_buckets(
                lengths, config.max_length, config.min_bucket, config.bucket_step
            ),
            token_budget=resolve_token_budget(config.token_budget, "cpu"),
            pow2_tail=True,
        )
        t2 = time.perf_counter()
        for plan in plans:
            collate_packed(plan, rows, seq.seqs, seq.starts, pad)
        t3 = time.perf_counter()
        t["encode"] += t1 - t0
        t["pack_plan"] += t2 - t1
        t["collate"] += t3 - t2
        t["tokens"] += int(sum(seq.lengths))
        t["rows"] += len(recs)
    t["total"] = t["encode"] + t["pack_plan"] + t["collate"]
    return t


def main() -> None:
    args = parse_args()
    from resofilter_jax.data.sources import read_records

    model_path = common.asset_path(args.model_path, "smollm2")
    data_path = common.asset_path(args.data_path, "sharegpt")
    config = common.load_config(args.config, {"data.limit": args.rows})
    tokenizer = common.load_tokenizer(model_path)
    t0 = time.perf_counter()
    records, _ = read_records(config, data_path)
    read_s = time.perf_counter() - t0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(records)} records read in {read_s:.2f} s; {cores} cores may be used", flush=True)
    results = {}
    for w in (int(x) for x in args.workers.split(",")):
        passes = [host_pass(config, records, tokenizer, w) for _ in range(args.repeats)]
        best = min(passes, key=lambda p: p["total"])
        best["tokens_per_s"] = best["tokens"] / best["total"]
        best["tokens_per_s_per_worker"] = best["tokens_per_s"] / w
        results[w] = best
        print(
            f"workers={w}: {best['tokens']} real tokens in {best['total']:.2f} s "
            f"(encode {best['encode']:.2f}, pack+plan {best['pack_plan']:.2f}, collate "
            f"{best['collate']:.2f}) = {best['tokens_per_s']:,.0f} tokens/s, "
            f"{best['tokens_per_s_per_worker']:,.0f} per worker",
            flush=True,
        )
    cache_runs = {}
    if args.cache_dir:
        import shutil

        from resofilter_jax.data.encoded_cache import EncodedCache

        shutil.rmtree(args.cache_dir, ignore_errors=True)
        w = max(results)
        for label in ("cold", "warm"):
            cache = EncodedCache(
                args.cache_dir, kind="ifd", tokenizer=tokenizer, template=config.template,
                settings={"max_length": config.max_length}, data={"path": data_path},
            )  # fmt: skip
            t0 = time.perf_counter()
            r = host_pass(config, records, tokenizer, w, cache)
            r["with_key_s"] = time.perf_counter() - t0  # incl. hashing the tokenizer
            cache_runs[label] = r
            print(
                f"encoded cache {label} ({w} workers): encode {r['encode']:.3f} s, whole pass "
                f"{r['with_key_s']:.2f} s",
                flush=True,
            )
        ratio = cache_runs["warm"]["encode"] / cache_runs["cold"]["encode"]
        print(f"re-run (warm cache): {ratio:.1%} of the first run's tokenization time")
    one = results.get(1)
    if one is not None:
        for w, r in results.items():
            if w > 1:
                print(f"speed-up with {w} workers: {r['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    from resofilter_jax.dry_run import model_config_of

    cfg = model_config_of(model_path)  # the architecture only
    seq = one["tokens"] / max(1, 2 * one["rows"]) if one else 512
    flops = common.model_flops_per_token(cfg, int(seq))
    device_tps = args.device_peak_tflops * 1e12 * args.mfu / flops
    per_core = (one or next(iter(results.values())))["tokens_per_s_per_worker"]
    print(
        f"roofline: {cfg.model_type} forward {flops / 1e6:.1f} MFLOP/token at mean sequence "
        f"{seq:.0f}; {args.device_peak_tflops:g} TFLOP/s x {args.mfu:.0%} MFU = "
        f"{device_tps:,.0f} IFD tokens/s per device; at {per_core:,.0f} tokens/s per host "
        f"core that is {device_tps / per_core:.1f} host cores per device"
    )
    if args.json:
        common.write_json(
            args.json,
            {
                "args": vars(args),
                "machine": platform.processor() or platform.machine(),
                "records": len(records),
                "read_s": read_s,
                "workers": {str(w): r for w, r in results.items()},
                "encoded_cache": cache_runs,
                "roofline": {
                    "flops_per_token": flops,
                    "device_tokens_per_s": device_tps,
                    "host_cores_per_device": device_tps / per_core,
                },
                "versions": common.versions(),
            },
        )


if __name__ == "__main__":
    main()

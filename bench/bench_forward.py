"""Forward + loss throughput: resofilter_jax (batched, jit) vs transformers PyTorch (batch of one).

The workload of every scorer: next-token cross-entropy of real ShareGPT sequences under
SmolLM2-135M-Instruct. Both sides see the same token sequences (truncated to --length) in the
same run; the ratio is what BENCHMARKS.md records.

    python bench/bench_forward.py --samples 16 --length 512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resofilter_jax import assets
from resofilter_jax.data import load_records
from resofilter_jax.models.loading import load_model
from resofilter_jax.scoring.losses import sequence_losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_flops_per_token  # noqa: E402


def _sequences(tokenizer, n: int, length: int) -> np.ndarray:
    records, _ = load_records(
        assets.sharegpt_json(), "sharegpt", allow_truncated=True, on_error="status"
    )
    texts = [f"{r.instruction}\n{r.output}" for r in records if r.status == "ok"]
    ids = [x for x in tokenizer(texts[: 20 * n]).input_ids if len(x) >= length][:n]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} ShareGPT samples have >= {length} tokens")
    return np.asarray([x[:length] for x in ids], np.int32)  # [n, length]


def bench_jax(path: str, seqs: np.ndarray, batch: int, dtype: str) -> dict[str, float]:
    """Batched, jit-compiled loss over `seqs`; returns compile and steady-state timings."""
    lm = load_model(path, dtype=dtype, param_dtype=dtype, tokenizer=False)
    graphdef, state = nnx.split(lm.model)

    @jax.jit
    def losses(state, ids):
        mask = jnp.ones_like(ids)
        return sequence_losses(nnx.merge(graphdef, state), ids, mask, mask.astype(jnp.float32))

    batches = [seqs[i : i + batch] for i in range(0, len(seqs) - batch + 1, batch)]
    t0 = time.perf_counter()
    jax.block_until_ready(losses(state, batches[0]))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = [losses(state, b) for b in batches]
    jax.block_until_ready(outs)
    steady = time.perf_counter() - t0
    return {"compile_s": compile_s, "seconds": steady, "samples": batch * len(batches)}


def bench_torch(path: str, seqs: np.ndarray) -> dict[str, float]:
    """The published pattern: one sample at a time, `model(ids, labels=ids).loss`."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.rsplit("/", 1)[0]), gguf_file=path.rsplit("/", 1)[1]
    ).eval()
    with torch.no_grad():
        x = torch.from_numpy(seqs[:1].astype(np.int64))
        model(x, labels=x)  # warm-up
        t0 = time.perf_counter()
        for row in seqs:
            x = torch.from_numpy(row[None].astype(np.int64))
            model(x, labels=x).loss.item()
        steady = time.perf_counter() - t0
    return {"seconds": steady, "samples": len(seqs), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    path = str(assets.smollm2_gguf())
    lm = load_model(path, tokenizer=True)
    seqs = _sequences(lm.tokenizer, args.samples, args.length)
    flops = model_flops_per_token(lm.config, args.length) * seqs.size
    result = {
        "machine": f"{platform.node()} {platform.processor()}",
        "devices": [str(d) for d in jax.devices()],
        "samples": args.samples,
        "length": args.length,
        "batch": args.batch,
    }
    torch_r = bench_torch(path, seqs)
    result["torch_batch_of_one"] = {
        **torch_r,
        "samples_per_s": torch_r["samples"] / torch_r["seconds"],
        "gflop_s": flops / torch_r["seconds"] / 1e9,
    }
    for dtype in args.dtypes.split(","):
        r = bench_jax(path, seqs, args.batch, dtype)
        sps = r["samples"] / r["seconds"]
        result[f"jax_{dtype}"] = {
            **r,
            "samples_per_s": sps,
            "gflop_s": flops * r["samples"] / len(seqs) / r["seconds"] / 1e9,
            "ratio_vs_torch": sps / result["torch_batch_of_one"]["samples_per_s"],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

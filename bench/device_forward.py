"""Device-only forward + loss throughput of the scoring model: no tokenizer, no host pipeline.

The IFD benchmark (`bench_ifd.py`) times the whole scoring loop, host tokenization included;
this one times only what the accelerator does per batch (the jitted forward + chunked
cross-entropy of `scoring.losses.sequence_losses` on full rows of random token ids), for each
attention backend given, so MFU of the model compute itself is visible:

    python bench/device_forward.py --batch 64 --length 1024 --dtype bfloat16 \\
        --backends auto,reference,xla,cudnn,pallas_gpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FlopModel, peak_flops  # noqa: E402

from resofilter_jax import assets  # noqa: E402
from resofilter_jax.models.attention import configure_attention  # noqa: E402
from resofilter_jax.models.loading import load_model  # noqa: E402
from resofilter_jax.models.precision import matmul_precision_scope  # noqa: E402
from resofilter_jax.scoring.losses import sequence_losses  # noqa: E402


def time_backend(lm, backend: str, ids: jax.Array, mask: jax.Array, iters: int) -> dict:
    """Compile and time one backend; returns seconds per batch and the loss checksum."""
    info = configure_attention(lm.model, backend, packed=False)
    graphdef, state = nnx.split(lm.model)  # weights are jit arguments, never constants

    @jax.jit
    def step(state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        loss_sum, count = sequence_losses(model, ids, mask, mask.astype(jnp.float32))
        return jnp.sum(loss_sum) / jnp.sum(count)

    t0 = time.perf_counter()
    first = float(step(state, ids, mask))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        out = step(state, ids, mask)
    out.block_until_ready()
    return {
        **info,
        "seconds_per_batch": (time.perf_counter() - t0) / iters,
        "compile_s": compile_s,
        "mean_loss": first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model_path", default="")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--matmul_precision", default="default")
    ap.add_argument("--backends", default="auto,reference,xla")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    path = args.model_path or str(assets.smollm2_gguf())
    lm = load_model(path, dtype=args.dtype, param_dtype=args.dtype, tokenizer=False)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, lm.config.vocab_size, (args.batch, args.length)), jnp.int32)
    mask = jnp.ones_like(ids)
    dev = jax.devices()[0]
    peak, peak_note = peak_flops(dev.device_kind, dev.platform, args.dtype)
    flops = args.batch * FlopModel.from_config(lm.config).forward(args.length)
    rows = []
    with matmul_precision_scope(args.matmul_precision):
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            try:
                r = time_backend(lm, backend, ids, mask, args.iters)
            except Exception as e:  # report and go on with the next backend
                print(f"{backend}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append({"requested": backend, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            r["tokens_per_s"] = args.batch * args.length / r["seconds_per_batch"]
            r["mfu"] = flops / r["seconds_per_batch"] / peak
            rows.append(r)
            print(
                f"{backend:>10} -> {r['backend']:<10} {r['tokens_per_s']:>12,.0f} tok/s "
                f"MFU {100 * r['mfu']:5.1f}%  {1e3 * r['seconds_per_batch']:7.1f} ms/batch "
                f"compile {r['compile_s']:5.1f} s  loss {r['mean_loss']:.5f}",
                flush=True,
            )
    head = f"{dev.device_kind} {args.dtype} [{args.batch}, {args.length}] peak {peak_note}"
    print(head)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""fp32 GEMM rate of XLA (jit) and of torch, interleaved in one process: the per-FLOP ceiling.

Both scorers are matmul-bound, so how fast each framework multiplies matrices on this machine
bounds how far batching can put the project ahead of a batch-of-one PyTorch loop. Shapes: a
square GEMM, an MLP projection of SmolLM2 at 8 x 1024 tokens, and an LM-head chunk.

    python bench/bench_matmul.py --rounds 8
    XLA_FLAGS=--xla_cpu_use_onednn=true python bench/bench_matmul.py   # compare XLA flags
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = ((2048, 2048, 2048), (8192, 576, 1536), (1024, 576, 49152))  # (m, k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timings per shape")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    from resofilter_jax.runtime import tune_allocator

    tune_allocator()  # before JAX and torch allocate: both sides get the same allocator
    import jax
    import jax.numpy as jnp
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)  # [m, k]
        b = rng.standard_normal((k, n)).astype(np.float32)  # [k, n]
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        matmul = jax.jit(lambda x, y: x @ y)
        matmul(ja, jb).block_until_ready()  # compile + warm-up
        ta @ tb
        t_jax, t_torch = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            matmul(ja, jb).block_until_ready()
            t_jax.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ta @ tb
            t_torch.append(time.perf_counter() - t0)
        flops = 2.0 * m * k * n
        rate = {
            name: (flops / min(t) / 1e9, flops / float(np.median(t)) / 1e9)
            for name, t in (("XLA", t_jax), ("torch", t_torch))
        }
        print(
            f"[{m}x{k}] @ [{k}x{n}]: XLA {rate['XLA'][0]:6.1f} GFLOP/s best "
            f"({rate['XLA'][1]:6.1f} median), torch {rate['torch'][0]:6.1f} best "
            f"({rate['torch'][1]:6.1f} median)"
        )


if __name__ == "__main__":
    main()

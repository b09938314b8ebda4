"""Which machine a benchmark ran on: CPU model, ISA flags, and a GEMM table from one process.

Every benchmark prints this block at the top of its run, so each figure says where it was
measured (issue 13: bf16 speed on CPU depends on the CPU's bf16 units, AVX512_BF16 / AMX).

    python bench/machine.py                              # issue 13's four GEMMs (< 60 s, 2 cores)
    python bench/machine.py --shapes 4096x576x1536,2048x2048x2048 --repeats 5
    python bench/machine.py --model smollm2 --tokens 4096  # a model's own GEMMs at 4096 rows
    python bench/machine.py --torch_device cuda --json machine.json

What is measured: for each (M, K, N) GEMM ``[M, K] @ [K, N]``, in one process, interleaved
(every round runs each kind once, in turn), each compiled and warmed first:

* ``xla_fp32``: ``jnp.dot`` of fp32 operands, ``precision=HIGHEST`` (true fp32 on any backend);
* ``xla_bf16_f32acc``: bf16 operands, fp32 accumulation and result
  (``lax.dot_general(..., preferred_element_type=float32)``: the project's precision contract);
* ``xla_bf16_bf16out``: bf16 operands, bf16 result (``jnp.dot`` of bf16 arrays; what the
  code did before the contract, which XLA:CPU runs at fp32 speed);
* ``torch_fp32``: ``torch.matmul`` of fp32 tensors (torch's own TF32 setting left as it is);
* ``torch_bf16``: ``torch.matmul`` of bf16 tensors (bf16 result; on a CPU oneDNN's kernels,
  which use AVX512_BF16 / AMX where the CPU has them): a second library's bf16 GEMMs on the
  same machine, so that a GEMM ceiling is not only XLA's kernels' (``best_bf16`` below).

Rates are ``2 M K N / median(seconds)`` in GFLOP/s, each timed call ending in a device sync
(``block_until_ready`` / ``torch.cuda.synchronize``); operands are made and cast before timing.
``bench/bench_matmul.py`` measures fp32 only and keeps its timing inline in ``main()``, so
there is nothing there to import; this module is the shared version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

Shape = tuple[int, int, int]  # (M, K, N)

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# Issue 13's table (SmolLM2 projections at 4096 rows, a square GEMM, a 12288-wide head chunk).
DEFAULT_SHAPES: tuple[Shape, ...] = (
    (2048, 2048, 2048),
    (4096, 576, 1536),
    (4096, 1536, 576),
    (4096, 576, 12288),
)
KINDS: dict[str, str] = {  # key -> column title
    "xla_fp32": "XLA fp32",
    "xla_bf16_f32acc": "XLA bf16,f32acc",
    "xla_bf16_bf16out": "XLA bf16,bf16out",
    "torch_fp32": "torch fp32",
    "torch_bf16": "torch bf16",
}
BF16_KINDS = ("xla_bf16_f32acc", "torch_bf16")  # bf16 GEMM kernels with fp32 accumulation
BEST_BF16 = "best_bf16"  # per GEMM, the faster of BF16_KINDS (forward_gemm_rates)


# --------------------------------------------------------------------------- CPU facts


def _run(cmd: Sequence[str]) -> str:
    """stdout of ``cmd``, or "" when it is missing or fails."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _field(text: str, *names: str) -> str:
    """The value of the first ``name : value`` line of ``text`` whose name is in ``names``."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in names:
            return value.strip()
    return ""


def cpu_facts() -> dict[str, Any]:
    """CPU model, the cores this process may use, and the ISA flags that matter for GEMMs.

    Linux: ``/proc/cpuinfo`` (else ``lscpu``); macOS: ``sysctl``; elsewhere what ``platform``
    knows. ``flags`` maps each of :data:`ISA_FLAGS` to a bool (all False where unknown).
    """
    model, flags, source = "", set(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text(errors="replace")
        model = _field(text, "model name", "hardware", "cpu model")
        flags = set(_field(text, "flags", "features").split())
        source = "/proc/cpuinfo"
    if not model or not flags:
        text = _run(["lscpu"])
        model = model or _field(text, "model name")
        flags = flags or set(_field(text, "flags").split())
        source = source or ("lscpu" if text else "")
    if not model and sys.platform == "darwin":
        model = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
        source = "sysctl"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    return {
        "model": model or platform.processor() or "unknown",
        "cores": cores,
        "cpu_count": os.cpu_count(),
        "flags": {f: f in flags for f in ISA_FLAGS},
        "arch": platform.machine(),
        "os": platform.system(),
        "source": source or "platform",
    }


def runtime_facts(torch_device: str = "cpu") -> dict[str, Any]:
    """JAX backend and device, torch version and threads, XLA_FLAGS (imports both)."""
    import jax
    import torch

    dev = jax.devices()[0]
    out = {
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": dev.device_kind,
        "jax_devices": jax.device_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_device": torch_device,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if torch_device.startswith("cuda"):
        out["torch_device_name"] = torch.cuda.get_device_name()
        out["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


# --------------------------------------------------------------------------- GEMM table


def model_gemm_shapes(cfg: Any, tokens: int, head_tokens: int = 0) -> dict[str, Shape]:
    """{label: (M, K, N)} of the GEMMs a model issues on ``tokens`` rows (one layer + head).

    ``cfg`` is a ``resofilter_jax`` ModelConfig. Projections with the same shape share a row
    (label ``q_proj+o_proj``); GPT-2 has a fused q/k/v projection and a 2-matrix MLP.
    ``head_tokens``: rows of the LM-head GEMM (0: ``tokens``). The project's cross-entropy
    computes the head in sequence chunks, ``rows x ce_chunk`` at a time: pass that to table the
    GEMM it really issues (and keep a big vocabulary's row cheap to measure).
    """
    h, d, t = cfg.hidden_size, cfg.head_dim, int(tokens)
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    if getattr(cfg, "arch", "") == "gpt2":
        named = [
            ("c_attn", (t, h, 3 * h)),
            ("attn.c_proj", (t, h, h)),
            ("c_fc", (t, h, inter)),
            ("mlp.c_proj", (t, inter, h)),
        ]
    else:
        named = [
            ("q_proj", (t, h, q)),
            ("k_proj", (t, h, kv)),
            ("v_proj", (t, h, kv)),
            ("o_proj", (t, q, h)),
            ("gate_proj", (t, h, inter)),
            ("up_proj", (t, h, inter)),
            ("down_proj", (t, inter, h)),
        ]
    named.append(("lm_head", (int(head_tokens) or t, h, cfg.vocab_size)))
    by_shape: dict[Shape, list[str]] = {}
    for name, shape in named:
        by_shape.setdefault(shape, []).append(name)
    return {"+".join(names): shape for shape, names in by_shape.items()}


def parse_shapes(text: str) -> list[Shape]:
    """``"MxKxN,MxKxN"`` -> [(M, K, N), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        dims = [int(x) for x in re.split(r"[xX*]", item)]
        if len(dims) != 3:
            raise ValueError(f"a GEMM shape is MxKxN, got {item!r}")
        out.append((dims[0], dims[1], dims[2]))
    return out


def _kernels(torch_device: str) -> dict[str, Callable[[Any, Any], Any]]:
    """{kind: f(a, b) that multiplies and waits for the result}, for every kind of KINDS."""
    import jax
    import jax.numpy as jnp
    import torch

    dims = (((1,), (0,)), ((), ()))
    hi, lo = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
    # bf16 kinds pin DEFAULT: an ambient jax.default_matmul_precision must not change them.
    f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision=hi))
    acc = jax.jit(
        lambda a, b: jax.lax.dot_general(
            a, b, dims, precision=lo, preferred_element_type=jnp.float32
        )
    )
    b16 = jax.jit(lambda a, b: jnp.dot(a, b, precision=lo))
    sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)

    def torch_mm(a: Any, b: Any) -> Any:
        y = torch.matmul(a, b)
        sync()
        return y

    return {
        "xla_fp32": lambda a, b: f32(a, b).block_until_ready(),
        "xla_bf16_f32acc": lambda a, b: acc(a, b).block_until_ready(),
        "xla_bf16_bf16out": lambda a, b: b16(a, b).block_until_ready(),
        "torch_fp32": torch_mm,
        "torch_bf16": torch_mm,
    }


def gemm_table(
    shapes: Sequence[Shape] | Mapping[str, Shape],
    repeats: int = 3,
    *,
    torch_device: str = "cpu",
    kinds: Sequence[str] = tuple(KINDS),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """GFLOP/s of every kind of :data:`KINDS` on every GEMM, timed interleaved in this process.

    Args:
        shapes: (M, K, N) tuples, or {label: (M, K, N)} (e.g. :func:`model_gemm_shapes`).
        repeats: timed rounds per shape (after one warm-up/compile call per kind); the median.
        torch_device: where the torch operands live (``cpu`` or ``cuda``); JAX uses its default
            device.
    Returns:
        Per shape: ``label``, ``m``, ``k``, ``n``, ``gflop`` (2 M K N / 1e9), and per kind its
        GFLOP/s (key = kind) and its median seconds (``seconds[kind]``).
    """
    import jax.numpy as jnp
    import torch

    named = list(shapes.items()) if isinstance(shapes, Mapping) else [("", s) for s in shapes]
    kern = _kernels(torch_device)
    rng = np.random.default_rng(seed)
    rows = []
    for label, (m, k, n) in named:
        a = rng.standard_normal((m, k), np.float32)  # [m, k]
        b = rng.standard_normal((k, n), np.float32)  # [k, n]
        ops: dict[str, tuple[Any, Any]] = {}
        if "xla_fp32" in kinds:
            ops["xla_fp32"] = (jnp.asarray(a), jnp.asarray(b))
        if {"xla_bf16_f32acc", "xla_bf16_bf16out"} & set(kinds):
            ab, bb = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
            ops.update(xla_bf16_f32acc=(ab, bb), xla_bf16_bf16out=(ab, bb))
        for kd, tdtype in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):
            if kd in kinds:
                ops[kd] = (
                    torch.from_numpy(a).to(torch_device, tdtype),
                    torch.from_numpy(b).to(torch_device, tdtype),
                )
        order = [kd for kd in kinds if kd in ops]
        for kd in order:  # compile + warm
            kern[kd](*ops[kd])
        times: dict[str, list[float]] = {kd: [] for kd in order}
        for _ in range(max(1, repeats)):
            for kd in order:
                t0 = time.perf_counter()
                kern[kd](*ops[kd])
                times[kd].append(time.perf_counter() - t0)
        gflop = 2.0 * m * k * n / 1e9
        row: dict[str, Any] = {"label": label, "m": m, "k": k, "n": n, "gflop": gflop}
        row["seconds"] = {kd: float(np.median(t)) for kd, t in times.items()}
        row.update({kd: gflop / s for kd, s in row["seconds"].items()})
        rows.append(row)
        del ops
    return rows


# --------------------------------------------------------------------------- printing


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def print_machine(
    cpu: Mapping[str, Any] | None = None,
    table: Sequence[Mapping[str, Any]] = (),
    runtime: Mapping[str, Any] | None = None,
    *,
    repeats: int | None = None,
    file: TextIO | None = None,
) -> None:
    """A compact block: CPU model and cores, ISA flags, runtimes, then the GEMM table."""
    out = file or sys.stdout
    cpu = cpu or cpu_facts()
    flags = ", ".join(f"{f} {_yes(v)}" for f, v in cpu["flags"].items())
    print(
        f"machine: {cpu['model']} ({cpu['arch']}, {cpu['os']}), {cpu['cores']} cores usable "
        f"of {cpu['cpu_count']}",
        file=out,
    )
    print(f"ISA: {flags}", file=out)
    if runtime:
        line = (
            f"runtime: jax {runtime['jax']} on {runtime['jax_backend']} "
            f"({runtime['jax_device']} x{runtime['jax_devices']}), torch {runtime['torch']} "
            f"({runtime['torch_threads']} threads, {runtime['torch_device']}"
        )
        if "torch_device_name" in runtime:
            line += f" {runtime['torch_device_name']}, tf32={runtime['torch_tf32']}"
        line += ")"
        if runtime.get("xla_flags"):
            line += f", XLA_FLAGS={runtime['xla_flags']}"
        print(line, file=out)
    if not table:
        return
    kinds = [kd for kd in KINDS if kd in table[0]]
    how = f"median of {repeats}" if repeats else "median"
    print(f"GEMM GFLOP/s ({how}, interleaved, one process):", file=out)
    width = max(len(_shape_label(r)) for r in table)
    head = f"  {'GEMM (M,K,N)':<{width}}" + "".join(f"{KINDS[kd]:>18}" for kd in kinds)
    print(head, file=out)
    for r in table:
        cells = "".join(f"{r[kd]:>18.1f}" for kd in kinds)
        print(f"  {_shape_label(r):<{width}}{cells}", file=out)


def _shape_label(row: Mapping[str, Any]) -> str:
    dims = f"{row['m']}x{row['k']}x{row['n']}"
    return f"{row['label']} {dims}" if row.get("label") else dims


def machine_report(
    shapes: Sequence[Shape] | Mapping[str, Shape] = DEFAULT_SHAPES,
    repeats: int = 3,
    *,
    torch_device: str = "cpu",
    file: TextIO | None = None,
) -> dict[str, Any]:
    """Measures and prints the block (no table when ``repeats`` is 0 or no shapes).

    Returns ``{"cpu", "runtime", "gemm", "gemm_repeats"}`` for a benchmark's JSON.
    """
    cpu, runtime = cpu_facts(), runtime_facts(torch_device)
    table = gemm_table(shapes, repeats, torch_device=torch_device) if repeats > 0 else []
    print_machine(cpu, table, runtime, repeats=repeats, file=file)
    return {"cpu": cpu, "runtime": runtime, "gemm": table, "gemm_repeats": repeats}


def forward_gemm_rates(table: Sequence[Mapping[str, Any]], layers: int) -> dict[str, float]:
    """GFLOP/s of one forward pass's GEMMs at each kind's rates (a FLOP-weighted harmonic mean).

    ``table`` holds :func:`model_gemm_shapes` rows (label ``a+b`` = that many GEMMs of the
    shape per layer; ``lm_head`` once per forward), ``layers`` the model's layer count. A
    scorer that ran every model GEMM at a kind's rate and everything else (attention, norms,
    the loss) for free would run at this rate: the roofline of the GEMM kernels themselves.
    Where the table has both :data:`BF16_KINDS`, :data:`BEST_BF16` takes each GEMM at the
    faster of the two: the best bf16 kernel this machine's libraries offer for that shape.
    """
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for row in table:
        label = row["label"]
        times = 1 if label == "lm_head" else len(label.split("+")) * layers
        per_kind = dict(row["seconds"])
        if all(kd in per_kind for kd in BF16_KINDS):
            per_kind[BEST_BF16] = min(per_kind[kd] for kd in BF16_KINDS)
        for kind, s in per_kind.items():
            flops[kind] = flops.get(kind, 0.0) + times * row["gflop"]
            seconds[kind] = seconds.get(kind, 0.0) + times * s
    return {kind: flops[kind] / seconds[kind] for kind in flops if seconds[kind] > 0}


def model_config(path: str) -> Any:
    """The ModelConfig of a ``.gguf`` file, a HF directory, or ``smollm2`` (embedded GGUF)."""
    from resofilter_jax.models.config import config_from_hf

    if path == "smollm2":
        from resofilter_jax import assets

        a = assets.ASSETS["smollm2"]
        path = str(assets.cache_dir() / a.name / a.filename)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        from resofilter_jax.models.gguf_io import GGUFFile

        return config_from_hf(GGUFFile(p).hf_config())
    return config_from_hf(json.loads((p / "config.json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shapes", default="", help="MxKxN,... (default: issue 13's four GEMMs)")
    ap.add_argument("--model", default="", help="smollm2 | .gguf | HF dir: its GEMM shapes")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the --model GEMMs")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per shape (median)")
    ap.add_argument("--torch_device", default="cpu", help="cpu | cuda")
    ap.add_argument("--json", default="", help="also write the block to this JSON file")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from resofilter_jax.runtime import tune_allocator

    tune_allocator()  # before JAX and torch allocate, as the benchmarks run
    shapes: Sequence[Shape] | Mapping[str, Shape]
    if args.model:
        shapes = model_gemm_shapes(model_config(args.model), args.tokens)
    else:
        shapes = parse_shapes(args.shapes) if args.shapes else DEFAULT_SHAPES
    t0 = time.perf_counter()
    out = machine_report(shapes, args.repeats, torch_device=args.torch_device)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.model and out["gemm"]:
        layers = model_config(args.model).num_hidden_layers
        rates = forward_gemm_rates(out["gemm"], layers)
        out["model"] = {"path": args.model, "layers": layers, "forward_gemm_gflop_s": rates}
        print(f"one forward's GEMMs ({layers} layers + LM head), GFLOP/s at each kind's rates:")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

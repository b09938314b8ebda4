"""SFT train-step throughput: resofilter_jax's Trainer vs a batch-equal PyTorch AdamW loop.

Usage (run from the repository root):

    # CPU: bf16 compute + fp32 master weights (the recipe) and fp32, each against torch fp32
    python bench/bench_train.py --batch 8 --seq_len 512 --steps 5 --json train_cpu_bf16.json
    python bench/bench_train.py --batch 8 --seq_len 512 --steps 5 --dtype float32 \\
        --json train_cpu_fp32.json
    # quick check (a few minutes on 2 cores)
    python bench/bench_train.py --batch 2 --seq_len 128 --steps 3 --warmup_steps 1
    # GPU (H100 / H200): JAX on its default GPU, torch on CUDA; bf16 and fp32-highest
    python bench/bench_train.py --device gpu --batch 16 --seq_len 512 --steps 20 \\
        --json train_gpu_bf16.json
    python bench/bench_train.py --device gpu --batch 16 --seq_len 512 --steps 20 \\
        --dtype float32 --json train_gpu_fp32.json
    # torch with bf16 autocast (fp32 master weights, as the project's bf16 mode)
    python bench/bench_train.py --device gpu --torch_dtype bfloat16 ...

One run measures, on the same model (SmolLM2-135M-Instruct from the embedded GGUF), data and
machine, with the recipe ``configs/sft_smollm2.py`` (AdamW lr 2e-5, betas (0.9, 0.999), eps
1e-8, weight decay on matrices only, torch-style clipping at 1.0, cosine schedule, CE chunk
256) and the flags as overrides:

0. The machine block of ``bench/machine.py``: CPU model, cores, ISA flags (avx2, avx512f,
   avx512_bf16, amx_bf16, amx_tile), jax/torch versions and devices, and a GEMM table
   (XLA fp32 HIGHEST, XLA bf16 with fp32 accumulation, XLA bf16 with bf16 result, torch fp32)
   at the model's own shapes for ``batch x seq_len`` rows (LM head: ``batch x ce_chunk`` rows,
   as the chunked cross-entropy issues it).
1. Data: the first rows of GSM8K test (``--data sharegpt``: ShareGPT first turns), encoded with
   the project's SFT encoding (``training.pipeline.read_training_rows``: template ChatML,
   prompt tokens masked, right-truncated to ``--seq_len``), one example per row, right-padded
   to a fixed ``[batch, seq_len]`` (``sft_data.collate_rows``). Step ``s`` takes rows
   ``s*batch .. (s+1)*batch - 1`` (cycling). Both sides get exactly these token ids, labels
   (-100 on prompts and padding) and attention masks. ``--pack_batches``: the project
   trains on each step's rows packed into as few ``seq_len`` rows as hold them
   (``data.pack_batches``; the same examples, targets and loss per step; rows counted in
   "exec GF/s" as run); torch keeps the padded rows.
2. project: ``resofilter_jax.training.trainer.Trainer`` (the real jitted, donated step: forward
   in ``--dtype`` with ``--param_dtype`` master weights, chunked CE with remat, token-mean
   loss, fp32 gradients, optax clip + AdamW) on one device; each step is
   ``trainer.step(batch)`` (host->device copy included) and a fetch of its loss.
3. torch: transformers' ``AutoModelForCausalLM`` on the same GGUF weights (fp32),
   ``torch.optim.AdamW`` with the same hyper-parameters and decay groups, ``LambdaLR`` with the
   same schedule formula; per step ``model(input_ids, attention_mask, labels).loss`` (HF's
   per-token mean over the targets, the same loss), ``loss.backward()``,
   ``clip_grad_norm_``, ``opt.step()``, ``sched.step()``, ``opt.zero_grad()``; on GPU a
   ``cuda.synchronize`` before each clock read. ``--torch_dtype bfloat16``: the forward under
   ``torch.autocast(bfloat16)`` (fp32 master weights and optimizer).

Both sides are set up first (model load, optimizer state), then run step by step in one
process, by default interleaved (project step s, torch step s, project step s+1, ...; on a
shared machine, load changes hit both sides alike; ``--order sequential`` runs all project steps
first). Each step is timed on its own, from before the batch's host->device copy to its loss on
the host (and a device sync). Both run with the project's allocator settings
(``resofilter_jax/runtime.py``, as ``bench/bench_matmul.py``).

The lr warmup of the recipe is set to 0 steps (``--set optim.warmup_steps=N`` to change), so
every step moves the weights and the loss check covers the updates; the schedule runs over the
``warmup_steps + steps`` steps of the bench. Timed: the ``--steps`` steps after the first
``--warmup_steps`` (which hold the compilation / first-call costs; their seconds are reported
apart). Rates over the timed steps: seconds per step (mean; median in the JSON), target
tokens/s, real (non-padding) tokens/s, useful model GFLOP/s and MFU with the train-step formula
of ``bench/common.py`` (``FlopModel.train_step(n) = 3 x forward`` per row of ``n`` real tokens),
"exec GF/s" the same formula at the padded ``seq_len``. Loss check: the first 3 step losses of
both sides (fp32: ~1e-5 relative, flagged above 1e-4, the SmolLM2 parity tolerance; bf16
differs more), the same for the grad norms, and the ratio project / torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import results  # noqa: E402
import torch_loop  # noqa: E402

DEFAULT_CONFIG = "configs/sft_smollm2.py"
DATA_ASSETS = {"gsm8k": "gsm8k", "sharegpt": "sharegpt"}
LOSS_STEPS = 3


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = ap.add_argument
    add("--config", default=DEFAULT_CONFIG, help="SFT recipe (default: %(default)s)")
    add("--batch", type=int, default=8, help="rows per optimizer step")
    add("--seq_len", type=int, default=512, help="row length (max_length; rows padded to it)")
    add("--steps", type=int, default=5, help="timed optimizer steps")
    add("--warmup_steps", type=int, default=2, help="untimed first steps (compile, warm-up)")
    add("--dtype", choices=common.DTYPES, default="bfloat16", help="project compute dtype")
    add("--param_dtype", default="float32", help="project master-weight dtype")
    add("--torch_dtype", choices=common.DTYPES, default="float32", help="bfloat16: autocast")
    add(
        "--matmul_precision",
        choices=("", "default", "high", "highest"),
        default="",
        help="JAX matmul precision (default: highest with --dtype float32, else the recipe's)",
    )
    add("--device", choices=("auto", "cpu", "gpu"), default="auto", help="both sides' device")
    add("--torch_tf32", action="store_true", help="allow TF32 matmuls in torch (GPU)")
    add(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: step s of the project, then of torch, per s (a shared machine's load "
        "hits both alike); sequential: all project steps, then all torch steps",
    )
    add(
        "--pack_batches",
        action="store_true",
        help="project side: each step's rows packed into as few seq_len rows as hold them "
        "(data.pack_batches: the same examples, targets and loss); torch keeps the padded rows",
    )
    add("--torch_threads", type=int, default=0, help="torch intra-op threads (0: its default)")
    add("--data", choices=tuple(DATA_ASSETS), default="gsm8k", help="embedded data set")
    add("--data_path", default="", help="data file (default: the embedded --data set)")
    add("--model_path", default="", help=".gguf file or HF model dir (default: embedded)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    add("--gemm_repeats", type=int, default=3, help="GEMM table rounds (0: no table)")
    add("--cpu_peak_gflops", default="", help="CPU peak 'FP32[,BF16]' (default 250,500)")
    add("--peak_tflops", type=float, default=0.0, help="override the device peak (TFLOP/s)")
    add("--json", default="", help="also write all results to this JSON file")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup_steps < 0 or args.batch < 1:
        raise SystemExit("error: need --steps >= 1, --warmup_steps >= 0, --batch >= 1")
    if not Path(args.config).is_file() and (common.REPO / args.config).is_file():
        args.config = str(common.REPO / args.config)
    if not args.matmul_precision:
        args.matmul_precision = "highest" if args.dtype == "float32" else ""
    return args


def setup_env(device: str) -> None:
    """Before JAX starts: its platform (``--device cpu`` keeps it off a GPU), no preallocation."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    os.environ.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")


def bench_config(args: argparse.Namespace, model_path: str, data_path: str, rows: int) -> Any:
    """The recipe with the bench's settings as overrides (then ``--set``)."""
    over: dict[str, Any] = {
        "model.path": model_path,
        "model.dtype": args.dtype,
        "model.param_dtype": args.param_dtype,
        "data.path": data_path,
        "data.limit": rows,
        "data.packing": False,
        "max_length": args.seq_len,
        "train.batch_size": args.batch,
        "train.micro_batch_size": 0,
        "optim.warmup_steps": 0,
        "progress": False,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set wants field=value, got {item!r}")
        over[key] = value
    return common.load_config(args.config, over)


def run_precision(args: argparse.Namespace, config: Any) -> str:
    """JAX matmul precision: the flag, else the recipe's ``model.matmul_precision``."""
    return args.matmul_precision or str(config.model.get("matmul_precision", "default"))


def make_batches(
    config: Any, tok: Any, data_path: str, batch: int, seq_len: int, n_steps: int, pack: bool
) -> tuple[
    list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[list[int]], dict[str, Any]
]:
    """``n_steps`` batches [1, batch, seq_len] of real rows, the same steps' rows as the project
    collates them (``pack``: packed into [1, rows, seq_len], ``sft_data.pick_rows``, the most
    rows any step needs), and per step the rows' real lengths."""
    from resofilter_jax.training.pipeline import read_training_rows
    from resofilter_jax.training.sft_data import StepRows, collate_rows, collate_step, pick_rows

    rows, info = read_training_rows(config, tok, data_path)
    if not rows:
        raise SystemExit("error: no usable training row (all truncated away?)")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches, layouts, lengths = [], [], []
    for s in range(n_steps):
        picks = np.arange(s * batch, (s + 1) * batch) % len(rows)
        batches.append(collate_rows(rows, picks, accum=1, length=seq_len, pad_id=pad_id))
        if pack:
            layouts.append(pick_rows(rows, picks, accum=1, length=seq_len, pack=True))
        lengths.append([len(rows[i]) for i in picks.tolist()])
    own = batches
    if pack:  # one shape for every packed step (empty rows added): no timed step compiles
        most = max(x.per_micro for x in layouts)
        own = [
            collate_step(
                StepRows(x.rows + [None] * (most - x.per_micro), most, x.length),
                accum=1,
                pad_id=pad_id,
            )
            for x in layouts
        ]
    info["cycled"] = n_steps * batch > len(rows)
    return batches, own, lengths, info


def target_count(batch: dict[str, np.ndarray]) -> int:
    """Target tokens of a batch (labels[:, 1:] != -100, as both losses count them)."""
    return int(np.sum(batch["labels"][..., 1:] != -100))


StepFn = Callable[[dict[str, np.ndarray]], tuple[float, float]]


def project_side(
    args: argparse.Namespace, config: Any, n_steps: int
) -> tuple[StepFn, dict[str, Any]]:
    """The project's Trainer: ``step(batch) -> (loss, grad norm)`` (waits for the step)."""
    import jax

    from resofilter_jax.models.loading import load_model
    from resofilter_jax.models.registry import named_params
    from resofilter_jax.parallel import make_train_mesh
    from resofilter_jax.training.optim import optimizer_from_config
    from resofilter_jax.training.trainer import Trainer, configure_for_training

    prec = run_precision(args, config)
    t0 = time.perf_counter()
    lm = load_model(config.model.path, dtype=args.dtype, param_dtype=args.param_dtype)
    # as the train command
    attention = configure_for_training(lm.model, config, packed=args.pack_batches)
    shapes = {n: tuple(v.shape) for n, v in named_params(lm.model).items()}
    tx, _, warm = optimizer_from_config(config.optim, shapes, n_steps)
    devices = jax.local_devices()[:1]  # one device, as the torch loop
    trainer = Trainer(lm.model, tx, make_train_mesh(1, 1, devices), ce_chunk=config.ce_chunk)
    info = {
        "load_s": time.perf_counter() - t0,
        "lr_warmup_steps": warm,
        "attention": attention,
        "model_config": lm.config,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device": str(devices[0]),
    }
    lm.model = None  # the trainer holds (copies of) the parameters

    def step(batch: dict[str, np.ndarray]) -> tuple[float, float]:
        # The precision is part of the jit key: the first call traces and compiles under it.
        scope = jax.default_matmul_precision(prec) if prec != "default" else nullcontext()
        with scope:
            m = trainer.step(batch)
        return float(m["loss"]), float(m["grad_norm"])

    return step, info


def run_steps(
    sides: dict[str, tuple[StepFn, dict[str, Any]]],
    batches: list[dict[str, np.ndarray]],
    order: str,
) -> dict[str, dict[str, list[float]]]:
    """Every side on every batch (a side's own ``info["batches"]`` where it has them: the same
    steps collated its way): interleaved (step s of each side in turn) or sequential."""
    res = {n: {"per_step_s": [], "losses": [], "grad_norms": []} for n in sides}
    plan = (
        [(s, n) for s in range(len(batches)) for n in sides]
        if order == "interleaved"
        else [(s, n) for n in sides for s in range(len(batches))]
    )
    for s, n in plan:
        step, info = sides[n]
        print(f"[{n}] step {s + 1}/{len(batches)} ...", file=sys.stderr)
        info.get("sync", lambda: None)()
        t0 = time.perf_counter()
        loss, norm = step(info.get("batches", batches)[s])
        res[n]["per_step_s"].append(time.perf_counter() - t0)
        res[n]["losses"].append(loss)
        res[n]["grad_norms"].append(norm)
    return res


def measure(
    name: str,
    r: dict[str, Any],
    args: argparse.Namespace,
    fm: common.FlopModel,
    batches: list[dict[str, np.ndarray]],
    lengths: list[list[int]],
    peak: float,
) -> results.Measure:
    """The timed steps (after ``--warmup_steps``) of one side as a Measure."""
    w = args.warmup_steps
    timed = range(w, len(batches))
    seconds = float(sum(r["per_step_s"][s] for s in timed))
    real = sum(sum(lengths[s]) for s in timed)
    targets = sum(target_count(batches[s]) for s in timed)
    useful = sum(fm.train_step(n) for s in timed for n in lengths[s])
    rows = r.get("rows_per_step") or [args.batch] * len(batches)  # rows each step ran
    executed = sum(rows[s] for s in timed) * fm.train_step(args.seq_len)
    steady = [r["per_step_s"][s] for s in timed]
    return results.Measure(
        name,
        len(timed) * args.batch,
        int(real),
        seconds,
        float(useful),
        peak,
        executed_flops=float(executed),
        host_rss_mb=r.get("host_rss_mb"),
        device_mb=r.get("device_mb"),
        extra={
            "s_per_step": seconds / len(timed),
            "s_per_step_median": float(np.median(steady)),
            "first_steps_s": r["per_step_s"][:w],
            "target_tokens": int(targets),
            "target_tokens_per_s": targets / seconds,
            "padded_tokens_per_s": sum(rows[s] for s in timed) * args.seq_len / seconds,
            "load_s": r["load_s"],
        },
    )


def main() -> None:
    args = parse_args()
    setup_env(args.device)
    from resofilter_jax.runtime import tune_allocator

    tune_allocator()  # before JAX and torch allocate: both sides run with the same allocator
    import jax
    import torch

    if args.device == "auto":
        args.device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    if args.device == "gpu" and (jax.default_backend() != "gpu" or not torch.cuda.is_available()):
        raise SystemExit(
            f"error: --device gpu, but JAX's backend is {jax.default_backend()} and torch "
            f"{'sees' if torch.cuda.is_available() else 'does not see'} CUDA"
        )
    torch_device = "cuda" if args.device == "gpu" else "cpu"

    model_path = common.asset_path(args.model_path, "smollm2")
    data_path = common.asset_path(args.data_path, DATA_ASSETS[args.data])
    n_steps = args.warmup_steps + args.steps
    config = bench_config(args, model_path, data_path, rows=2 * n_steps * args.batch)
    print(f"SFT train-step benchmark ({args.config}) on this machine:")
    cfg = machine.model_config(model_path)
    shapes = machine.model_gemm_shapes(
        cfg, args.batch * args.seq_len, args.batch * min(args.seq_len, config.ce_chunk)
    )
    mach = machine.machine_report(shapes, args.gemm_repeats, torch_device=torch_device)

    tok = common.load_tokenizer(model_path)
    batches, own, lengths, data_info = make_batches(
        config, tok, data_path, args.batch, args.seq_len, n_steps, args.pack_batches
    )
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sides = {
        "project": project_side(args, config, n_steps),
        "torch": torch_loop.train_step_fn(args, config, n_steps),
    }
    sides["project"][1]["batches"] = own
    res = run_steps(sides, batches, args.order)
    pinfo = {k: v for k, v in sides["project"][1].items() if k != "batches"}
    proj = {**pinfo, **res["project"], "device_mb": common.jax_device_mb()}
    proj["rows_per_step"] = [int(b["input_ids"].shape[1]) for b in own]
    tinfo = {k: v for k, v in sides["torch"][1].items() if k != "sync"}
    tr = {**tinfo, **res["torch"], **torch_loop.torch_stats(torch_device)}
    proj["host_rss_mb"] = tr["host_rss_mb"]  # one process: the peak of both
    report(args, config, mach, data_info, batches, lengths, proj, tr)


def report(
    args: argparse.Namespace,
    config: Any,
    mach: dict[str, Any],
    data_info: dict[str, Any],
    batches: list[dict[str, np.ndarray]],
    lengths: list[list[int]],
    proj: dict[str, Any],
    tr: dict[str, Any],
) -> None:
    """Prints the table, ratios and loss agreement; writes --json."""
    fm = common.FlopModel.from_config(proj["model_config"])
    peak, peak_note = common.peak_flops(
        proj["device_kind"],
        proj["platform"],
        args.dtype,
        cpu_gflops=args.cpu_peak_gflops,
        tflops=args.peak_tflops,
    )
    tpeak, tnote = common.peak_flops(
        tr["device_kind"],
        "cpu" if tr["device"] == "cpu" else "gpu",
        args.torch_dtype,
        cpu_gflops=args.cpu_peak_gflops,
        tflops=args.peak_tflops,
    )
    prec = run_precision(args, config)
    name_p = f"project {args.dtype} (params {args.param_dtype})"
    name_t = f"torch {args.torch_dtype}" + (" autocast" if args.torch_dtype != "float32" else "")
    mp = measure(name_p, proj, args, fm, batches, lengths, peak)
    mt = measure(name_t, tr, args, fm, batches, lengths, tpeak)
    tokens = [len(x) for x in lengths]
    print(
        f"\nSFT train step: batch {args.batch} x seq_len {args.seq_len}, {args.steps} timed steps "
        f"after {args.warmup_steps} warm-up; data {data_info['path']} ({data_info['examples']} "
        f"examples read, rows cycled: {data_info['cycled']}), real tokens per step "
        f"{min(sum(x) for x in lengths)}..{max(sum(x) for x in lengths)} of "
        f"{args.batch * args.seq_len} ({len(tokens)} steps)"
    )
    print(
        f"project: {args.dtype} compute, {args.param_dtype} master weights, matmul precision "
        f"{prec}, attention {proj['attention']['backend']}, on {proj['device']}; peak: "
        f"{peak_note}"
    )
    if args.pack_batches:
        print(
            f"project rows packed per step (--pack_batches; torch: {args.batch} padded rows): "
            f"{proj['rows_per_step']}"
        )
    print(
        f"torch: {name_t} on {tr['device_kind']}, {tr['threads']} threads, tf32={tr['tf32']}; "
        f"peak: {tnote}"
    )
    print(
        f"optimizer (both): AdamW lr {config.optim.lr:g}, betas ({config.optim.b1}, "
        f"{config.optim.b2}), eps {config.optim.eps:g}, wd {config.optim.weight_decay:g} "
        f"({config.optim.decay}), clip {config.optim.clip_norm:g}, {config.optim.schedule} over "
        f"{len(batches)} steps, lr warmup {proj['lr_warmup_steps']}"
    )
    print()
    results.print_table([mp, mt])
    print(
        "(samples = rows; tokens/s = real non-padding tokens; GFLOP/s, MFU: 3 x forward FLOPs "
        "of the real tokens; exec GF/s: the same at the padded seq_len)"
    )
    head = (
        f"{'':<34}{'s/step':>9}{'median':>9}{'target tok/s':>14}{'padded tok/s':>14}"
        f"{'first steps s':>16}"
    )
    print("\n" + head)
    for m in (mp, mt):
        e = m.extra
        first = " ".join(f"{x:.2f}" for x in e["first_steps_s"]) or "-"
        print(
            f"{m.name:<34}{e['s_per_step']:>9.3f}{e['s_per_step_median']:>9.3f}"
            f"{e['target_tokens_per_s']:>14.1f}{e['padded_tokens_per_s']:>14.1f}{first:>16}"
        )
    ratio = {
        "s_per_step": mt.extra["s_per_step"] / mp.extra["s_per_step"],
        "tokens_per_s": mp.rate(mp.tokens) / mt.rate(mt.tokens),
        "target_tokens_per_s": mp.extra["target_tokens_per_s"] / mt.extra["target_tokens_per_s"],
    }
    print(
        f"\nratio project / torch (same batches): tokens/s {ratio['tokens_per_s']:.2f}x, "
        f"target tokens/s {ratio['target_tokens_per_s']:.2f}x (step time torch/project "
        f"{ratio['s_per_step']:.2f}x)"
    )
    k = min(LOSS_STEPS, len(batches))
    pl, tl = proj["losses"][:k], tr["losses"][:k]
    rel = results.max_rel_diff(pl, tl)
    grel = results.max_rel_diff(proj["grad_norms"][:k], tr["grad_norms"][:k])
    fp32 = args.dtype == "float32" and args.torch_dtype == "float32"
    verdict = ""
    if fp32:
        verdict = " (ok: fp32 parity)" if rel <= 1e-4 else " (NOT within 1e-4: investigate)"
    print(
        f"loss of the first {k} steps: project {' '.join(f'{x:.6f}' for x in pl)}; torch "
        f"{' '.join(f'{x:.6f}' for x in tl)}; max rel diff {rel:.2e}{verdict}; grad-norm max rel "
        f"diff {grel:.2e} ({args.dtype} vs {args.torch_dtype})"
    )
    out = {
        "args": vars(args),
        "versions": {**common.versions(), "optax": _version("optax")},
        "machine": mach,
        "data": data_info,
        "peak": {"project": peak_note, "torch": tnote},
        "matmul_precision": prec,
        "attention": proj["attention"],
        "lr_warmup_steps": proj["lr_warmup_steps"],
        "real_tokens_per_step": [sum(x) for x in lengths],
        "target_tokens_per_step": [target_count(b) for b in batches],
        "measures": [mp.to_dict(), mt.to_dict()],
        "project": {k: v for k, v in proj.items() if k != "model_config"},
        "torch": tr,
        "ratio": ratio,
        "loss_check": {
            "steps": k,
            "project": pl,
            "torch": tl,
            "max_rel_diff": rel,
            "grad_norm_max_rel_diff": grel,
            "dtypes": [args.dtype, args.torch_dtype],
        },
    }
    if args.json:
        common.write_json(args.json, out)


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    main()

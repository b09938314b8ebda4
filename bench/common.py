"""Shared helpers of the benchmarks: FLOP accounting, device peaks, timing, memory, output.

Used by ``bench_forward.py``, ``bench_ifd.py`` and ``bench_reso.py`` (run as scripts from the
repository root, so this module is imported as ``common``).

FLOP accounting (``FlopModel``), per sequence of ``n`` real tokens, with ``P`` the matmul
parameters of one decoder layer (q, k, v, o projections and the MLP matrices), ``nh`` query
heads of size ``d``, ``L`` layers, vocabulary ``V`` and width ``h``:

* layer forward, per token: ``2 P + 4 n nh d`` (projections + attention scores and values,
  counted over the full ``n x n`` square, as dense kernels compute it);
* forward of a sequence: ``n (L (2 P + 4 n nh d) + 2 V h)`` (the LM head included);
* activation gradients of a layer, per token: ``2 P + 8 n nh d``; of the head: ``2 V h``;
  weight gradients of a matrix ``W``: ``2 |W|`` per token;
* full training step (forward + backward of every weight): ``3 x forward`` (~ 6 N n).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resofilter_jax.analysis import rank_stats

REPO = Path(__file__).resolve().parents[1]
_USER_ENV = dict(os.environ)  # before parse_args() adjusts this process's environment

# Dense peak FLOP/s by device kind (substring of the device name, most specific first).
# TPUs: the bf16 MXU peak is used for fp32 too (fp32 matmuls run as bf16 passes).
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),  # v5p
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),  # v6e ("TPU v6 lite")
]
# Large-matmul rates measured on the 2-core development VM (GFLOP/s); override per machine.
CPU_PEAK_GFLOPS = {"float32": 250.0, "bfloat16": 500.0}
DTYPES = ("float32", "bfloat16")

ASSET_HINT = (
    "The embedded assets are not in the cache ({path}). On a machine without network, copy "
    "the directory ~/.cache/resofilter_jax from a machine that has it (or set "
    "RESOFILTER_CACHE to a copy), or pass --model_path / --data_path."
)


def peak_flops(
    device_kind: str, platform: str, dtype: str, *, cpu_gflops: str = "", tflops: float = 0.0
) -> tuple[float, str]:
    """(peak FLOP/s, how it was chosen) for ``dtype`` on a device.

    ``tflops`` (if > 0) overrides everything; on CPU ``cpu_gflops`` is ``"FP32[,BF16]"``
    (one value: all dtypes); otherwise the table :data:`PEAKS`.
    """
    if tflops > 0:
        return tflops * 1e12, f"{tflops:g} TFLOP/s (--peak_tflops)"
    if platform == "cpu":
        vals = [float(v) for v in cpu_gflops.split(",") if v.strip()] if cpu_gflops else []
        if vals:
            g = vals[1] if len(vals) > 1 and dtype == "bfloat16" else vals[0]
            return g * 1e9, f"CPU {g:g} GFLOP/s {dtype} (--cpu_peak_gflops)"
        g = CPU_PEAK_GFLOPS[dtype]
        return g * 1e9, f"CPU {g:g} GFLOP/s {dtype} (default: 2-core dev VM matmul rate)"
    for key, peaks in PEAKS:
        if key.lower() in device_kind.lower():
            return peaks[dtype], f"{key} {peaks[dtype] / 1e12:g} TFLOP/s {dtype} dense"
    print(f"warning: no peak known for {device_kind!r}; pass --peak_tflops", file=sys.stderr)
    return float("nan"), f"unknown device {device_kind!r}"


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """The shapes that the FLOP formulas of this module's docstring need."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    layer_matmul: int  # P: matmul parameters of one decoder layer

    @classmethod
    def from_config(cls, cfg: Any) -> FlopModel:
        """From a ``resofilter_jax`` ModelConfig."""
        h, d = cfg.hidden_size, cfg.head_dim
        attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        mlp = (2 if getattr(cfg, "arch", "") == "gpt2" else 3) * h * cfg.intermediate_size
        return cls(cfg.num_hidden_layers, h, cfg.num_attention_heads, d, cfg.vocab_size, attn + mlp)

    def layer_token(self, n: int) -> float:
        """Forward FLOPs of one layer per token of a length-``n`` sequence."""
        return 2.0 * self.layer_matmul + 4.0 * n * self.heads * self.head_dim

    def head_token(self) -> float:
        """LM-head FLOPs per token (forward, or its activation gradient)."""
        return 2.0 * self.vocab * self.hidden

    def forward(self, n: int) -> float:
        """Forward FLOPs of one sequence of ``n`` tokens."""
        return n * (self.layers * self.layer_token(n) + self.head_token())

    def train_step(self, n: int) -> float:
        """Forward + full backward (every weight's gradient): 3 x forward."""
        return 3.0 * self.forward(n)

    def partial_backward(self, n: int, crossed_layers: int, chosen_size: int) -> float:
        """Backward through the head and the top ``crossed_layers`` layers + chosen weight grads."""
        act = 2.0 * self.layer_matmul + 8.0 * n * self.heads * self.head_dim
        return n * (self.head_token() + crossed_layers * act + 2.0 * chosen_size)


def model_flops_per_token(cfg: Any, seq: int) -> float:
    """2 x matmul parameters (LM head included) + attention scores and values over ``seq``."""
    fm = FlopModel.from_config(cfg)
    return fm.layers * fm.layer_token(seq) + fm.head_token()


@dataclasses.dataclass
class Measure:
    """One timed run: counts, seconds and the FLOPs to rate it by."""

    name: str
    samples: int
    tokens: int
    seconds: float
    useful_flops: float
    peak: float
    executed_flops: float | None = None
    host_rss_mb: float | None = None
    device_mb: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def rate(self, x: float) -> float:
        return x / self.seconds if self.seconds > 0 else float("nan")

    @property
    def gflops(self) -> float:
        """Useful model GFLOP/s."""
        return self.rate(self.useful_flops) / 1e9

    @property
    def mfu(self) -> float:
        """Useful model FLOP/s over the peak."""
        return self.rate(self.useful_flops) / self.peak

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            samples_per_s=self.rate(self.samples),
            tokens_per_s=self.rate(self.tokens),
            useful_gflop_s=self.gflops,
            mfu=self.mfu,
        )
        if self.executed_flops is not None:
            d["executed_gflop_s"] = self.rate(self.executed_flops) / 1e9
        return d


def _fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a right-aligned ``-`` for None / NaN."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None or x != x else format(x, spec)


def print_table(rows: Sequence[Measure]) -> None:
    """The result table (useful GFLOP/s and MFU; executed GFLOP/s where it differs)."""
    head = (
        f"{'run':<34}{'samples':>8}{'seconds':>9}{'samples/s':>10}{'tokens/s':>10}"
        f"{'GFLOP/s':>9}{'MFU':>8}{'exec GF/s':>10}{'RSS MB':>8}{'dev MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for m in rows:
        ex = m.rate(m.executed_flops) / 1e9 if m.executed_flops is not None else None
        print(
            f"{m.name:<34}{m.samples:>8}{m.seconds:>9.2f}{_fmt(m.rate(m.samples), '10.3f')}"
            f"{_fmt(m.rate(m.tokens), '10.0f')}{_fmt(m.gflops, '9.1f')}{_fmt(m.mfu * 100, '7.2f')}%"
            f"{_fmt(ex, '10.1f')}{_fmt(m.host_rss_mb, '8.0f')}{_fmt(m.device_mb, '8.0f')}"
        )


def print_ratios(rows: Sequence[Measure], torch_m: Measure, subset_note: str) -> dict:
    """Prints and returns project / torch of the per-sample, per-token and FLOP rates."""
    out = {}
    print(f"\nratio project / torch batch-of-one ({subset_note}):")
    for m in rows:
        r = out[m.name] = {
            "samples_per_s": m.rate(m.samples) / torch_m.rate(torch_m.samples),
            "tokens_per_s": m.rate(m.tokens) / torch_m.rate(torch_m.tokens),
            "useful_gflop_s": m.gflops / torch_m.gflops,
        }
        print(
            f"  {m.name:<34} samples/s {r['samples_per_s']:6.2f}x   tokens/s "
            f"{r['tokens_per_s']:6.2f}x   useful GFLOP/s {r['useful_gflop_s']:6.2f}x"
        )
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    """(Spearman rho, n) over the positions where both are finite (NaN when n < 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan"), int(ok.sum())
    return rank_stats.spearman(a[ok], b[ok]), int(ok.sum())


def max_rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """max |a - b| / |b| over the positions where both are finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (b != 0)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.abs(b[ok]))) if ok.any() else float("nan")


def rss_mb(children: bool = False) -> float:
    """Peak resident set size (MB) of this process, or of its finished children."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def jax_device_mb() -> float | None:
    """Peak device bytes in use (MB, max over local devices); None where not reported."""
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 2**20 if peaks else None


def asset_path(override: str, name: str) -> str:
    """``override``, or the cached embedded asset ``name`` (never downloads: a clear error)."""
    if override:
        if not Path(override).expanduser().exists():
            raise SystemExit(f"error: {override} does not exist")
        return str(Path(override).expanduser())
    from resofilter_jax import assets

    a = assets.ASSETS[name]
    path = assets.cache_dir() / a.name / a.filename
    if not path.is_file():
        raise SystemExit("error: " + ASSET_HINT.format(path=path))
    return str(path)


def load_config(path: str, overrides: dict[str, Any]) -> Any:
    """``get_config()`` of a config file with dotted-key overrides (the project's loader)."""
    from resofilter_jax.configuration import load_config as load

    return load(path, overrides)


def process_runs(
    kinds: str, config_path: str, overrides: dict[str, Any], wd: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Runs ``python -m resofilter_jax.score`` in fresh processes, each into a fresh output dir.

    ``kinds``: ``cold`` (empty compilation cache) and/or ``warm`` (the cache cold filled).
    Returns per run: wall time, the run's ``run.json``, the peak RSS of the children.
    """
    results = []
    cache = wd / "jax_cache"
    for kind in [k.strip() for k in kinds.split(",") if k.strip()]:
        if kind not in ("cold", "warm"):
            raise SystemExit(f"error: --process_runs takes cold,warm; got {kind!r}")
        if kind == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        print(f"[project] whole process, {kind} compilation cache ...", file=sys.stderr)
        out = wd / f"out_{kind}"
        over = {**overrides, "compilation_cache_dir": str(cache), "output_dir": str(out)}
        cmd = [sys.executable, "-m", "resofilter_jax.score", "--config", config_path]
        cmd += [f"--config.{k}={v}" for k, v in over.items()]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        run = json.loads((out / "run.json").read_text())
        results.append(
            {"kind": kind, "wall_s": wall, "run": run, "command": cmd, "rss_mb": rss_mb(True)}
        )
    return results


def process_measure(r: dict[str, Any], flops: float, peak: float) -> Measure:
    """A whole-process run as a :class:`Measure` (wall time of the process)."""
    run = r["run"]
    return Measure(
        f"project whole process, {r['kind']} cache",
        run["rows"],
        run["loop"]["tokens"],
        r["wall_s"],
        flops,
        peak,
        host_rss_mb=r["rss_mb"],
        extra={
            "seconds_in_run": run["seconds"],
            "first_result_s": run["loop"]["first_result_s"],
            "outside_run_s": r["wall_s"] - run["seconds"]["total"],
            "command": " ".join(r["command"]),
        },
    )


def steady_measure(
    name: str, stats: dict[str, Any], flops: float, peak: float, **kw: Any
) -> Measure:
    """An in-process loop (``RunStats.summary()``) as a :class:`Measure`."""
    return Measure(name, stats["rows"], stats["tokens"], stats["seconds"], flops, peak, **kw)


def configure_attention(config: Any, model: Any) -> dict[str, str]:
    """Applies ``config.model.attention`` to ``model`` as ``resofilter_jax.score`` does.

    Returns the run-record entry (requested, backend, reason).
    """
    from resofilter_jax.models.attention import configure_attention as configure

    name = config.model.get("attention", "auto")
    return configure(model, name, packed=bool(config.get("pack", True)))


def precision_scope(config: Any) -> Any:
    """``config.model.matmul_precision`` around the traced work, as the commands apply it."""
    from resofilter_jax.models.precision import matmul_precision_scope, run_matmul_precision

    return matmul_precision_scope(run_matmul_precision(config))


def load_tokenizer(model_path: str) -> Any:
    """The project's tokenizer of a ``.gguf`` file or a HF directory."""
    from resofilter_jax.models.loading import load_tokenizer as load

    p = Path(model_path)
    return load(p.parent, gguf_file=p.name) if p.suffix == ".gguf" else load(p)


def child_env(matmul_precision: str) -> dict[str, str]:
    """Environment of the scoring subprocess: the user's (JAX defaults), the repo importable."""
    env = {**_USER_ENV, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if matmul_precision:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = matmul_precision
    return env


def torch_setup(args: argparse.Namespace) -> tuple[str, Callable[[], None]]:
    """(torch device, a device-sync function) from ``--device`` and ``--torch_tf32``."""
    import torch

    name = args.device
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: --device gpu but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = args.torch_tf32
    if name == "gpu":
        torch.cuda.reset_peak_memory_stats()
        return "cuda", torch.cuda.synchronize
    return "cpu", lambda: None


def torch_stats(device: str) -> dict[str, Any]:
    """Device name, threads, TF32, peak CUDA memory (MB) and peak host RSS of the torch phase."""
    import torch

    cuda = device == "cuda"
    return {
        "device": device,
        "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "host_rss_mb": rss_mb(),
    }


def load_torch_model(path: str, dtype: str, device: str) -> Any:
    """transformers' causal LM from a ``.gguf`` file or a HF directory, on ``device``."""
    import torch
    import transformers

    p = Path(path)
    kw: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if p.suffix == ".gguf":
        kw["gguf_file"] = p.name
        p = p.parent
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p), **kw)
    return model.to(device).eval()


def attach_input_hook(model: Any, device: str, lengths: list[int]) -> Any:
    """Moves the model's tensor inputs to ``device`` and records every call's sequence length.

    The reference loops build CPU tensors; this forward pre-hook lets them run unchanged on
    a GPU and counts exactly the tokens the model processed. It survives ``copy.deepcopy``.
    """
    import torch

    def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        ids = args[0] if args else kwargs["input_ids"]
        lengths.append(int(ids.shape[-1]))
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def add_common_args(
    ap: argparse.ArgumentParser, *, config: str, samples: int, torch_samples: int
) -> None:
    """Flags shared by bench_ifd.py and bench_reso.py."""
    add = ap.add_argument
    add("--config", default=config, help="recipe config (default: %(default)s)")
    add("--samples", type=int, default=samples, help="input rows to score (config.data.limit)")
    add("--max_length", type=int, default=0, help="0 = the recipe's max_length")
    add("--dtype", choices=DTYPES, default="float32", help="project compute dtype")
    add("--param_dtype", default="", help="project parameter dtype (default: --dtype)")
    add("--torch_samples", type=int, default=torch_samples, help="first M rows via torch; 0: none")
    add(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="torch device (auto: gpu if CUDA is there); JAX takes its default backend",
    )
    add("--torch_dtype", choices=DTYPES, help="torch model dtype (default: --dtype)")
    add("--torch_tf32", action="store_true", help="allow TF32 matmuls in torch (GPU)")
    add(
        "--torch_allocator",
        choices=("default", "tuned"),
        default="default",
        help="glibc settings for the torch loop: default (as users run it) or tuned (the "
        "project's resofilter_jax/runtime.py, applied before torch runs); the project "
        "phase always runs tuned, as the commands do",
    )
    add("--jax_matmul_precision", default="", help="JAX default matmul precision, e.g. highest")
    add(
        "--check_rankings",
        action=argparse.BooleanOptionalAction,
        help="also score in the other project dtype: Spearman bf16 vs fp32 (default: with bf16)",
    )
    add("--model_path", default="", help=".gguf file or HF model dir (default: embedded)")
    add("--data_path", default="", help="data file (default: the embedded data set)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    add("--process_runs", default="cold,warm", help="whole-process runs: cold,warm | ''")
    add("--cpu_peak_gflops", default="", help="CPU peak 'FP32[,BF16]' (default 250,500)")
    add("--peak_tflops", type=float, default=0.0, help="override the device peak (TFLOP/s)")
    add("--work_dir", default="", help="outputs + compilation cache (default: a temp dir)")
    add("--keep_outputs", action="store_true", help="keep --work_dir afterwards")
    add("--json", default="", help="also write all results to this JSON file")
    add(
        "--gemm_repeats",
        type=int,
        default=3,
        help="machine block: GEMM table at the model's shapes, median of N (0: CPU facts only)",
    )
    add(
        "--json_scores",
        action="store_true",
        help="--json also holds every row's score (project, torch, other dtype) by record index",
    )


def parse_args(
    doc: str, *, config: str, samples: int, torch_samples: int, extra: Any = None
) -> Any:
    """The bench's flags (``extra(ap)`` adds its own); fills the dtype defaults."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(ap, config=config, samples=samples, torch_samples=torch_samples)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    # This process shares the GPU with torch (no JAX preallocation) and shows no progress bars.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    if not Path(args.config).is_file() and (REPO / args.config).is_file():
        args.config = str(REPO / args.config)  # recipe paths are relative to the repository
    args.param_dtype = args.param_dtype or args.dtype
    args.torch_dtype = args.torch_dtype or args.dtype
    if args.check_rankings is None:
        args.check_rankings = args.dtype == "bfloat16"
    return args


def overrides_of(args: argparse.Namespace, model_path: str, data_path: str) -> dict[str, Any]:
    """Config overrides from the flags (the same for the subprocess and this process)."""
    over: dict[str, Any] = {
        "data.limit": args.samples,
        "model.path": model_path,
        "data.path": data_path,
        "model.dtype": args.dtype,
        "model.param_dtype": args.param_dtype,
        "progress": False,
    }
    if args.max_length:
        over["max_length"] = args.max_length
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set wants field=value, got {item!r}")
        over[key] = value
    return over


def machine_block(args: argparse.Namespace, model_path: str, tokens: int) -> None:
    """Prints which machine this run is on (``bench/machine.py``: CPU model, ISA flags, a GEMM
    table at the model's shapes for ``tokens`` rows) and keeps it for ``--json``."""
    import machine

    shapes = machine.model_gemm_shapes(machine.model_config(model_path), tokens, head_tokens=1024)
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    args.machine = machine.machine_report(shapes, args.gemm_repeats, torch_device=torch_device)


def finish_report(
    args: argparse.Namespace,
    rows: list[Measure],
    torch_m: Measure | None,
    scores: dict[str, dict[int, float]],
    out: dict[str, Any],
    notes: str,
) -> None:
    """Prints the table, the ratios and the score agreement checks; writes ``--json``.

    ``scores`` holds ``project`` and, where run, ``torch`` and ``other`` (the project in the
    other dtype) scores by record index.
    """
    print()
    print_table(rows + ([torch_m] if torch_m else []))
    print(notes)
    out["measures"] = [m.to_dict() for m in rows]
    ours = scores["project"]
    if torch_m is not None:
        note = (
            f"torch ran the first {torch_m.samples} of the {rows[-1].samples} rows: per-sample "
            "rates; tokens/s and GFLOP/s are the fair comparison"
        )
        out["torch"] = torch_m.to_dict()
        out["ratios"] = print_ratios(rows, torch_m, note)
        keys = sorted(scores["torch"])
        a, b = [ours[i] for i in keys], [scores["torch"][i] for i in keys]
        rho, n = spearman(a, b)
        rel = max_rel_diff(a, b)
        print(
            f"score agreement, project {args.dtype} vs torch {args.torch_dtype} on those {n} "
            f"samples: max rel diff {rel:.2e}, Spearman {rho:.4f}"
        )
        out["torch_agreement"] = {"max_rel_diff": rel, "spearman": rho, "n": n}
    if "other" in scores:
        keys = sorted(ours)
        rho, n = spearman([ours[i] for i in keys], [scores["other"][i] for i in keys])
        print(f"ranking check: Spearman(bf16 scores, fp32 scores) = {rho:.5f} over {n} samples")
        out["rank_check"] = {"spearman_bf16_vs_fp32": rho, "n": n}
    machine = vars(args).pop("machine", None)  # out["args"] is vars(args): listed once
    if machine is not None:
        out["machine"] = machine
    if args.json:
        if getattr(args, "json_scores", False):
            out["scores"] = {
                k: {str(i): float(v) for i, v in sorted(d.items())} for k, d in scores.items()
            }
        write_json(args.json, out)


def work_dir(path: str) -> Path:
    """``path`` (created) or a new temporary directory."""
    import tempfile

    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    return Path(tempfile.mkdtemp(prefix="resofilter_bench_"))


def write_json(path: str, obj: dict[str, Any]) -> None:
    """Writes ``obj`` as indented JSON."""
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
    print(f"wrote {path}")


def versions() -> dict[str, str]:
    """Package versions (the project's list plus torch) and the machine."""
    import platform

    from resofilter_jax.runtime import PACKAGES
    from resofilter_jax.runtime import versions as package_versions

    return {
        **package_versions((*PACKAGES, "torch")),
        "node": platform.node(),
        "cpus": str(os.cpu_count()),
    }

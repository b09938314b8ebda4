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
from pathlib import Path
from typing import Any

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

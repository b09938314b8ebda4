#!/usr/bin/env bash
# GPU check (issue 15 deliverable 3): IFD and resonance on SmolLM2 on one GPU, bf16 and
# fp32-highest, against the PyTorch batch-of-one loops on the same GPU and the shipped CPU fp32
# reference scores. Made for a lent machine without network and without ~/.cache/resofilter_jax:
# everything it reads comes from this repository and .gpu/ (built here by
# bench/prepare_gpu_carry.sh; .gpu/a and .gpu/b travel in two calls, see BENCHMARKS.md).
#
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh  # call 1 (< 60 s): stash .gpu/a in
#                                              # /root/gpu_stash, versions, GPU visible to JAX
#                                              # and torch, wheels, `import resofilter_jax`
#   bash bench/gpu_check.sh                    # call 2: the whole check (~6 min on one H200)
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh    # here, on CPU: tiny counts, every step exercised
#   GPU_CHECK_ONLY='ifd_att' bash ...          # rerun only the bench steps matching this
#                                              # regex (earlier results stay for the summary)
#
# Steps (each in its own process under `timeout`; a failing step prints FAILED and the rest go
# on; the whole script stays within GPU_CHECK_BUDGET_S, default 350 s):
#   assemble  the GGUF from .gpu/a + .gpu/b (or /root/gpu_stash/a), sha256 checked; data and
#             the converted tokenizer unpacked into .gpu/run
#   install   ml-collections + gguf wheels (--no-deps) into /tmp/site, PYTHONPATH=/tmp/site:.
#   env       nvidia-smi, python/jax/torch versions, jax.devices(), GPU seen by JAX and torch,
#             import resofilter_jax.scoring.pipeline, which config keys exist, the tokenizer loads
#   ifd_bf16  bench_ifd.py bf16, IFD_ROWS rows + the torch fp32 loop over IFD_TORCH rows
#   reso_bf16 bench_reso.py bf16, RESO_ROWS rows + the torch fp32 loop over RESO_TORCH rows
#   ifd_fp32  bench_ifd.py fp32, matmul precision highest, IFD_FP32_ROWS rows
#   reso_fp32 bench_reso.py fp32, matmul precision highest, RESO_FP32_ROWS rows
#   ifd_att_* bench_ifd.py bf16 with model.attention = each of BACKENDS (reference cudnn
#             pallas_gpu xla; cudnn with pack=False), BACKEND_ROWS rows each, while time is
#             left (only if the config has model.attention)
#   summary   one table + score agreement (Spearman, max rel diff) vs the CPU fp32 reference
# Outputs in $OUT (default ./gpu_out): gpu_check.log (everything), summary.txt, summary.json,
# details.tar.gz (per-step logs and bench JSONs with every score).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$SECONDS
DRY=${GPU_CHECK_DRY:-0}
SMOKE=${GPU_CHECK_SMOKE:-0}
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
if [[ $DRY == 1 ]]; then
  DEFPY=$REPO/.venv/bin/python
  [[ -x $DEFPY ]] || DEFPY=python3
  DEVICE=cpu BUDGET=${GPU_CHECK_BUDGET_S:-2400}
  IFD_ROWS=${IFD_ROWS:-12} IFD_TORCH=${IFD_TORCH:-3} IFD_FP32_ROWS=${IFD_FP32_ROWS:-12}
  RESO_ROWS=${RESO_ROWS:-6} RESO_TORCH=${RESO_TORCH:-2} RESO_FP32_ROWS=${RESO_FP32_ROWS:-6}
  BACKEND_ROWS=${BACKEND_ROWS:-6}
  BACKENDS=${BACKENDS:-cudnn xla} # cudnn: must fail fast on CPU
  STEP_MAX=${STEP_MAX:-900}
else
  DEFPY=python3
  DEVICE=gpu BUDGET=${GPU_CHECK_BUDGET_S:-350}
  IFD_ROWS=${IFD_ROWS:-2000} IFD_TORCH=${IFD_TORCH:-256} IFD_FP32_ROWS=${IFD_FP32_ROWS:-1024}
  RESO_ROWS=${RESO_ROWS:-256} RESO_TORCH=${RESO_TORCH:-64} RESO_FP32_ROWS=${RESO_FP32_ROWS:-128}
  BACKEND_ROWS=${BACKEND_ROWS:-512}
  BACKENDS=${BACKENDS:-reference cudnn pallas_gpu xla}
  STEP_MAX=${STEP_MAX:-0}
fi
PY=${PY:-$DEFPY}
RESERVE=${GPU_CHECK_RESERVE_S:-20} # kept for the summary
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
RUN=$REPO/.gpu/run
W=$RUN/work
[[ -n ${GPU_CHECK_ONLY:-} ]] || rm -rf "$W" # GPU_CHECK_ONLY keeps the earlier results
mkdir -p "$W" "$RUN/model"
LOG=$OUT/gpu_check.log
: >"$LOG"
STATUS=$W/status.tsv
[[ -n ${GPU_CHECK_ONLY:-} ]] || : >"$STATUS"

# Part a: the carried folder, or the copy call 1 stashed.
A=$REPO/.gpu/a
[[ -f $A/model/$GGUF_NAME.part0 ]] || A=/root/gpu_stash/a
B=$REPO/.gpu/b

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export RESOFILTER_CACHE=$RUN/cache # the shipped tokenizer; nothing is fetched
export PYTHONPATH=/tmp/site:$REPO
export PY REPO RUN W A B GGUF_NAME DEVICE DRY
GGUF=$RUN/model/$GGUF_NAME
SHAREGPT=$RUN/data/sharegpt_head.json
GSM8K=$RUN/data/gsm8k_test.jsonl
REF=$A/ref

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $((SECONDS - T0)); }

# step NAME MAX_S CMD...: runs CMD (an exported function or a program) in a fresh bash, in its
# own process group under `timeout`, output to $W/NAME.log; records OK / FAILED / TIMEOUT / SKIPPED in $STATUS.
step() {
  local name=$1 max=$2
  shift 2
  ((STEP_MAX > 0)) && max=$STEP_MAX
  if [[ -n ${GPU_CHECK_ONLY:-} && ! $name =~ ^(assemble|install|env|stash|summary)$ &&
    ! $name =~ $GPU_CHECK_ONLY ]]; then
    return 0 # a rerun of some steps: the other steps' results stay
  fi
  local left=$((BUDGET - RESERVE - $(elapsed)))
  local t=$((max < left ? max : left))
  if ((t < 15)); then
    say "SKIPPED $name: $((left > 0 ? left : 0)) s left of the ${BUDGET} s budget"
    printf '%s\tSKIPPED\t0\tno time left\n' "$name" >>"$STATUS"
    return 0
  fi
  say "[$(elapsed)s] $name (timeout ${t}s) ..."
  local t1=$SECONDS rc
  timeout -k 10 "$t" bash -c '"$@"' _ "$@" >"$W/$name.log" 2>&1
  rc=$?
  local dt=$((SECONDS - t1)) st=OK why=""
  if ((rc == 124 || rc == 137)); then
    st=TIMEOUT why="killed after ${t}s"
  elif ((rc != 0)); then
    st=FAILED why=$(grep -E 'Error|error|Exception|FAILED' "$W/$name.log" | tail -1 | cut -c1-200)
    [[ -n $why ]] || why="exit $rc"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$dt" "$why" >>"$STATUS"
  {
    echo "===== $name: $st (${dt}s) $why"
    cat "$W/$name.log"
  } >>"$LOG"
  if [[ $st == OK ]]; then
    say "  $name OK (${dt}s)"
  else
    say "  $name $st (${dt}s): $why"
    tail -n 8 "$W/$name.log" | cut -c1-200 | sed 's/^/    | /' | tee -a "$LOG"
  fi
  return 0
}

# ---------------------------------------------------------------------------------- steps
do_env() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: none"
  nvidia-smi -L 2>/dev/null
  uname -srm
  echo "cpus: $(nproc)"
  "$PY" - "$RUN/model/$GGUF_NAME" <<'EOF'
import importlib.metadata as md, json, os, platform, sys, time, traceback
from pathlib import Path
W, errors = Path(os.environ["W"]), []
v = {"python": platform.python_version(), "executable": sys.executable}
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch",
          "transformers", "tokenizers", "numpy", "pyarrow", "ml-collections", "gguf"):
    try:
        v[p] = md.version(p)
    except md.PackageNotFoundError:
        v[p] = None
t = time.perf_counter()
import jax
v["jax_devices"] = [str(d) for d in jax.devices()]
v["jax_backend"] = jax.default_backend()
v["device_kind"] = jax.devices()[0].device_kind
v["jax_init_s"] = round(time.perf_counter() - t, 1)
import torch
v["torch_cuda"] = torch.cuda.is_available()
v["torch_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
v["torch_cuda_version"] = torch.version.cuda
print(json.dumps(v, indent=1), flush=True)
(W / "env.json").write_text(json.dumps(v, indent=1))
if os.environ["DEVICE"] == "gpu" and v["jax_backend"] != "gpu":
    errors.append(f"JAX runs on {v['jax_backend']}, not the GPU")
if os.environ["DEVICE"] == "gpu" and not v["torch_cuda"]:
    errors.append("torch sees no CUDA device")
keys = {}
try:  # the project and the recipes import (ml_collections, gguf from /tmp/site)
    t = time.perf_counter()
    import gguf, ml_collections
    import resofilter_jax.scoring.pipeline  # noqa: F401
    sys.path.insert(0, "bench")
    import common
    print(f"import resofilter_jax.scoring.pipeline + bench/common: {time.perf_counter() - t:.1f} s")
    print("ml_collections", ml_collections.__file__, "gguf", gguf.__file__)
    for name, path in (("ifd", "configs/ifd_smollm2_sharegpt.py"),
                       ("reso", "configs/reso_smollm2_gsm8k.py")):
        c = common.load_config(path, {})
        keys[name] = {k: k in c.model for k in ("attention", "matmul_precision")}
        keys[name]["attention_default"] = c.model.get("attention")
    print("config keys:", keys)
except Exception:
    traceback.print_exc()
    errors.append("error: import resofilter_jax / the configs failed")
(W / "imports.json").write_text(json.dumps({"keys": keys}))
gguf_path = Path(sys.argv[1])
if gguf_path.is_file():  # the shipped tokenizer cache is found (no GGUF conversion here)
    try:
        from resofilter_jax.models.loading import gguf_tokenizer_cache, load_tokenizer
        c = gguf_tokenizer_cache(gguf_path)
        print("tokenizer cache", c.name, "present:", (c / "tokenizer_config.json").is_file())
        t = time.perf_counter()
        tok = load_tokenizer(gguf_path.parent, gguf_file=gguf_path.name)
        print(f"tokenizer: {len(tok)} tokens in {time.perf_counter() - t:.1f} s")
    except Exception:
        traceback.print_exc()
        errors.append("error: the tokenizer did not load")
if errors:
    sys.exit("; ".join(errors))
EOF
}

do_stash() {
  set -e
  mkdir -p /root/gpu_stash
  rm -rf /root/gpu_stash/a
  cp -r "$REPO/.gpu/a" /root/gpu_stash/a
  du -sh /root/gpu_stash/a
}

do_assemble() {
  set -e
  local p0=$A/model/$GGUF_NAME.part0 p1=$B/model/$GGUF_NAME.part1
  ls -la "$p0" "$p1"
  cat "$p0" "$p1" >"$RUN/model/$GGUF_NAME.tmp"
  local want got
  want=$(cut -d' ' -f1 "$A/model/$GGUF_NAME.sha256")
  got=$(sha256sum "$RUN/model/$GGUF_NAME.tmp" | cut -d' ' -f1)
  echo "sha256 $got (expected $want)"
  [[ $got == "$want" ]] || { echo "error: GGUF sha256 mismatch"; exit 1; }
  mv "$RUN/model/$GGUF_NAME.tmp" "$RUN/model/$GGUF_NAME"
  # the mtime the shipped tokenizer cache is keyed by (bench/prepare_gpu_carry.sh)
  touch -d "@$(cat "$A/model/mtime")" "$RUN/model/$GGUF_NAME"
  rm -rf "$RUN/data" "$RUN/cache"
  tar -C "$RUN" -xzf "$A/payload.tar.gz"
  ls -laR "$RUN/data" "$RUN/cache" | head -20
}

do_install() {
  set -e
  mkdir -p /tmp/site
  pipi() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$@" ||
      for w in "$@"; do "$PY" -m zipfile -e "$w" /tmp/site; done # no pip: wheels are zips
  }
  pipi "$A"/whl/*.whl # ml-collections, gguf: only these, never their dependencies
  for m in absl:absl_py yaml:pyyaml; do
    "$PY" -c "import ${m%%:*}" 2>/dev/null || pipi "$A"/whl_extra/"${m#*:}"-*.whl
  done
  ls /tmp/site
  "$PY" -c "
import ml_collections, gguf, absl, yaml, numpy
print('ml_collections', ml_collections.__file__); print('gguf', gguf.__file__)
print('numpy', numpy.__version__, numpy.__file__)"
}

key() { # key METHOD FIELD -> 0 if the config has model.FIELD
  "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$W/imports.json'))['keys']['$1']['$2'] else 1)" 2>/dev/null
}

# bench NAME SCRIPT DTYPE ROWS TORCH_ROWS [extra args]
bench() {
  local name=$1 script=$2 dtype=$3 rows=$4 trows=$5
  shift 5
  local data=$SHAREGPT
  [[ $script == bench/bench_reso.py ]] && data=$GSM8K
  "$PY" "$script" --device "$DEVICE" --dtype "$dtype" --samples "$rows" \
    --torch_samples "$trows" --torch_dtype float32 --no-check_rankings --process_runs '' \
    --model_path "$GGUF" --data_path "$data" --set num_devices=1 \
    --work_dir "$W/wd_$name" --json "$W/$name.json" --json_scores "$@"
}
export -f do_env do_stash do_assemble do_install bench key
export SHAREGPT GSM8K GGUF

say "gpu_check: $([[ $DRY == 1 ]] && echo DRY RUN on CPU || echo "device $DEVICE")," \
  "budget ${BUDGET}s, part a from $A, OUT=$OUT"
if [[ $SMOKE == 1 ]]; then
  step stash 30 do_stash
  step install 30 do_install
  step env 60 do_env
  grep -h -A1 '^name, memory.total' "$W/env.log" 2>/dev/null
  grep -hE '"(python|jax|jaxlib|torch|transformers|device_kind|torch_device|jax_backend)"' \
    "$W/env.json" 2>/dev/null | tr -d ' ,' | tr '\n' ' '
  echo
  grep -h 'config keys\|^import \|^ml_collections' "$W/env.log" 2>/dev/null
  cat "$STATUS"
  exit 0
fi
step assemble 40 do_assemble
step install 30 do_install
step env 70 do_env

PREC=(--jax_matmul_precision highest)
key ifd matmul_precision && PREC+=(--set model.matmul_precision=highest)
# Device-only forward + loss (no host pipeline): MFU of the model compute per attention backend.
step device_fwd 75 "$PY" bench/device_forward.py --model_path "$GGUF" --batch 32 --length 1024 \
  --backends "${DEVICE_FWD_BACKENDS:-auto,reference,xla,pallas_gpu,cudnn}" --iters 10 \
  --json "$W/device_fwd.txt"
step ifd_bf16 110 bench ifd_bf16 bench/bench_ifd.py bfloat16 "$IFD_ROWS" "$IFD_TORCH"
step reso_bf16 110 bench reso_bf16 bench/bench_reso.py bfloat16 "$RESO_ROWS" "$RESO_TORCH"
step ifd_fp32 100 bench ifd_fp32 bench/bench_ifd.py float32 "$IFD_FP32_ROWS" 0 "${PREC[@]}"
PREC=(--jax_matmul_precision highest)
key reso matmul_precision && PREC+=(--set model.matmul_precision=highest)
step reso_fp32 90 bench reso_fp32 bench/bench_reso.py float32 "$RESO_FP32_ROWS" 0 "${PREC[@]}"

if key ifd attention; then
  for att in $BACKENDS; do
    extra=(--set model.attention="$att")
    [[ $att == cudnn ]] && extra+=(--set pack=False) # cuDNN takes unpacked rows
    step "ifd_att_$att" 50 bench "ifd_att_$att" bench/bench_ifd.py bfloat16 "$BACKEND_ROWS" 0 \
      "${extra[@]}"
  done
else
  say "SKIPPED ifd_att_*: the config has no model.attention yet"
  printf 'ifd_att_*\tSKIPPED\t0\tno model.attention in the config\n' >>"$STATUS"
fi

# ---------------------------------------------------------------------------------- summary
[[ -f $W/device_fwd.log ]] && grep -E 'tok/s|FAILED|peak' "$W/device_fwd.log" | tee -a "$LOG"
RESERVE=0
step summary 60 "$PY" - "$W" "$REF" "$OUT" <<'EOF'
"""One table of every bench run + score agreement with the CPU fp32 reference."""
import json, math, sys
from pathlib import Path

sys.path.insert(0, "bench")
import numpy as np
import common

W, REF, OUT = (Path(a) for a in sys.argv[1:4])
status = [l.rstrip("\n").split("\t") for l in (W / "status.tsv").read_text().splitlines()]
env = json.loads((W / "env.json").read_text()) if (W / "env.json").is_file() else {}
runs = {}
for p in sorted(W.glob("*.json")):
    if p.stem not in ("env", "imports"):
        runs[p.stem] = json.loads(p.read_text())

def f(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

rows, table = [], []
for name, r in runs.items():
    ms = {m["name"]: m for m in r["measures"]}
    st, first = ms.get("project steady state"), ms.get("project in-process, 1st call")
    t = r.get("torch")
    row = {
        "run": name,
        "attention": (r.get("attention") or {}).get("backend"),
        "matmul_precision": r.get("matmul_precision"),
        "rows": st["samples"],
        "tokens": st["tokens"],
        "steady_s": st["seconds"],
        "samples_per_s": st["samples_per_s"],
        "tokens_per_s": st["tokens_per_s"],
        "mfu": st["mfu"],
        "first_call_s": first["seconds"] if first else None,
        "compile_s_approx": first["seconds"] - st["seconds"] if first else None,
        "peak_device_mb": st.get("device_mb"),
        "peak": r.get("peak"),
        "torch_samples": t["samples"] if t else None,
        "torch_samples_per_s": t["samples_per_s"] if t else None,
        "torch_tokens_per_s": t["tokens_per_s"] if t else None,
        "torch_mfu": t["mfu"] if t else None,
        "torch_device_mb": t.get("device_mb") if t else None,
        "ratio_tokens_per_s": r["ratios"]["project steady state"]["tokens_per_s"] if t else None,
        "ratio_samples_per_s": r["ratios"]["project steady state"]["samples_per_s"] if t else None,
        "torch_agreement": r.get("torch_agreement"),
    }
    rows.append(row)

def ref_scores(kind):
    p = REF / kind / "scores.parquet"
    if not p.is_file():
        return None
    import pyarrow.parquet as pq
    t = pq.read_table(p).to_pydict()
    col = "ifd" if kind == "ifd" else "score"
    return {int(i): (float(v) if v is not None else math.nan) for i, v in zip(t["index"], t[col])}

def compare(a, b):
    keys = sorted(set(a) & set(b))
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    rho, n = common.spearman(x, y)
    return {"n": n, "spearman": rho, "max_rel_diff": common.max_rel_diff(x, y)}

agree = {}
for kind, prefix in (("ifd", "ifd_"), ("reso", "reso_")):
    ref = ref_scores(kind)
    sc = {n: {int(k): v for k, v in r.get("scores", {}).get("project", {}).items()}
          for n, r in runs.items() if n.startswith(prefix)}
    for n, r in runs.items():
        if n.startswith(prefix) and "torch" in r.get("scores", {}):
            sc[n.replace("bf16", "torch_fp32")] = {int(k): v for k, v in r["scores"]["torch"].items()}
    for n, s in sc.items():
        if ref is not None:
            agree[f"{n} vs CPU fp32 ref"] = compare(s, ref)
    if f"{prefix}bf16" in sc and f"{prefix}fp32" in sc:
        agree[f"{prefix}bf16 vs {prefix}fp32 (GPU)"] = compare(sc[f"{prefix}bf16"], sc[f"{prefix}fp32"])
    for n in sc:
        if "_att_" in n and f"{prefix}bf16" in sc:
            agree[f"{n} vs {prefix}bf16 (auto)"] = compare(sc[n], sc[f"{prefix}bf16"])
        if n.endswith("att_reference"):
            for m in sc:
                if "_att_" in m and m != n:
                    agree[f"{m} vs {n}"] = compare(sc[m], sc[n])

lines = []
dev = env.get("device_kind") or env.get("torch_device") or "?"
lines.append(f"GPU check on {dev}: python {env.get('python')}, jax {env.get('jax')} "
             f"({env.get('jax_backend')}), torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}")
lines.append("")
lines.append("step                  status    s  note")
for s in status:
    s += [""] * (4 - len(s))
    lines.append(f"{s[0]:<21} {s[1]:<8}{s[2]:>4}  {s[3][:90]}")
lines.append("")
h = (f"{'run':<20}{'attention':>11}{'rows':>6}{'steady s':>9}{'samp/s':>9}{'tok/s':>10}{'MFU':>7}"
     f"{'compile~s':>10}{'devMB':>8}{'torch n':>8}{'torch tok/s':>12}{'x torch':>8}")
lines.append(h)
lines.append("-" * len(h))
for r in rows:
    lines.append(
        f"{r['run']:<20}{str(r['attention'] or '-'):>11}{r['rows']:>6}{f(r['steady_s'], '9.2f'):>9}"
        f"{f(r['samples_per_s'], '9.1f'):>9}{f(r['tokens_per_s'], '10.0f'):>10}"
        f"{f(r['mfu'] * 100 if r['mfu'] is not None else None, '6.1f'):>6}%"
        f"{f(r['compile_s_approx'], '10.1f'):>10}{f(r['peak_device_mb'], '8.0f'):>8}"
        f"{f(r['torch_samples'], 'd'):>8}{f(r['torch_tokens_per_s'], '12.0f'):>12}"
        f"{f(r['ratio_tokens_per_s'], '7.1f'):>7}x"
    )
lines.append("(steady: 2nd in-process call; compile~: 1st call - steady; MFU vs the peak in "
             "bench/common.py PEAKS (H200: bf16 989, fp32 67 TFLOP/s dense); torch: fp32 "
             "batch-of-one loop on the same device, x torch = project/torch tokens/s)")
lines.append("")
lines.append(f"{'score agreement':<48}{'n':>6}{'Spearman':>10}{'max rel diff':>14}")
for k, a in agree.items():
    lines.append(f"{k:<48}{a['n']:>6}{f(a['spearman'], '10.5f'):>10}"
                 f"{f(a['max_rel_diff'], '14.2e'):>14}")
for r in rows:
    if r["torch_agreement"]:
        a = r["torch_agreement"]
        lines.append(f"{r['run'] + ' project vs torch fp32 (same GPU)':<48}{a['n']:>6}"
                     f"{f(a['spearman'], '10.5f'):>10}{f(a['max_rel_diff'], '14.2e'):>14}")
text = "\n".join(lines)
print(text)
(OUT / "summary.txt").write_text(text + "\n")
summary = {"env": env, "status": status, "runs": rows, "agreement": agree,
           "peaks": {k: v for k, v in common.PEAKS}}
(OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
EOF
[[ -f $OUT/summary.txt ]] && cat "$OUT/summary.txt" | tee -a "$LOG" >/dev/null
tar -C "$W" -czf "$OUT/details.tar.gz" --exclude='wd_*' . 2>/dev/null
say "[$(elapsed)s] done; outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
[[ -f $OUT/summary.txt ]] && cat "$OUT/summary.txt" || cat "$STATUS"

#!/usr/bin/env bash
# CPU fast-mode check (issue 13): every CPU target of the precision issue in one run, on the
# machine at hand, against the fp32 PyTorch loops measured in the same runs. Made for a CPU
# with bf16 units (AVX512_BF16 / AMX-BF16), where the targets apply; on any other CPU it
# records the same figures (the summary says which kind of CPU it ran on).
# Run it inside the project's environment (README's second command sets it up; the torch
# loops need the `test` extra) on an otherwise idle machine: the figures are timings.
#
#   bash bench/cpu_check.sh                  # the whole check (~40 min on a 2-core VM)
#   CPU_CHECK_DRY=1 bash bench/cpu_check.sh  # tiny counts: every step exercised (~11 min on
#                                            # 2 cores); its ratios are not measurements
#   CPU_CHECK_ONLY='ifd' bash ...            # rerun only the steps matching this regex
#
# Steps (each in its own process; a failing step prints FAILED and the rest go on):
#   machine     CPU model, ISA flags, GEMM table at SmolLM2's shapes (bench/machine.py)
#   ifd_fp32    bench_ifd.py fp32 (matmul precision highest), IFD_ROWS rows, whole-process
#               runs (cold, then warm compilation cache) + the torch fp32 loop (IFD_TORCH rows)
#   ifd_bf16    bench_ifd.py bf16, same rows, + the fp32 project run for the rankings
#   reso_bf16   bench_reso.py bf16, RESO_ROWS rows, + torch fp32 loop + fp32 rankings
#   train_fp32  bench_train.py fp32: the SFT step vs the torch AdamW loop (TRAIN_STEPS steps)
#   train_bf16  bench_train.py bf16 compute (fp32 master weights) vs the same fp32 torch loop
#   train_bf16_packed  the same with --pack_batches: the project packs each step's rows into
#               fewer rows (data.pack_batches: same examples and loss); torch keeps them padded
#   summary     bench/cpu_targets.py: each target, the measured figure, met or not
# Outputs in $OUT (default ./cpu_out): <step>.log, <step>.json, summary.txt, summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/cpu_out}
mkdir -p "$OUT"
PY=${PY:-python}
if [[ ${CPU_CHECK_DRY:-0} == 1 ]]; then
  IFD_ROWS=${IFD_ROWS:-12} IFD_TORCH=${IFD_TORCH:-3} RESO_ROWS=${RESO_ROWS:-6}
  RESO_TORCH=${RESO_TORCH:-2} TRAIN_BATCH=${TRAIN_BATCH:-2} TRAIN_LEN=${TRAIN_LEN:-128}
  TRAIN_STEPS=${TRAIN_STEPS:-2} GEMM_TOKENS=${GEMM_TOKENS:-512}
else
  # >= 64 rows for the rankings (the issue's Spearman targets are on >= 64 real rows)
  IFD_ROWS=${IFD_ROWS:-128} IFD_TORCH=${IFD_TORCH:-24} RESO_ROWS=${RESO_ROWS:-64}
  RESO_TORCH=${RESO_TORCH:-12} TRAIN_BATCH=${TRAIN_BATCH:-8} TRAIN_LEN=${TRAIN_LEN:-512}
  TRAIN_STEPS=${TRAIN_STEPS:-4} GEMM_TOKENS=${GEMM_TOKENS:-4096}
fi
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 PYTHONUNBUFFERED=1

step() { # step NAME COMMAND...: runs it unless CPU_CHECK_ONLY excludes it; logs to OUT/NAME.log
  local name=$1
  shift
  if [[ -n ${CPU_CHECK_ONLY:-} && ! $name =~ ${CPU_CHECK_ONLY} ]]; then
    return 0
  fi
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED (rc $?, $((SECONDS - t0)) s): see $OUT/$name.log"
  fi
}

step machine "$PY" bench/machine.py --model smollm2 --tokens "$GEMM_TOKENS" \
  --json "$OUT/machine.json"
step ifd_fp32 "$PY" bench/bench_ifd.py --samples "$IFD_ROWS" --torch_samples "$IFD_TORCH" \
  --dtype float32 --json "$OUT/ifd_fp32.json"
step ifd_bf16 "$PY" bench/bench_ifd.py --samples "$IFD_ROWS" --torch_samples "$IFD_TORCH" \
  --dtype bfloat16 --torch_dtype float32 --process_runs "" --json "$OUT/ifd_bf16.json"
step reso_bf16 "$PY" bench/bench_reso.py --samples "$RESO_ROWS" --torch_samples "$RESO_TORCH" \
  --dtype bfloat16 --torch_dtype float32 --process_runs "" --json "$OUT/reso_bf16.json"
for pair in fp32:float32 bf16:bfloat16; do
  step "train_${pair%%:*}" "$PY" bench/bench_train.py --batch "$TRAIN_BATCH" \
    --seq_len "$TRAIN_LEN" --steps "$TRAIN_STEPS" --warmup_steps 1 --dtype "${pair#*:}" \
    --json "$OUT/train_${pair%%:*}.json"
done
step train_bf16_packed "$PY" bench/bench_train.py --batch "$TRAIN_BATCH" --seq_len "$TRAIN_LEN" \
  --steps "$TRAIN_STEPS" --warmup_steps 1 --dtype bfloat16 --pack_batches \
  --json "$OUT/train_bf16_packed.json"
"$PY" bench/cpu_targets.py "$OUT" | tee "$OUT/summary.txt"

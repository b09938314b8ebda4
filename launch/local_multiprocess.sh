#!/usr/bin/env bash
# N local processes x M virtual CPU devices each, joined by jax.distributed (gloo collectives).
#
#   launch/local_multiprocess.sh [-n N] [-d M] [-p PORT] [-l LOG_DIR] [-m MODULE] -- \
#       --config configs/ifd_smollm2_sharegpt.py --config.data.limit=64 --config.output_dir=out
#
# Everything after `--` is passed to `python -m MODULE` (default resofilter_jax.score; e.g.
# resofilter_jax.train) on every process, plus
# --config.distributed.{coordinator_address,num_processes,process_id}. PORT defaults to a free
# one; with LOG_DIR each process logs to LOG_DIR/process-P.log (else to this terminal).
# Exits 0 when every process succeeded; when one fails the others are stopped and the exit
# status is that first failure's. Set PYTHON to choose the interpreter (default: python).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

num_procs=2
devices=4
port=""
log_dir=""
module="resofilter_jax.score"
while getopts "n:d:p:l:m:h" opt; do
  case "${opt}" in
    n) num_procs="${OPTARG}" ;;
    d) devices="${OPTARG}" ;;
    p) port="${OPTARG}" ;;
    l) log_dir="${OPTARG}" ;;
    m) module="${OPTARG}" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi

python_bin="${PYTHON:-python}"
if [[ -z "${port}" ]]; then
  port="$("${python_bin}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -n "${log_dir}" ]]; then mkdir -p "${log_dir}"; fi

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((p = 0; p < num_procs; p++)); do
  cmd=(
    "${python_bin}" -m "${module}" "$@"
    "--config.distributed.coordinator_address=127.0.0.1:${port}"
    "--config.distributed.num_processes=${num_procs}"
    "--config.distributed.process_id=${p}"
  )
  if [[ -n "${log_dir}" ]]; then
    XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
      "${cmd[@]}" >"${log_dir}/process-${p}.log" 2>&1 &
  else
    XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
      "${cmd[@]}" &
  fi
  pids+=("$!")
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  rc=0
  finished=""
  wait -n -p finished "${running[@]}" || rc=$?
  if [[ -z "${finished}" ]]; then break; fi  # nothing left to wait for
  left=()
  for pid in "${running[@]}"; do
    if [[ "${pid}" != "${finished}" ]]; then left+=("${pid}"); fi
  done
  running=("${left[@]}")
  if ((rc != 0 && status == 0)); then
    status=${rc}
    echo "local_multiprocess: a process exited with status ${rc}; stopping the others" >&2
    stop_all
  fi
done
exit "${status}"

#!/usr/bin/env bash
# Scoring on a Cloud TPU VM slice: create (or reuse) it, install the package on every worker,
# run the same command on all workers (jax.distributed detects the pod).
#
#   launch/tpu_pod.sh -n my-tpu -z us-central2-b -t v4-32 [-v tpu-ubuntu2204-base] [-p PROJECT] \
#       -- --config configs/ifd_smollm2_sharegpt.py --config.output_dir=/mnt/shared/out
#
# Steps: `gcloud compute tpus tpu-vm describe` (reuse) or `... create`; `scp` of a source
# archive of this checkout to every worker (--worker=all); `pip install` of it with
# jax[tpu]; `ssh --worker=all --command` running `python -m resofilter_jax.score ARGS` on every
# worker at once. OUTPUT_DIR must be shared by the workers (e.g. a Filestore / GCS-fuse mount);
# re-running the same command resumes a killed job. Set SKIP_INSTALL=1 to skip the copy and
# install on a slice that already has this version. MODULE=resofilter_jax.train runs training
# instead of scoring (default: resofilter_jax.score).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

name=""
zone=""
accel=""
version="tpu-ubuntu2204-base"
project=""
while getopts "n:z:t:v:p:h" opt; do
  case "${opt}" in
    n) name="${OPTARG}" ;;
    z) zone="${OPTARG}" ;;
    t) accel="${OPTARG}" ;;
    v) version="${OPTARG}" ;;
    p) project="${OPTARG}" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ -z "${name}" || -z "${zone}" || -z "${accel}" || $# -eq 0 ]]; then
  usage >&2
  exit 2
fi

gc=(gcloud compute tpus tpu-vm)
common=(--zone="${zone}")
if [[ -n "${project}" ]]; then common+=(--project="${project}"); fi

if "${gc[@]}" describe "${name}" "${common[@]}" >/dev/null 2>&1; then
  echo "tpu_pod: reusing ${name}" >&2
else
  echo "tpu_pod: creating ${name} (${accel}, ${version})" >&2
  "${gc[@]}" create "${name}" "${common[@]}" --accelerator-type="${accel}" --version="${version}"
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  archive="$(mktemp -d)/resofilter_jax.tar.gz"
  tar -C "${repo_root}" --exclude=.venv --exclude=outputs --exclude=.git -czf "${archive}" .
  "${gc[@]}" scp "${archive}" "${name}:~/resofilter_jax.tar.gz" "${common[@]}" --worker=all
  "${gc[@]}" ssh "${name}" "${common[@]}" --worker=all --command \
    'set -e; mkdir -p ~/resofilter_jax && tar -C ~/resofilter_jax -xzf ~/resofilter_jax.tar.gz && python3 -m pip install -q -U "jax[tpu]" && python3 -m pip install -q -e ~/resofilter_jax && python3 -m resofilter_jax.assets fetch'
fi

module="${MODULE:-resofilter_jax.score}"
# Quote every argument for the remote shell, then run the same command on every worker.
remote_args=""
for arg in "$@"; do
  remote_args+=" $(printf '%q' "${arg}")"
done
"${gc[@]}" ssh "${name}" "${common[@]}" --worker=all --command \
  "cd ~/resofilter_jax && TOKENIZERS_PARALLELISM=false python3 -m ${module}${remote_args}"

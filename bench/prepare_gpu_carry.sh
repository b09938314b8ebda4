#!/usr/bin/env bash
# Builds the two carry folders that bench/gpu_check.sh needs on a lent GPU machine that has no
# network and no ~/.cache/resofilter_jax (run HERE, from the repository root, once):
#
#   .gpu/a  (< 55 MiB)  model/: the first 46 MiB of the SmolLM2 GGUF + sha256s; whl/: the
#                       wheels the remote lacks (ml-collections, gguf; whl_extra/: absl-py,
#                       PyYAML, installed only where missing); payload.tar.gz: data/ (the
#                       first $SHAREGPT_ROWS records of the embedded ShareGPT JSON, same
#                       format, and the GSM8K test file) + cache/tokenizers/ (the GGUF's
#                       converted tokenizer); ref/: CPU fp32 reference scores
#                       (ref/ifd/scores.parquet, ref/reso/scores.parquet)
#   .gpu/b  (< 55 MiB)  model/: the rest of the GGUF
#   .gpu/work           local only: the uncompressed payload and the reference runs
#
#   bash bench/prepare_gpu_carry.sh            # everything (the references take minutes)
#   SKIP_REF=1 bash bench/prepare_gpu_carry.sh # rebuild all but the reference scores
#
# Env: PY (default .venv/bin/python), RESOFILTER_CACHE (asset cache, default
# ~/.cache/resofilter_jax), SHAREGPT_ROWS (2500), REF_IFD_ROWS (256), REF_RESO_ROWS (128).
# /.gpu/ is added to .git/info/exclude (never committed; it travels as a "carry" path).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
CACHE=${RESOFILTER_CACHE:-$HOME/.cache/resofilter_jax}
SHAREGPT_ROWS=${SHAREGPT_ROWS:-2500}
REF_IFD_ROWS=${REF_IFD_ROWS:-256}
REF_RESO_ROWS=${REF_RESO_ROWS:-128}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF=$CACHE/smollm2/$GGUF_NAME
SHAREGPT=$CACHE/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json
GSM8K=$CACHE/gsm8k/test.jsonl
# The reassembled GGUF gets this mtime on the remote, so the shipped tokenizer cache
# (keyed by stem-size-mtime_ns, resofilter_jax/models/loading.py) is found there.
GGUF_MTIME=1700000000

for f in "$GGUF" "$SHAREGPT" "$GSM8K"; do
  [[ -f $f ]] || { echo "error: $f missing (python -m resofilter_jax.assets fetch)" >&2; exit 1; }
done

mkdir -p .git/info
for x in /.gpu/ /gpu_out/; do
  grep -qxF "$x" .git/info/exclude 2>/dev/null || echo "$x" >>.git/info/exclude
done

A=.gpu/a B=.gpu/b
mkdir -p "$A" "$B"
W=.gpu/work
rm -rf "$A/model" "$B/model" "$A/whl" "$A/whl_extra" "$A/payload.tar.gz" "$W/payload"
mkdir -p "$A/model" "$B/model" "$A/whl" "$A/whl_extra" "$W/payload/data" \
  "$W/payload/cache/tokenizers"

echo "== GGUF: two parts + sha256"
size=$(stat -c %s "$GGUF")
half=$((46 << 20))  # part a also holds the data; both parts stay < 50 MiB
head -c "$half" "$GGUF" >"$A/model/$GGUF_NAME.part0"
tail -c +"$((half + 1))" "$GGUF" >"$B/model/$GGUF_NAME.part1"
sha256sum "$GGUF" | awk -v n="$GGUF_NAME" '{print $1 "  " n}' >"$A/model/$GGUF_NAME.sha256"
cp "$A/model/$GGUF_NAME.sha256" "$B/model/"
(cd "$A/model" && sha256sum "$GGUF_NAME.part0" >part0.sha256)
(cd "$B/model" && sha256sum "$GGUF_NAME.part1" >part1.sha256)
echo "$size" >"$A/model/size"
echo "$GGUF_MTIME" >"$A/model/mtime"
cat "$A/model/$GGUF_NAME.part0" "$B/model/$GGUF_NAME.part1" | sha256sum | cut -d' ' -f1 |
  cmp -s - <(cut -d' ' -f1 "$A/model/$GGUF_NAME.sha256") || { echo "error: split" >&2; exit 1; }

echo "== wheels (python 3.12, no deps)"
PIPDL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
"${PIPDL[@]}" -d "$A/whl" ml-collections==1.1.0 gguf==0.19.0
# Installed on the remote only where its own copy is missing (it has both, we are told):
"${PIPDL[@]}" -d "$A/whl_extra" absl-py==2.5.1 PyYAML==6.0.4
for w in "$A"/whl/*.whl; do
  echo "  $(basename "$w"): $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' |
    grep -v 'extra ==' | sed 's/Requires-Dist: //' | tr '\n' ' ')"
done

echo "== data: first $SHAREGPT_ROWS ShareGPT records, GSM8K test"
"$PY" - "$SHAREGPT" "$W/payload/data/sharegpt_head.json" "$SHAREGPT_ROWS" <<'EOF'
import json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
dec, out = json.JSONDecoder(), []
with open(src, encoding="utf-8") as f:
    text = f.read(64 << 20)  # the first records are well inside the first 64 MB
i = text.index("[") + 1
while len(out) < n:
    while text[i] in " \t\r\n,":
        i += 1
    obj, i = dec.raw_decode(text, i)
    out.append(obj)
with open(dst, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
    f.write("\n")
print(f"  {len(out)} records -> {dst}")
EOF
cp "$GSM8K" "$W/payload/data/gsm8k_test.jsonl"

echo "== tokenizer of the GGUF, converted once (found on the remote by size + mtime)"
tmpg=$(mktemp -d)
trap 'rm -rf "$tmpg"' EXIT
cp "$GGUF" "$tmpg/$GGUF_NAME"
tar -C "$W/payload" -czf "$A/payload.tar.gz" data cache
touch -d "@$GGUF_MTIME" "$tmpg/$GGUF_NAME"
tar -C "$W/payload" -czf "$A/payload.tar.gz" data cache
RESOFILTER_CACHE=$REPO/$W/payload/cache "$PY" -c "
import sys
from pathlib import Path
from resofilter_jax.models.loading import gguf_tokenizer_cache, load_tokenizer
p = Path(sys.argv[1])
tok = load_tokenizer(p.parent, gguf_file=p.name)
c = gguf_tokenizer_cache(p)
assert (c / 'tokenizer_config.json').is_file(), c
print('  ', c.name, len(tok))
" "$tmpg/$GGUF_NAME"
tar -C "$W/payload" -czf "$A/payload.tar.gz" data cache

if [[ -z ${SKIP_REF:-} ]]; then
  echo "== CPU fp32 reference scores (minutes on 2 cores)"
  mkdir -p "$A/ref"
  run_ref() { # name config data rows
    local out=$REPO/$W/ref/$1
    rm -rf "$out"
    local prec=()
    if PYTHONPATH=$REPO "$PY" -c "
import importlib.util, sys
s = importlib.util.spec_from_file_location('c', sys.argv[1]); m = importlib.util.module_from_spec(s)
s.loader.exec_module(m); sys.exit(0 if 'matmul_precision' in m.get_config().model else 1)" "$2"; then
      prec=(--config.model.matmul_precision=highest)
    fi
    local t0=$SECONDS
    TQDM_DISABLE=1 PYTHONPATH=$REPO nice -n 10 "$PY" -m resofilter_jax.score --config "$2" \
      --config.data.limit="$4" --config.data.path="$REPO/$3" --config.model.path="$GGUF" \
      --config.model.dtype=float32 --config.model.param_dtype=float32 "${prec[@]}" \
      --config.progress=False --config.output_dir="$out" --config.compilation_cache_dir="" \
      >"$REPO/$W/ref/$1.log" 2>&1 || { tail -20 "$REPO/$W/ref/$1.log"; exit 1; }
    mkdir -p "$A/ref/$1"
    cp "$out/scores.parquet" "$out/run.json" "$A/ref/$1/"
    echo "  $1: $4 rows in $((SECONDS - t0)) s -> $A/ref/$1/scores.parquet"
  }
  mkdir -p "$W/ref"
  run_ref ifd configs/ifd_smollm2_sharegpt.py "$W/payload/data/sharegpt_head.json" "$REF_IFD_ROWS"
  run_ref reso configs/reso_smollm2_gsm8k.py "$W/payload/data/gsm8k_test.jsonl" "$REF_RESO_ROWS"
fi

du -sh "$A" "$B"
for d in "$A" "$B"; do
  kb=$(du -sk "$d" | cut -f1)
  ((kb < 55 * 1024)) || { echo "error: $d is ${kb} KiB (> 55 MiB)" >&2; exit 1; }
done
(cd .gpu && find a b -type f | sort | xargs sha256sum >../.gpu/manifest.sha256) || true
echo "ready: carry .gpu/a (call 1), .gpu/b (call 2); see bench/gpu_check.sh"

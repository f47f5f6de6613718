#!/usr/bin/env bash
# fastntk's GPU checks and benchmarks (issue 3), prepared for one call of the lent GPU
# machine each (a call may run 10 minutes; a session has 15 minutes of device time):
#
#   bash bench/gpu_suite.sh check    # CUDA build of fastntk._C; methods vs the float64 oracle on
#                                    # CUDA, Triton Gram modes, the C++ CUDA kernels (~5 min)
#   bash bench/gpu_suite.sh engine   # NB201 N=1024 "sum" and "trace": floor, auto, triton, vmap (~5 min)
#   bash bench/gpu_suite.sh scale    # exact N=16384 "sum", sketch N=100,000 m=4096 (~5 min)
#   bash bench/gpu_suite.sh models   # ResNet-18 and ViT: auto, layerwise, triton, vmap, N=256/1024
#                                    # (~5 min; a fourth call, where device time is left)
#   bash bench/gpu_suite.sh all      # the three in turn (more than one call's 10 minutes)
#   SMOKE=1 bash bench/gpu_suite.sh all   # the same plumbing on this CPU, tiny sizes (Triton interpreter)
#
# Results go to $OUT (on the lent machine its files come back to the session), default
# bench/results/gpu: gpu_check.md, the engine tables, engine_<device>.csv, suite.log.
# fastntk runs from a copy of this tree on PYTHONPATH (nothing is installed there). `check`
# first builds the C++ extension there with its CUDA kernels (setup.py build_ext against
# the machine's CUDA torch and nvcc) into that copy, for gpu_check.py's part 3; engine and
# scale do not need it ("auto" on a GPU uses no C++ op).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=$(mktemp -d)
bash "$ROOT/bench/package_copy.sh" layout "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  DEV=cpu; N=16; LN=300; LCHUNK=128; SN=600; SM=256; SCHUNK=256
  GRAM="64x512,97x1023"; BIGCHUNK=128; MN=4; CN=2
  TRITON=""  # NB201 in Triton's interpreter takes many minutes; tests/ cover it on small models
else
  DEV=cuda; N=1024; LN=16384; LCHUNK=2048; SN=100000; SM=4096; SCHUNK=4096
  GRAM="1024x36864,4096x9216,16384x2304"; BIGCHUNK=1024; MN=256,1024; CN=256
  TRITON=",triton"
fi

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/suite.log"; }
step() {  # step SECONDS CMD...: run with a time limit, keep going on failure
  local limit=$1
  shift
  log "$*"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/suite.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || log "exit status $rc"
}

build_ext() {  # the extension, CUDA kernels included where torch is a CUDA build
  log "build_ext into $SITE/fastntk"
  bash "$ROOT/bench/package_copy.sh" build "$SITE" python3 2>&1 | tail -n 30 | tee -a "$OUT/suite.log"
  [ "${PIPESTATUS[0]}" = 0 ] || log "build_ext made no fastntk/_C*.so: the C++ checks below report it"
}

check() {
  build_ext
  # `python3 -c` and `-m` put the working directory first on sys.path: run them from $SITE,
  # or they import this tree's fastntk/ (no kernels/, no extension) instead of the copy.
  step 60 env -C "$SITE" python3 -c "import json, fastntk; print(json.dumps(fastntk.env()))"
  step 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  step 300 python3 bench/gpu_check.py --device "$DEV" --gram-shapes "$GRAM" --conv-n "$CN" \
    --out "$OUT/gpu_check.md"
}

engine() {
  step 200 python3 bench/bench_engine.py --device "$DEV" --n "$N" --output sum \
    --providers "fwdbwd,floor,auto,layerwise$TRITON,vmap" --repeats 3 --csv "$OUT/engine_$DEV.csv"
  step 200 python3 bench/bench_engine.py --device "$DEV" --n "$N" --output trace \
    --providers "fwdbwd,floor,auto$TRITON,vmap" --repeats 2 --csv "$OUT/engine_$DEV.csv"
}

scale() {
  step 200 python3 bench/bench_large_n.py --device "$DEV" --n "$LN" --chunk "$LCHUNK" --check 512
  step 200 python3 bench/bench_sketch.py --device "$DEV" --n "$SN" --m "$SM" --chunk "$SCHUNK" --check "$BIGCHUNK"
}

models() {
  local m
  for m in resnet18 vit; do
    step 140 env -C "$SITE" python3 -m fastntk bench --model "$m" --n "$MN" --method "auto,layerwise$TRITON,vmap" \
      --output sum --repeat 2 --timeout 60 --csv "$OUT/models_$m.csv"
  done
}

case "${1:-all}" in
  check) check ;;
  engine) engine ;;
  scale) scale ;;
  models) models ;;
  all) check; engine; scale; models ;;
  *) echo "usage: bash bench/gpu_suite.sh check|engine|scale|models|all" >&2; exit 2 ;;
esac
rm -rf "$SITE"
log "done; results in $OUT"

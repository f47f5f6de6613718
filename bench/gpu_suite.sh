#!/usr/bin/env bash
# fastntk's GPU checks and benchmarks, planned for the lent GPU machine: a call
# may run 10 minutes, a session has 15 minutes of device time with the machine's start
# (a minute or more) counted in. Two calls, most valuable figures first:
#
#   FASTNTK_GIT=<sha> bash bench/gpu_suite.sh first    # one call, <= BUDGET s (default 480):
#       NB201 N=1024 "sum" (floor, auto, layerwise, triton, vmap), exact N=16384 "sum",
#       sketch N=100,000 m=4096, N=1024 "trace", then methods vs the float64 oracle on
#       CUDA and the Triton Gram operand modes (gpu_check parts 1-2)
#   FASTNTK_GIT=<sha> bash bench/gpu_suite.sh second   # a second call, <= BUDGET s (default 240):
#       CUDA build of fastntk._C, its kernels vs float64 references (part 3), the conv
#       weight-gradient paths (part 4), the bn="batch" kernel looped vs batched (N=64),
#       ResNet-18 and ViT tables
#
# 480 + 240 s leave the machine's start and the transfers in 15 minutes: send `second` as
# soon as `first` returns (the machine goes back after 30 s idle), with BUDGET set to the
# device tool's budget_left_s minus about 60. Each step gets at most its own limit and
# what is left of BUDGET, so the last steps are the ones cut short; each writes its
# results as it goes (gpu_check after every model). Single-purpose plans:
#
#   bash bench/gpu_suite.sh check    # CUDA build of fastntk._C; gpu_check parts 1-4 (~5 min)
#   bash bench/gpu_suite.sh engine   # NB201 N=1024 "sum" and "trace": floor, auto, triton, vmap (~5 min)
#   bash bench/gpu_suite.sh scale    # exact N=16384 "sum", sketch N=100,000 m=4096 (~5 min)
#   bash bench/gpu_suite.sh models   # ResNet-18 and ViT: auto, layerwise, triton, vmap, N=256/1024
#   SMOKE=1 bash bench/gpu_suite.sh first   # the same plumbing on this CPU, tiny sizes (Triton interpreter)
#
# Results go to $OUT (on the lent machine its files come back to the session), default
# bench/results/gpu: suite.log (every step's output, with the git SHA and versions),
# gpu_check.md, engine_<device>.csv, models_<model>.csv. The lent machine's copy of the
# tree has no .git: pass the commit in FASTNTK_GIT. fastntk runs from a copy of this tree
# on PYTHONPATH (nothing is installed there). The C++ extension is built there only for
# part 3 ("auto" on a GPU uses no C++ op).
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
case "${1:-all}" in  # seconds for the whole plan; the device tool's call limit is 600
  first) BUDGET=${BUDGET:-480} ;;
  second) BUDGET=${BUDGET:-240} ;;
  *) BUDGET=${BUDGET:-100000} ;;
esac
step() {  # step SECONDS CMD...: run with a time limit (and within BUDGET), keep going on failure
  local limit=$1
  shift
  local left=$((BUDGET - SECONDS - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    log "skipped (budget spent): $*"
    return 0
  fi
  log "[limit ${limit}s] $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/suite.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || log "exit status $rc"
  return "$rc"
}

build_ext() {  # the extension, CUDA kernels included where torch is a CUDA build
  step 200 bash "$ROOT/bench/package_copy.sh" build "$SITE" python3 ||
    log "build_ext made no fastntk/_C*.so: the C++ checks below report it"
}

header() {
  log "git ${FASTNTK_GIT:-unknown}, budget ${BUDGET}s"
  # `python3 -c` and `-m` put the working directory first on sys.path: run them from $SITE,
  # or they import this tree's fastntk/ (no kernels/, no extension) instead of the copy.
  step 60 env -C "$SITE" python3 -c "import json, fastntk; print(json.dumps(fastntk.env()))"
  [ "$DEV" = cuda ] && step 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  return 0
}

gpu_check() {  # gpu_check SECONDS PARTS
  step "$1" python3 bench/gpu_check.py --device "$DEV" --parts "$2" --gram-shapes "$GRAM" \
    --conv-n "$CN" --out "$OUT/gpu_check${3:-}.md"
}

engine_sum() {
  step "${1:-200}" python3 bench/bench_engine.py --device "$DEV" --n "$N" --output sum \
    --providers "fwdbwd,floor,auto,layerwise$TRITON,vmap" --repeats 3 --child-timeout 90 \
    --csv "$OUT/engine_$DEV.csv"
}

engine_trace() {
  step "${1:-200}" python3 bench/bench_engine.py --device "$DEV" --n "$N" --output trace \
    --providers "fwdbwd,floor,auto$TRITON,vmap" --repeats 2 --child-timeout 100 \
    --csv "$OUT/engine_$DEV.csv"
}

large_n() {
  step "${1:-200}" python3 bench/bench_large_n.py --device "$DEV" --n "$LN" --chunk "$LCHUNK" --check 512
}

sketch() {
  step "${1:-200}" python3 bench/bench_sketch.py --device "$DEV" --n "$SN" --m "$SM" --chunk "$SCHUNK" \
    --check "$BIGCHUNK"
}

coupled() {  # the bn="batch" kernel's N backward passes: a loop vs batched (vmap over them)
  step "${1:-60}" python3 bench/bench_engine_choices.py coupled --device "$DEV"
}

check() {
  header
  build_ext
  gpu_check 300 1,2,3,4
}

engine() {
  engine_sum
  engine_trace
}

scale() {
  large_n
  sketch
}

models() {
  local m
  for m in resnet18 vit; do
    step 140 python3 bench/bench_models.py --model "$m" --n "$MN" --method "auto,layerwise$TRITON,vmap" \
      --output sum --repeat 2 --timeout 60 --csv "$OUT/models_$m.csv"
  done
}

first() {  # step limits within the 480 s budget (the last step gets what is left)
  header
  engine_sum 100
  large_n 60
  sketch 70
  engine_trace 100
  gpu_check 140 1,2
}

second() {
  header
  build_ext
  gpu_check 120 3,4 _csrc
  coupled 60
  models
}

case "${1:-all}" in
  check) check ;;
  engine) engine ;;
  scale) scale ;;
  models) models ;;
  first) first ;;
  second) second ;;
  all) first; second ;;
  *) echo "usage: bash bench/gpu_suite.sh first|second|check|engine|scale|models|all" >&2; exit 2 ;;
esac
rm -rf "$SITE"
log "done; results in $OUT"

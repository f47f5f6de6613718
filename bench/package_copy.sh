#!/usr/bin/env bash
# fastntk laid out as installed, in a folder of its own, for runs that put it on
# PYTHONPATH instead of installing (the lent GPU machine; the GPU-stack CI run):
#
#   bash bench/package_copy.sh layout DEST          DEST/fastntk, kernels/ as fastntk/kernels
#   bash bench/package_copy.sh build DEST [PYTHON]  build the C++ extension with PYTHON
#                                                   (default python3) into DEST/fastntk:
#                                                   CUDA kernels included where its torch is
#                                                   a CUDA build and nvcc is found
#
# build prints setup.py's output and exits non-zero when no fastntk/_C*.so was made.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:?usage: package_copy.sh layout|build DEST [PYTHON]}
DEST=${2:?usage: package_copy.sh layout|build DEST [PYTHON]}
case "$cmd" in
  layout)
    mkdir -p "$DEST/fastntk"
    cp -r "$ROOT"/fastntk/. "$DEST/fastntk/"
    rm -f "$DEST"/fastntk/_C*.so  # a build for another machine or Python
    cp -r "$ROOT/kernels" "$DEST/fastntk/kernels"
    ;;
  build)
    PY=${3:-python3}
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    cp -r "$ROOT"/setup.py "$ROOT"/pyproject.toml "$ROOT"/csrc "$ROOT"/kernels "$build"/
    cp -r "$DEST/fastntk" "$build/fastntk"
    # torch derives CUDA_HOME from nvcc's folder when unset: /usr/local for a /usr/local/bin
    # nvcc, which holds no CUDA headers (seen on the CPU machines).
    if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
      export CUDA_HOME=/usr/local/cuda
    fi
    (cd "$build" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      timeout 300 "$PY" setup.py -q build_ext --inplace)
    ls "$build"/fastntk/_C*.so >/dev/null 2>&1 || { echo "package_copy: no fastntk/_C*.so was built" >&2; exit 1; }
    cp "$build"/fastntk/_C*.so "$DEST/fastntk/"
    ;;
  *) echo "usage: package_copy.sh layout|build DEST [PYTHON]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The test suite on the lent GPU machines' software stack, run on this CPU machine:
# Python 3.12, torch 2.11.0 (a CUDA build, which runs on the CPU too), Triton 3.6.0,
# NumPy 2.5 (what /work/.library/device/KINDS.md lists for the H200 image). The C++
# extension is built against that torch with its CUDA kernels (nvcc is on these machines)
# and must load and register them; the CUDA kernels themselves cannot run without a GPU.
# Triton's interpreter cannot run there (Triton 3.6 with NumPy >= 2.4), so the kernel
# tests skip by name; `make test-triton-3.6` runs them under Triton 3.6 with NumPy < 2.4.
#
# Usage: bash .ci/gpu_stack.sh   (make test-gpu-stack; CI runs it after make test)
# The venv (~5 GB, mostly CUDA libraries torch loads) is kept in .venv-gpu-stack/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv-gpu-stack
STAMP=$VENV/.fastntk-stack-1

py312() {  # a Python 3.12: on PATH, or pyenv's
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c "" 2>/dev/null; then
    command -v python3.12
  elif command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 pyenv which python3.12 >/dev/null 2>&1; then
    PYENV_VERSION=3.12.1 pyenv which python3.12
  else
    echo "gpu_stack: no Python 3.12 found (python3.12 on PATH, or pyenv's 3.12.1)" >&2
    return 1
  fi
}

if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"
  "$(py312)" -m venv "$VENV"
  for try in 1 2 3; do  # a registry hiccup should not fail the run
    if "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy==2.5.*" pytest \
      pytest-benchmark hypothesis scipy setuptools wheel ninja tqdm matplotlib transformers; then
      touch "$STAMP"
      break
    fi
    echo "gpu_stack: pip install failed (try $try of 3)" >&2
    sleep 10
  done
  [ -f "$STAMP" ] || exit 1
fi
# a venv kept from an earlier run may lack these
"$VENV/bin/python" -c "import tqdm, matplotlib, transformers" 2>/dev/null \
  || "$VENV/bin/pip" install -q tqdm matplotlib transformers

# A copy of the package laid out as installed (kernels/ as fastntk/kernels), the extension
# built into it in place; tests run from outside the repository so that they import it.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
bash bench/package_copy.sh layout "$SITE"
# the build must make the extension (package_copy exits non-zero otherwise)
bash bench/package_copy.sh build "$SITE" "$VENV/bin/python" > "$SITE/build.log" 2>&1 \
  || { tail -n 40 "$SITE/build.log"; exit 1; }
grep -E "^fastntk:" "$SITE/build.log" || true
"$VENV/bin/python" -c "import sys; sys.path.insert(0, '$SITE'); import torch, triton, numpy, fastntk._C as c; \
print('gpu stack: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, \
'numpy', numpy.__version__, 'fastntk._C with_cuda', c.with_cuda)"
cd "$SITE"
# Triton's interpreter cannot run on this stack (see above): its tests skip here by name
# instead of failing as CI's main run has them do. The C++ extension was built above and
# must load: FASTNTK_REQUIRE_CSRC (set by .ci/run) stays.
unset FASTNTK_REQUIRE_TRITON
PYTHONPATH=$SITE "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests"

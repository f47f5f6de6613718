#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a clean virtual
# environment (no site packages, nothing from this tree), and run every command of the
# CLI once on synthetic data, from a folder outside the repository.
#
# Usage: bash .ci/wheel.sh   (CI runs it after the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --no-build-isolation: the C++ extension builds against the installed torch 2.13.0, the
# torch the wheel's environment gets below (its ABI).
$PY -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/fastntk-*.whl)
$PY - "$WHEEL" <<'PYEOF'  # the data, the Triton kernels and the C++ extension are inside
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
want = ["fastntk/data/nb201_accuracy.csv.gz", "fastntk/data/cifar10_1000.npz",
        "fastntk/data/nas_evidence.json", "fastntk/kernels/gram.py"]
missing = [w for w in want if w not in names]
missing += [] if any(n.startswith("fastntk/_C") for n in names) else ["fastntk/_C*.so"]
sys.exit(f"the wheel lacks {missing}" if missing else 0)
PYEOF

$PY -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
$VPY -m pip install --quiet "torch==2.13.0"  # the CPU build on the machines' disk
$VPY -m pip install --quiet "$WHEEL[plot]"    # what the wheel declares, and the plot extra
FASTNTK=$WORK/venv/bin/fastntk

cd "$WORK"  # outside the repository: only the installed package is importable
ARCH='|nor_conv_3x3~0|+|none~0|nor_conv_1x1~1|+|skip_connect~0|none~1|none~2|'
DATA=(--data synthetic --batch-size 8 --threads 2)
set -x
$VPY -c "import fastntk; e = fastntk.env(); print(fastntk.__file__, e); assert e['csrc'], e"
$FASTNTK score --arch "$ARCH" "${DATA[@]}"
$FASTNTK search --algo rea --budget 3 --population 2 --sample-size 2 --db "$WORK/j.db" "${DATA[@]}"
$FASTNTK search --algo prune --budget 2 "${DATA[@]}"
$FASTNTK evaluate --archs 3 --plot "$WORK/tau.png" --db "$WORK/j.db" "${DATA[@]}"
test -s "$WORK/tau.png"
$FASTNTK demo --n 8
$VPY -m fastntk --help > /dev/null
set +x
echo "wheel: $(basename "$WHEEL") installed in a clean venv; every CLI command ran"

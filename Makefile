# fastntk: the two commands of the README.
#   make demo   the NTK of a NAS-Bench-201 network on real CIFAR-10 images
#   make test   the whole test suite (CPU; Triton kernels in the interpreter)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .fastntk-installed

.PHONY: install demo test lint test-triton-3.6 test-gpu-stack bench bench-save bench-compare clean

# torch 2.13.0 (CPU) is installed first and on its own: it lies on the machines'
# disk, and the editable install below must build the C++ extension against it
# (--no-build-isolation), not against a second torch in an isolated build env.
$(STAMP): setup.py pyproject.toml requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m fastntk demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# The habits CI checks: ruff's lint and format, and the package's layers (import-linter
# contracts in pyproject.toml: dependencies run one way).
lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports

# The Triton kernels again, in Triton 3.6's interpreter (the lent GPU machines' Triton):
# Triton 3.6 and a NumPy it works with (its interpreter fails on NumPy >= 2.4) go to a
# folder of their own that shadows the installed ones for this run only.
TRITON36 := .triton-3.6
$(TRITON36)/.stamp:
	$(PIP) install --quiet --no-deps --target $(TRITON36) "triton==3.6.0" "numpy>=1.24,<2.4"
	touch $@

test-triton-3.6: $(STAMP) $(TRITON36)/.stamp
	FASTNTK_REQUIRE_TRITON=1 PYTHONPATH=$(TRITON36) $(PYTHON) -m pytest -q \
		-W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" \
		tests/test_kernels_gram.py tests/test_kernels_conv_psg.py tests/test_kernels_aot.py \
		tests/test_backends.py

# The suite on the GPU machines' stack (Python 3.12, torch 2.11 CUDA build, Triton 3.6,
# NumPy 2.5) on this CPU, the extension built with its CUDA kernels: .ci/gpu_stack.sh.
test-gpu-stack:
	bash .ci/gpu_stack.sh

bench: $(STAMP)
	$(PYTHON) bench/bench_engine.py

# The pytest-benchmark suites (bench/conftest.py): bench-save times them and saves the run
# in .benchmarks/; bench-compare times them again, prints each table next to the last saved
# run and fails when a benchmark's BENCH_FAIL statistic is slower by more than its share.
BENCH_FAIL ?= mean:10%
bench-save: $(STAMP)
	$(PYTHON) -m pytest bench/ --benchmark-only --benchmark-autosave

bench-compare: $(STAMP)
	$(PYTHON) -m pytest bench/ --benchmark-only --benchmark-compare \
		--benchmark-compare-fail=$(BENCH_FAIL)

clean:
	rm -rf build *.egg-info $(STAMP) fastntk/_C*.so $(TRITON36) .venv-gpu-stack

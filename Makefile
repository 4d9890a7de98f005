# hexatlas: `make demo` sets up and runs the main job; `make test` sets up and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU torch is pinned where there is no GPU (an unpinned torch pulls a multi-GB CUDA build);
# with an NVIDIA GPU, pip's default CUDA torch and faiss-gpu are installed instead.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH := $(if $(HAS_GPU),torch,torch==2.13.0)
EXTRAS_CPU := build,serve,ray,test
EXTRAS_GPU := build,gpu,serve,ray,test
EXTRAS := $(if $(HAS_GPU),$(EXTRAS_GPU),$(EXTRAS_CPU))
DEMO_ATLAS ?= demo-atlas

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# GeoCLIP's trained weights ship in its wheel; --no-deps skips its image-side stack.
	$(PY) -m pip install -q --no-deps geoclip==1.3.0
	touch $@

demo: $(STAMP)
	$(PY) -m builder.demo --output $(DEMO_ATLAS)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(DEMO_ATLAS) .pytest_cache

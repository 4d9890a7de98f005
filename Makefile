# hexatlas: `make demo` sets up and runs the main job; `make test` sets up and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU torch is pinned where there is no GPU (an unpinned torch pulls a multi-GB CUDA build);
# with an NVIDIA GPU, pip's default CUDA torch and faiss-gpu are installed instead.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH := $(if $(HAS_GPU),torch,torch==2.13.0)
EXTRAS_CPU := build,geo,publish,remote-sql,serve,ray,test,xarray
EXTRAS_GPU := build,geo,gpu,publish,remote-sql,serve,ray,test,xarray
EXTRAS := $(if $(HAS_GPU),$(EXTRAS_GPU),$(EXTRAS_CPU))
DEMO_ATLAS ?= demo-atlas
DEMO_MAP ?= demo-map.png
DEMO_REGIONAL ?= demo-atlas-paris
# The map page's front-end packages (deck.gl, h3-js, land outlines), installed from npm.
WEB := query/web
WEB_STAMP := $(WEB)/node_modules/.installed

.PHONY: setup demo test test-all bench clean browser nginx

setup: $(STAMP) $(WEB_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# GeoCLIP's trained weights ship in its wheel; --no-deps skips its image-side stack.
	$(PY) -m pip install -q --no-deps geoclip==1.3.0
	touch $@

$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --legacy-peer-deps --no-audit --no-fund --loglevel=error --prefix $(WEB) && touch $@; \
	else echo "npm not found: 'hexatlas serve' will answer the API but not show its map page (install Node.js, then make setup)"; fi

# The map-page test drives Debian's chromium; install it where this user may (root with apt-get).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; } || \
	  echo "no chromium: the map-page browser test will be skipped (Debian: apt-get install chromium)"

# The remote-read tests serve an atlas with Debian's nginx (Range, ETag, keep-alive as a real
# web server answers them); install it where this user may, as for chromium.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null; }; } || \
	  echo "no nginx: the HTTP(S) and Hub read tests will be skipped (Debian: apt-get install nginx-light)"

demo: setup
	$(PY) -m builder.demo --output $(DEMO_ATLAS) --map $(DEMO_MAP) --regional $(DEMO_REGIONAL)

test: setup browser nginx
	$(PY) -m pytest -q

test-all: setup browser nginx
	$(PY) -m pytest -q -m "" --hypothesis-profile=slow

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(DEMO_ATLAS) $(DEMO_REGIONAL) $(DEMO_MAP) $(WEB)/node_modules .pytest_cache

# Two entry points (see README): `make demo` and `make test`. Both create and use .venv here.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501
HOST ?= localhost

.PHONY: demo check-host test install install-dev bench report

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps re-run the install only when the requirement files change.
$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime-installed
install-dev: $(VENV)/.dev-installed

## make demo: install, precompute the embedded demo (cached after the first run), open the dashboard.
## HOST=0.0.0.0 (or ::) listens on every interface: the address to open is this machine's name.
## An empty HOST is refused here, before any install, as `serve --host ""` is: Streamlit takes it
## for every interface.
demo: check-host install
	$(PY) -m convergence_core precompute --preset demo
	@case "$(HOST)" in 0.0.0.0|::) echo "Dashboard: http://$$(hostname):$(PORT) (listening on \
	every interface, port $(PORT))";; *) echo "Dashboard: http://$(HOST):$(PORT)";; esac
	$(PY) -m convergence_core.dashboard.serve --server.port $(PORT) --server.address $(HOST) --server.headless true

check-host:
	@if [ -z "$(strip $(HOST))" ]; then echo "make demo: HOST is empty, which Streamlit takes for \
	every network interface; give HOST=localhost (this machine only, the default) or \
	HOST=0.0.0.0 (every interface: a live demo)" >&2; exit 2; fi

## make test: install runtime + test tools, run the whole suite in TEST_WORKERS processes (a
## test file stays in one process; TEST_WORKERS=0 runs everything in this process).
TEST_WORKERS ?= 2
test: install-dev
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install-dev
	$(PY) benchmarks/bench_numerics.py
	$(PY) benchmarks/bench_precompute.py
	$(PY) benchmarks/bench_dashboard.py
	$(PY) benchmarks/bench_analyses.py

report: install
	$(PY) -m convergence_core report --preset demo --out report/ --embed-captions

# One command each for a person and for CI: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on these machines; an unpinned torch pulls several GB of CUDA.
TORCH_PIN := torch==2.13.0

.PHONY: test check lint typecheck pytest demo bench fuzz dist clean prometheus modules

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[keras,torch,lightning,hf,plot,dev]" --config-settings editable_mode=strict
	touch $(STAMP)

# A strict editable install links each module: relink when the set of modules changes.
MODULES := $(sort $(wildcard controller/*.py controller/*/*.py client/*.py))
modules: $(STAMP)
	@echo "$(MODULES)" | cmp -s - $(VENV)/.modules || \
		($(PIP) install -q --no-deps -e . --config-settings editable_mode=strict && \
		echo "$(MODULES)" > $(VENV)/.modules)

# Debian's prometheus server (and promtool) for the dashboard/alert tests.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's prometheus package"; \
		DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends prometheus >/dev/null && \
		(systemctl stop prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true); \
	else echo "prometheus is missing: run 'sudo apt-get install -y prometheus' and re-run make test"; exit 1; fi

lint: modules
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

typecheck: modules
	$(VENV)/bin/mypy -p lrpilot.controller -p lrpilot.client

pytest: modules prometheus
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

check: test

demo: modules
	$(VENV)/bin/lrpilot demo

# Long property-based runs (the short profile runs inside make test).
fuzz: modules
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q tests/test_fuzz.py

# Each prints its figures beside a baseline measured in the same run and appends them to
# bench/RESULTS.md (about 15 minutes in all on 2 cores).
bench: modules
	$(PY) bench/run.py
	$(PY) bench/scale.py
	$(PY) bench/report_cost.py
	$(PY) bench/client_hot_path.py
	$(PY) bench/adapters.py

# A wheel and an sdist in dist/, installable anywhere (pip install dist/lrpilot-*.whl).
dist: $(STAMP)
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info

# One command each for a person and for CI: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on these machines; an unpinned torch pulls several GB of CUDA.
TORCH_PIN := torch==2.13.0

.PHONY: test check lint typecheck pytest demo bench clean prometheus

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[keras,torch,plot,dev]" --config-settings editable_mode=strict
	touch $(STAMP)

# Debian's prometheus server (and promtool) for the dashboard/alert tests.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's prometheus package"; \
		DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends prometheus >/dev/null && \
		(systemctl stop prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true); \
	else echo "prometheus is missing: run 'sudo apt-get install -y prometheus' and re-run make test"; exit 1; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy -p lrpilot.controller -p lrpilot.client

pytest: $(STAMP) prometheus
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

check: test

demo: $(STAMP)
	$(VENV)/bin/lrpilot simulate --policy policies/warmup-plateau.yaml --job demo --metrics policies/history-example.csv

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info

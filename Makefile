# One command each for a person and for CI: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on these machines; an unpinned torch pulls several GB of CUDA.
TORCH_PIN := torch==2.13.0

.PHONY: test check lint typecheck pytest demo bench fuzz dist clean prometheus chromium postgresql image-tools modules docs

# A venv that `make demo` made has no pip of its own (see below): the full install adds one.
VENV_WITH_PIP := (test -x $(PY) || $(PYTHON) -m venv $(VENV)) && \
	($(PIP) --version >/dev/null 2>&1 || $(PY) -m ensurepip --default-pip >/dev/null)

$(STAMP): pyproject.toml Makefile
	$(VENV_WITH_PIP)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[keras,keras-jax,torch,lightning,hf,plot,postgres,fast,dev]" --config-settings editable_mode=strict
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

# Debian's chromium: the web view's test loads the page in it, headless.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium package"; \
		DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends chromium >/dev/null; \
	else echo "chromium is missing: run 'sudo apt-get install -y chromium' and re-run make test"; exit 1; fi

# Debian's PostgreSQL server binaries for the scale-out tests, which initdb a cluster of their
# own (as an unprivileged user, on a free port) and remove it; the packaged service is stopped.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
postgresql:
	@if [ -n "$(PG_INITDB)" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's postgresql package"; \
		DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends postgresql >/dev/null && \
		(systemctl stop postgresql >/dev/null 2>&1 || service postgresql stop >/dev/null 2>&1 || true); \
	else echo "postgresql is missing: run 'sudo apt-get install -y postgresql' and re-run make test"; exit 1; fi

# Debian's buildah and debootstrap for tests/test_image.py, which builds the Dockerfile and runs
# the image without a Docker engine (as root; elsewhere that test is skipped and says why).
image-tools:
	@if command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's buildah and debootstrap"; \
		DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends \
			buildah debootstrap >/dev/null; \
	else echo "buildah or debootstrap is missing and this is not root: the image test will be skipped"; fi

lint: modules
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

typecheck: modules
	$(VENV)/bin/mypy -p lrpilot.controller -p lrpilot.client

pytest: modules prometheus chromium postgresql image-tools
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

check: test

# The demo needs the core and Keras on JAX (CPU) only: no TensorFlow, torch, Lightning,
# transformers or dev tools. On a fresh clone it makes a venv without pip (the base
# interpreter's pip installs into it, via --python, when it is 22.3 or newer) and installs the
# exact, complete pins of requirements/demo.txt with --no-deps: nothing to resolve (the pins
# need Python 3.11+; on 3.10 pip resolves the keras-jax extra instead). In a venv that
# `make test` filled it installs nothing (or brings it up to date as `make test` would).
DEMO_STAMP := $(VENV)/.demo-installed
ifneq ($(wildcard $(STAMP)),)
$(DEMO_STAMP): $(STAMP)
	@touch $@
else
$(DEMO_STAMP): pyproject.toml requirements/demo.txt
	@test -x $(PY) || $(PYTHON) -m venv --without-pip $(VENV)
	@echo "installing lrpilot's core and Keras on JAX (CPU) into $(VENV): requirements/demo.txt"
	@if $(PIP) --version >/dev/null 2>&1; then pip="$(PIP)"; \
	elif $(PYTHON) -m pip --python $(PY) --version >/dev/null 2>&1; then \
		pip="$(PYTHON) -m pip --python $(PY)"; \
	else $(PY) -m ensurepip --default-pip >/dev/null && pip="$(PIP)" || exit 1; fi; \
	if $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		$$pip install -q --no-deps --no-compile -r requirements/demo.txt && \
		$$pip install -q --no-deps --no-compile --no-build-isolation -e .; \
	else $$pip install -q --no-compile -e ".[keras-jax]"; fi
	@touch $@
endif

# `lrpilot demo` runs Keras on JAX where TensorFlow is not installed, else on Keras' default
# (TensorFlow, in a venv that `make test` filled); KERAS_BACKEND=jax make demo chooses.
demo: $(DEMO_STAMP)
	$(VENV)/bin/lrpilot demo

# Long property-based runs (the short profile runs inside make test).
fuzz: modules
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q tests/test_fuzz.py tests/test_protocol_codec.py

# Each prints its figures beside a baseline measured in the same run and appends them to
# bench/RESULTS.md (about 15 minutes in all on 2 cores).
bench: modules
	$(PY) bench/run.py
	$(PY) bench/scale.py
	$(PY) bench/report_cost.py
	$(PY) bench/scale_out.py
	$(PY) bench/client_hot_path.py
	$(PY) bench/plans.py
	$(PY) bench/adapters.py
	$(PY) bench/guard.py
	$(PY) bench/web_view.py
	$(PY) bench/fresh_demo.py

# docs/policy-reference.md is written from the policy classes' own parameter docs; a test fails
# when the committed file differs from what this prints.
docs: modules
	$(PY) -m lrpilot.controller.docgen > docs/policy-reference.md

# A wheel and an sdist in dist/, installable anywhere (pip install dist/lrpilot-*.whl). Needs
# only `build` (it builds in an isolated env with setuptools), none of the ML stacks.
dist:
	$(VENV_WITH_PIP)
	$(PY) -c "import build" 2>/dev/null || $(PIP) install -q "build>=1.0,<2"
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info

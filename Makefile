# The two commands a newcomer needs are `make run` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Where torch comes from: empty takes pip's own sources (a local CPU wheel, as on our CI
# machines); PyPI's Linux wheel is a CUDA build, so elsewhere pass torch's CPU index (the
# Dockerfile's): make install TORCH_PIP_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_FLAGS ?=

.PHONY: install test run seed lint format bench clean proto secrets

install: $(STAMP)

$(STAMP): setup.py client/pyproject.toml requirements/torch.txt requirements/service.txt requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -r requirements/torch.txt $(TORCH_PIP_FLAGS)
	$(PIP) install -q -r requirements/service.txt -r requirements/dev.txt
	$(PIP) install -q --no-build-isolation -e ./client
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

run: install
	$(PY) -m hessian_service.server --address 127.0.0.1:50051 --data-dir ./data

seed: install
	$(PY) -m hessian_service.seed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: install
	$(PY) protos/generate.py

bench: install
	$(PIP) install -q -r requirements/bench.txt
	$(PY) bench/run.py --output BENCHMARKS.md
	$(PY) bench/run.py --output BENCHMARKS.md --loaded

# The compose secret (docker-compose.yml): a random bearer token, never committed. The file
# is world-readable so the container's unprivileged user can read the bind mount; the
# secrets/ folder is closed to other local users instead.
secrets: secrets/auth_token secrets/postgres_password

secrets/auth_token secrets/postgres_password:
	mkdir -p secrets && chmod 700 secrets
	python3 -c "import secrets; print(secrets.token_urlsafe(32))" > $@.tmp
	chmod 644 $@.tmp && mv $@.tmp $@

clean:
	rm -rf $(VENV) build *.egg-info service/*.egg-info

# One entry point for people and CI. `make serve` and `make test` work on a fresh Debian machine
# with Python 3.11: they create .venv, install the project into it and go.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REGISTRY ?= $(or $(REFIT_REGISTRY_PATH),model_registry)
DEMO_DATA := data/demo/intents.jsonl
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: install model serve test test-prereqs lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Build the default model from the demo data, unless the registry already serves one.
model: install
	@if $(BIN)/python -c "import sys; from adapters.serving.registry import ModelRegistry; sys.exit(0 if ModelRegistry('$(REGISTRY)').pointer() else 1)"; then \
		echo "registry $(REGISTRY) already has a current model: $$($(BIN)/refit models --registry $(REGISTRY) | grep '^\*')"; \
	else \
		echo "building the default model from $(DEMO_DATA) into $(REGISTRY)"; \
		$(BIN)/refit train --data $(DEMO_DATA) --registry $(REGISTRY); \
	fi

serve: model
	REFIT_REGISTRY_PATH=$(REGISTRY) $(BIN)/bentoml serve . --host $(HOST) --port $(PORT)

# What the tests need besides the project's packages: checkov (in .venv-tools, its own venv),
# promtool/prometheus and PostgreSQL binaries.
test-prereqs:
	@bash deploy/test-prereqs.sh

# Lint first: it takes seconds and fails fast; then the whole suite.
test: install test-prereqs lint
	$(BIN)/python -m pytest

# Style and types (configured in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .venv-tools model_registry var .pytest_cache

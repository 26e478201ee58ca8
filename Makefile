# clipsearch: `make demo` runs the main job offline, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit lint secrets opensearch-start opensearch-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools<81" wheel
	$(BIN)/pip install --quiet -e ".[local,aws,dev]"
	touch $(STAMP)

demo: install
	$(BIN)/clipsearch demo

opensearch-start:
	scripts/opensearch-local start

opensearch-stop:
	scripts/opensearch-local stop

# The real OpenSearch node is part of the suite: if it cannot start, the tests fail.
test: install opensearch-start
	CLIPSEARCH_OPENSEARCH_URL=$$(scripts/opensearch-local url) $(BIN)/pytest -q

unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy clipsearch model_code functions
	$(BIN)/cfn-lint template.yaml
	$(MAKE) secrets

# Secret scan against the reviewed baseline, compared by file and hashed value (not line numbers).
secrets: install  # pragma: allowlist secret
	$(BIN)/pytest -q tests/unit/test_security.py -k secrets  # pragma: allowlist secret

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .aws-sam build *.egg-info

# The two commands a newcomer needs: `make run` (the hub) and `make test` (the whole suite).
# Both create .venv and install the project into it on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow sysdeps lint fmt conformance bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hub serve --insecure $(ARGS)

sysdeps:
	bash scripts/system-deps.sh

test: $(STAMP) sysdeps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

# The opt-in long tests only (full Autobahn run, ...): CI runs this after `make test`.
test-slow: $(STAMP) sysdeps
	$(BIN)/pytest --run-slow -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

conformance: $(STAMP)
	$(BIN)/python scripts/autobahn.py --full

bench: $(STAMP)
	$(BIN)/python bench/ws_core.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

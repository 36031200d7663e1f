# The two commands a new user needs: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo_out

.PHONY: setup demo test lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/clstm4d demo --out $(OUT)

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

bench: setup
	$(VENV)/bin/clstm4d bench

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache build src/*.egg-info

# The project's checks; `make test` is what CI runs (see .ci/run).
PYTHON ?= python3

.PHONY: test lint typecheck unit demo bench

test: lint typecheck unit

lint:
	$(PYTHON) -m ruff check src tests benchmarks

typecheck:
	$(PYTHON) -m mypy --strict src
	$(PYTHON) -m mypy --strict tests/core

# The whole suite under coverage; the pure core must stay at >= 95 % line coverage.
unit:
	$(PYTHON) -m coverage erase
	$(PYTHON) -m coverage run -m pytest -q -p no:cacheprovider
	$(PYTHON) -m coverage report --fail-under=95

demo:
	$(PYTHON) -m execproto demo

bench:
	$(PYTHON) benchmarks/bench_core.py

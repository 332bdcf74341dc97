# The project's checks; `make test` is what CI runs (see .ci/run).
PYTHON ?= python3

.PHONY: test lint typecheck unit docs demo bench

test: lint typecheck unit docs

lint:
	$(PYTHON) -m ruff check src tests benchmarks docs
	@! git grep -nE '^(<<<<<<<|>>>>>>>)( |$$)' -- . ':!*.json' || { echo "merge conflict markers"; exit 1; }

# docs/conf.py is Sphinx's configuration, made of callbacks that Sphinx and
# docutils (no type stubs without another package) call: ruff checks it,
# mypy does not.
# mypy cannot follow the package-dir mapping of an editable install, so the
# tests are checked against a tree of links laid out as installed.
# PYVER=3.13 checks as that Python (default: python_version in pyproject.toml).
MYPY = $(PYTHON) -m mypy --strict $(if $(PYVER),--python-version $(PYVER))
typecheck:
	$(MYPY) --cache-dir build/mypy-src$(PYVER) src
	$(MYPY) --cache-dir build/mypy-docs$(PYVER) docs/trio_inventory.py
	rm -rf build/typecheck && mkdir -p build/typecheck/execproto
	ln -s $(CURDIR)/src/execproto/* build/typecheck/execproto/
	ln -s $(CURDIR)/src/adapters build/typecheck/execproto/adapters
	MYPYPATH=build/typecheck $(MYPY) --cache-dir build/mypy-tests$(PYVER) tests benchmarks

# The whole suite under coverage; the pure core must stay at >= 95 % line coverage.
unit:
	$(PYTHON) -m coverage erase
	$(PYTHON) -m coverage run -m pytest -q -p no:cacheprovider
	$(PYTHON) -m coverage report
	@echo "The pure core alone (must stay >= 95 %):"
	$(PYTHON) -m coverage report --include='*/execproto/_*.py,*/execproto/__init__.py' --fail-under=95

# The API reference and the task pages (docs/): every warning and every
# unresolved reference fails.  Needs the docs extra and Debian's python3-doc
# (Python's objects.inv); reads nothing from the network.
# The Python inventory comes from Debian's python3-doc: without it the docs
# are skipped, as the Dovecot tests are without Dovecot, unless CI is set.
PYTHON_INVENTORY = /usr/share/doc/python3/html/objects.inv
docs:
	@if [ ! -e $(PYTHON_INVENTORY) ] && [ -z "$$CI" ]; then \
	    echo "docs: skipped (apt-get install python3-doc to build them; required when CI is set)"; \
	else \
	    rm -rf build/docs docs/_build && \
	    $(PYTHON) -m sphinx -b html -W --keep-going -n -q docs build/docs; \
	fi

demo:
	$(PYTHON) -m execproto demo

bench:
	$(PYTHON) benchmarks/bench_core.py

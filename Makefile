# Two entry points (see README): `make conformance` and `make test`.
# Both create .venv from the pinned lock file on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): requirements-lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

.PHONY: setup conformance test test-fast typecheck
setup: $(STAMP)

conformance: $(STAMP)
	$(PY) -m dualopt.conformance --report reports/conformance

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" tests

# mypy on the installed form of the package (the built wheel), as a user's checker sees it (py.typed).
typecheck: $(STAMP)
	rm -rf build  # setuptools reuses build/lib: a stale module there would enter the wheel
	$(PY) -m pip wheel --quiet --no-deps -w build/typecheck .
	cd build/typecheck && ../../$(PY) -m zipfile -e *.whl . && \
	  ../../$(PY) -m mypy --ignore-missing-imports --no-incremental \
	    -p decoupled_core -p dualopt.torch -p dualopt.optax -p dualopt.keras -p dualopt.native -p dualopt._shared

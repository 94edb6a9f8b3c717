# The one entry point. `make iterate ROUNDS=3` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/digits.yaml
ROUNDS ?= 3
RUN ?=
SET ?=

.PHONY: venv data iterate test lint bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m pipeline prepare-digits --out data/digits

iterate: $(STAMP)
	$(PY) -m pipeline iterate --config $(CONFIG) --rounds $(ROUNDS) $(if $(RUN),--run $(RUN)) $(foreach s,$(SET),--set $(s))

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages tests bench

clean:
	rm -rf runs data .pytest_cache

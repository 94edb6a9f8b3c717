# The one entry point. `make iterate ROUNDS=3` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/digits.yaml
ROUNDS ?= 3
RUN ?=
SET ?=

.PHONY: venv data iterate submit download report report-check test lint bench-table bench-table-check clean

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

# submit: the same run as a Ray Job on a cluster (ADDRESS defaults to RAY_ADDRESS); prints job, run and storage.
submit: $(STAMP)
	$(PY) -m pipeline submit $(if $(ADDRESS),--address $(ADDRESS)) --config $(CONFIG) --rounds $(ROUNDS) $(if $(RUN),--run $(RUN)) $(foreach s,$(SET),--set $(s))

# download: ROUND=N (default: the latest finished round) or ROUND=all, into TO (default checkpoints/<run>).
download: $(STAMP)
	$(if $(RUN),,$(error make download needs RUN=<run name>))
	$(PY) -m pipeline download $(RUN) $(if $(filter all,$(ROUND)),--all,$(if $(ROUND),--round $(ROUND))) --to $(or $(TO),checkpoints/$(RUN)) --storage $(or $(STORAGE),runs)

# RUN: a run name under runs/ or a run folder. report rebuilds <run>/report.html (and its TensorBoard events);
# report-check opens it in headless Chromium (Debian's chromium package), screenshots it to <run>/report.png and
# checks that every image loaded and every number equals the run's files.
report: $(STAMP)
	$(if $(RUN),,$(error make report needs RUN=<run name or folder>))
	$(PY) -m pipeline report $(RUN)

report-check: $(STAMP)
	$(if $(RUN),,$(error make report-check needs RUN=<run name or folder>))
	$(PY) -m pipeline.report.check $(RUN)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# lint: ruff's rules and its formatter (line length 120, pyproject.toml); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages tests bench
	$(VENV)/bin/ruff format --check pipeline stages tests bench

# The README's benchmark tables, rendered from bench/results/*.json (each bench saves its result there);
# bench-table-check fails when the README differs from what those files give.
bench-table: $(STAMP)
	$(PY) bench/table.py

bench-table-check: $(STAMP)
	$(PY) bench/table.py --check

clean:
	rm -rf runs data .pytest_cache

# Two entry points for a fresh machine (Python 3.11): `make demo` and `make test`. Each creates .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast install bench lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Sample SA-1B / JourneyDB / ImageNet shards built from real photos, then every stage on tiny random models, in
# demo-output/: ingest -> captions -> features -> training stage 1 -> stage 2 -> stage 3 (hq256, hq512, ms1024) ->
# export, run as the Prefect flow `pixart-pipeline` (flows/demo.py) on Prefect's ephemeral API (its database in
# demo-output/pixart/.prefect) unless PREFECT_API_URL is set, training on Ray Train on a local Ray. A second run skips
# every step.
demo: install
	$(PY) -m flows.demo

# The whole suite, services included (Prefect server + worker, Ray, S3 server on 127.0.0.1), 10 minutes per test at
# most (pytest-timeout), the 15 slowest listed. Exit 5 (no tests) fails. Fast inner loop: `make test-fast`.
test: install
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Everything but the tests marked slow (those that start a service, and the heaviest): under 2 minutes on 2 cores.
test-fast: install
	@$(PY) -m pytest -q -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install
	$(PY) benchmarks/bench_ingest.py

lint: install
	$(VENV)/bin/ruff check storage flows captioning pixart tests benchmarks

# Two entry points for a fresh machine (Python 3.11): `make demo` and `make test`. Each creates .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Sample SA-1B / JourneyDB / ImageNet shards built from real photos -> parquet manifests in demo-output/.
demo: install
	$(VENV)/bin/pixart demo --root demo-output

# The whole suite, services included (Prefect server + worker, S3 server on 127.0.0.1). Exit 5 (no tests) fails.
test: install
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install
	$(PY) benchmarks/bench_ingest.py

lint: install
	$(VENV)/bin/ruff check storage flows captioning pixart tests benchmarks

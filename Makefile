# Two commands do all the set-up: `make demo` and `make test` each create .venv if missing and install.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The embedded offline world (no network, no downloads): zero-shot CLIP against two trained
# methods on a domain held out of pretraining (sketch), 1 shot, then the report (< 3 min, 2 cores).
DEMO := --task classification --dataset synth_sketch --shots 1 --results-dir results/demo
demo: $(STAMP)
	$(VENV)/bin/peftbench run --method zeroshot $(DEMO)
	$(VENV)/bin/peftbench run --method ln_tune $(DEMO)
	$(VENV)/bin/peftbench run --method mail $(DEMO)
	$(VENV)/bin/peftbench report --results-dir results/demo --out reports/demo --format md
	cat reports/demo/report.md

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

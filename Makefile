# Two commands do all the set-up: `make demo` and `make test` each create .venv if missing and install.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint clean-results

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The embedded offline world: zero-shot vs a trained method on both tasks, then the report.
demo: $(STAMP)
	$(VENV)/bin/peftbench run --method zeroshot --task classification --results-dir results/demo
	$(VENV)/bin/peftbench show results/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

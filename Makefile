# Set-up and the two everyday commands. `make demo` runs the demo workflow, `make test` the tests;
# both create .venv and install the project into it first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast report venv clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "noisynn needs Python 3.11; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[workflow,test]"
	touch $(STAMP)

venv: $(STAMP)

# The main job: the demo workflow on the embedded digits dataset (cold: about 6 minutes on 2 cores).
demo: $(STAMP)
	$(BIN)/snakemake --cores all

# The HTML report of the last run (figures and tables with their captions).
report: $(STAMP)
	$(BIN)/snakemake --report results/report.html

# The whole suite, slow end-to-end and SLURM tests included (this is what CI runs).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The quick part only: unit tests, no end-to-end runs.
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)

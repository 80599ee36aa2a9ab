# Set-up and the two everyday commands. `make demo` runs the demo workflow, `make test` the tests;
# both create .venv and install the project into it first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-all claims test test-fast lint report venv clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "noisynn needs Python 3.11; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[workflow,test]"
	touch $(STAMP)

venv: $(STAMP)

# The main job: the demo workflow on the embedded digits dataset, then whether its numbers agree with
# the committed ones (each cell within the committed 95 % interval; floating point drifts between CPUs).
REFERENCE := .snakemake/reference-cells.csv
demo: $(STAMP)
	$(BIN)/snakemake --cores all
	@mkdir -p .snakemake && git show HEAD:results/digits/tables/cells.csv > $(REFERENCE)
	-$(BIN)/noisynn compare $(REFERENCE) results/digits

# The demo, then the other embedded-data configs whose results are committed beside it.
demo-all: demo
	$(BIN)/snakemake --cores all --configfile config/mnist.yaml
	$(BIN)/snakemake --cores all --configfile config/transfer.yaml
	$(BIN)/snakemake --cores all --configfile config/architectures.yaml

# The NoisyNN family's recipes on the embedded data, then results/CLAIMS.md (config/claims.yaml beside
# every results folder it names; the committed MNIST-5k and transfer runs come from demo-all).
claims: $(STAMP)
	$(BIN)/snakemake --cores all --configfile config/noisyvit-food-mnist.yaml
	$(BIN)/snakemake --cores all --configfile config/interlude-mnist.yaml
	$(BIN)/snakemake --cores all --configfile config/fftat-digits.yaml
	$(BIN)/noisynn claims

# The HTML report of the last run (figures and tables with their captions).
report: $(STAMP)
	$(BIN)/snakemake --report results/report.html

# pytest-xdist, one worker per core; tests/conftest.py keeps each test module on one worker and
# makes the shared trained models once for all workers.
PYTEST := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n auto --no-loadscope-reorder

# The whole suite, slow end-to-end and SLURM tests included (this is what CI runs), after the linters.
test: $(STAMP) lint
	$(PYTEST)

# ruff on the Python, snakefmt on the workflow (both installed by the set-up).
lint: $(STAMP)
	$(BIN)/ruff check noisynn tests benchmarks scripts
	$(BIN)/snakefmt --check Snakefile workflow

# The quick part only: unit tests, no end-to-end runs.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean-venv:
	rm -rf $(VENV)

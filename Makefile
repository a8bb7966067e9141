# Two commands on a fresh machine (Python 3.11): `make demo` and `make test`.
# Each creates .venv when missing and installs what pyproject.toml declares; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_FLAGS ?= --method r50_abmil,r50_mambamil,conch_abmil,conch_mambamil,r50_meanpool,r50_maxpool,pixel_mamba --dataset synthetic --folds 5 --preset demo --weights random --max-epochs 10
# survival (Kaplan-Meier plots, C-index) on the features the first run cached: the rows that train in seconds
DEMO_SURVIVAL_FLAGS ?= --method r50_abmil,conch_abmil,r50_meanpool,r50_maxpool --dataset synthetic --task survival --folds 5 --preset demo --weights random --max-epochs 10

.PHONY: demo test install leaderboard clean-demo

install: $(STAMP)

# Only the dependencies are installed: our folders run from the checkout (see pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet ".[test,slurm]"
	rm -rf build wsi_bench.egg-info
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run_benchmark.py $(DEMO_FLAGS)
	$(PY) run_benchmark.py $(DEMO_SURVIVAL_FLAGS)
	$(PY) run_benchmark.py --leaderboard --combine

test: $(STAMP)
	$(PY) -m pytest -q

leaderboard: $(STAMP)
	$(PY) run_benchmark.py --leaderboard

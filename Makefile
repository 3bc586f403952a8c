# Two entry points: `make demo` and `make test`. Both create .venv on first use and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint install clean mutate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: any other build pulls a multi-GB CUDA wheel.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdistill demo

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

# Mutation testing of chosen modules, e.g. make mutate MUTANTS='kdistill.losses.*'
# (names are module paths with globs; default: every module listed in [tool.mutmut]).
# mutmut forks a child per mutant from the process that ran the tests; pyarrow's jemalloc
# background thread (the datasets tests load pyarrow) deadlocks those children: it is turned off.
MUTANTS ?=
mutate: $(TEST_STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,mutate]'
	JE_ARROW_MALLOC_CONF=background_thread:false $(BIN)/mutmut run $(MUTANTS); status=$$?; \
		$(BIN)/python benchmarks/mutation_score.py; exit $$status

clean:
	rm -rf $(VENV) .kdistill-cache runs mutants

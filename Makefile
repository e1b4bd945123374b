# The two commands of the README: `make demo` (set up + tiny TST run on CPU) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: env test demo lint bench

env:
	@scripts/setup_env.sh $(VENV)

test: env
	@scripts/run_tests.sh $(VENV)

demo: env
	@scripts/demo.sh $(VENV)

lint: env
	$(PYTHON) -m ruff check .

bench: env
	$(PYTHON) benchmarks/multi_hot_ce.py

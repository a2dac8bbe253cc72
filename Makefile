# The README's two commands: `make demo` and `make test`. Each sets up what it needs first.
SHELL := /bin/bash
export OMP_WAIT_POLICY ?= ACTIVE

.PHONY: setup demo test test-slow bench clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/edgewise generate "Once upon a time, in a village by the sea," --max-tokens 64

test:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q

test-slow:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q -m slow

bench:
	@scripts/setup.sh --bench
	.venv/bin/python benchmarks/decode.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache

# The README's two commands: `make demo` and `make test`. Each sets up what it needs first.
SHELL := /bin/bash
export OMP_WAIT_POLICY ?= ACTIVE

.PHONY: setup demo test test-slow fuzz bench clean

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

# More fuzzing than `make test`'s sample: N damaged GGUFs, flash stores and plan stores, N/3 npz datasets, image folders and schemes, a new seed each time
# unless SEED is given; every case and its outcome in fuzz-report.json.
N ?= 3000
SEED ?= $(shell date +%s)
fuzz:
	@scripts/setup.sh --test
	.venv/bin/python -m tests.fuzz --gguf $(N) --flash $(N) --plan $(N) --npz $$(( $(N) / 3 )) --images $$(( $(N) / 3 )) --scheme $$(( $(N) / 3 )) --seed $(SEED) --json fuzz-report.json

bench:
	@scripts/setup.sh --bench
	.venv/bin/python benchmarks/decode.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache

# mtrank — one command to run, one to test. Everything goes through the project venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
ART    ?= artifacts
CONFIG ?= configs/kuairand_mmoe.toml
HOST   ?= 127.0.0.1
PORT   ?= 8000
STAMP  := $(VENV)/.installed

.PHONY: setup run train serve test test-fast lint bench bench-scale bench-ids loadtest soak clean report

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || \
		{ echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so no dependency can drag in a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

## Train on the shipped KuaiRand-Pure data if no model exists yet, then serve on the embedded store.
run: setup
	@if [ ! -f $(ART)/models/LATEST ]; then \
		echo "No model under $(ART)/models yet: training $(CONFIG)"; \
		$(BIN)/mtrank train --config $(CONFIG) --artifacts $(ART); \
	fi
	$(BIN)/mtrank serve --artifacts $(ART) --host $(HOST) --port $(PORT)

train: setup
	$(BIN)/mtrank train --config $(CONFIG) --artifacts $(ART)

serve: setup
	$(BIN)/mtrank serve --artifacts $(ART) --host $(HOST) --port $(PORT)

test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# the quick loop while editing: everything but the tests marked slow (make test runs them all)
test-fast: setup
	@$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check model service tests loadtest scripts
	$(BIN)/ruff format --check model service tests loadtest scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# BENCH_ARGS="--skip-redis" where no redis-server runs on 127.0.0.1:6379 (the Redis rows need one)
bench: setup
	$(BIN)/python scripts/bench.py --artifacts $(ART) $(BENCH_ARGS)

# training at scale: peak RSS at 5M and 50M log rows (KuaiRand-Pure replicated; ~25 GB of disk and
# about an hour), and the step cost at 27k vs 16M user-id rows
SCALE_ROWS ?= 5000000 50000000
bench-scale: setup
	$(BIN)/python scripts/bench_scale.py memory --rows $(SCALE_ROWS) --artifacts $(ART)

bench-ids: setup
	$(BIN)/python scripts/bench_scale.py step --reps 5
	$(BIN)/python scripts/bench_scale.py ids --reps 3

loadtest: setup
	$(BIN)/python scripts/loadtest.py --artifacts $(ART)

soak: setup
	$(BIN)/python scripts/soak.py --artifacts $(ART)

report: setup
	$(BIN)/mtrank report --artifacts $(ART)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

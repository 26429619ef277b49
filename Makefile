# dnf-pipeline: `make test` installs what it needs into .venv and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CLI    := $(BIN)/dnf-pipeline

# Inputs of the job targets; override on the command line.
DATA       ?= data
RUN        ?= runs/r1
MODEL      ?= weights/ddpm-bedroom-256
DEVICE     ?= auto
SHARD_SIZE ?= 1024
NAME       ?= default

.PHONY: install test test-long lint quickstart shard extract status train eval bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-long: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# The whole flow on a tiny random model and a few made-up images (no weights, no GPU needed).
quickstart: $(STAMP)
	$(BIN)/python scripts/quickstart.py

shard: $(STAMP)
	$(CLI) shard $(DATA) --run $(RUN) --shard-size $(SHARD_SIZE)

# Both stages in one; rerun to resume.
extract: shard
	$(CLI) extract --run $(RUN) --model $(MODEL) --device $(DEVICE)
	$(CLI) status --run $(RUN)

train: $(STAMP)
	$(CLI) train --run $(RUN) --name $(NAME) --device $(DEVICE)

eval: $(STAMP)
	$(CLI) eval --run $(RUN) --checkpoint $(RUN)/train/$(NAME)/best.pt --split test --device $(DEVICE)

status: $(STAMP)
	$(CLI) status --run $(RUN)

# Speed figures (a script, not a test); sizes are options of benchmarks/bench.py.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

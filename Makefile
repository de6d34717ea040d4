# `make test` and `make demo` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: setup test test-slow demo serve gpu-check clean

setup: $(STAMP)

# torch first and alone, so that nothing else can pull in a different (CUDA) build
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# pytest exits non-zero when no test ran, so an empty run is never green
test: $(STAMP)
	$(PY) -m pytest

# what does not fit the suite's 8 minutes: two learning checks (PPO's gold-score rise, HellaSwag label PPO), the
# serving benchmark against transformers serve, and every stage at the 124M size on the CPU; in one process, so that
# each run has every core (about 11 minutes on 2 cores)
test-slow: $(STAMP)
	$(PY) -m pytest -m slow -n 0

# the whole pipeline on the generated world at the small size, offline: runs/small/report.md and plots
demo: $(STAMP)
	PYTHON=$(PY) bash run.sh small

# the web page and API on http://127.0.0.1:8000/ with the demo's PPO and SFT models (after `make demo`)
serve: $(STAMP)
	$(PY) serve.py --ckpt-dir checkpoints/small

# the GPU figures (training tokens/s and MFU, fp16 memory, generation, HellaSwag, serving, a compiled run) on the
# first CUDA GPU, appended to BENCHMARKS.md; without a GPU it says so and exits 0
gpu-check: $(STAMP)
	$(PY) gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache

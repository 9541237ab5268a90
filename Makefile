# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

# Offline and telemetry-free for tests and the demo (not for users' own runs).
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export DO_NOT_TRACK = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DVC_NO_ANALYTICS = 1
export HF_HUB_DISABLE_PROGRESS_BARS = 1
export TRANSFORMERS_VERBOSITY = error

.PHONY: demo test install lint clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the whole pipeline on the built-in demo (DVC reruns only what changed), then the eval table
demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
	$(PY) -m flows.stage show

# mergeflow vs mergekit 0.1.5 vs the I/O floor at 106M parameters (7 methods, medians of 3 alternating
# runs), then linear and ties at 9, 36, 72 and 144 layers (0.1B-1B) and at hidden 1536 (one run each),
# a DRM sweep of five drop rates against one DRM merge, and what a staged DRM run stores on disk:
# about 21 minutes on 2 idle cores (20m36s measured) and 10 GB of free disk (the script checks and says so first); not part
# of `make test`. Ratios need an idle machine.
bench: $(STAMP)
	$(PY) benchmarks/bench_merge.py --repeat 3 --size-curve --wide --results benchmarks/results.md
	$(PY) benchmarks/bench_drm_sweep.py --repeat 3 --results benchmarks/results.md
	$(PY) benchmarks/bench_store.py --results benchmarks/results.md

lint: $(STAMP)
	$(VENV)/bin/ruff check merging flows tasks tests

clean:
	rm -rf demo .pytest_cache

# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo test test-all bench clean

install: $(STAMP)

# torch 2.13.0 first: it is the CPU wheel on disk; anything else would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsynth demo

# Two pytest workers, one per core of the 2-core CI machine (each test file stays on one worker, and the tests that
# share the real deployment stay together: tests/conftest.py); 440 s against 690 s in one process on 2 cores.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup tests

test: $(STAMP)
	$(PYTEST)

# the default suite plus the slow real-SuperNode runs (secure aggregation over TLS-authenticated SuperNodes)
test-all: $(STAMP)
	FEDSYNTH_FULL_TESTS=1 $(PYTEST)

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_dpgan.py

clean:
	rm -rf runs .pytest_cache

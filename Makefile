# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; a GPU machine can install its own torch first and skip this pin.
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test bench bench-ray bench-serve lint clean venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "$(TORCH)"
	# DeepSpeed builds from source and imports torch in its setup.py: build it against the torch above.
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation "$(DEEPSPEED)"
	$(PIP) install --quiet -e ".[local,k8s,ray,serve,notebook,dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/dsnb demo

test: venv
	$(PY) -m pytest -q --durations=30

bench: venv
	$(PY) benchmarks/bench_local.py

bench-ray: venv
	$(PY) benchmarks/bench_ray.py

bench-serve: venv
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_generate.py

lint: venv
	$(VENV)/bin/ruff check dsnb tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

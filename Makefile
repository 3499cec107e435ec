# Two entry points: `make demo` and `make test`. Each sets itself up in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH ?= wan
DEMO_DIR ?= demo_output

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, pinned: where pip finds the local CPU wheel (CI) it takes that; elsewhere PyPI's default build
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: setup demo test bench
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m musubi_tuner.demo --arch $(ARCH) --output_dir $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

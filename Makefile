# optaxclip developer commands. Every target creates .venv if it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
MULTIDEVICE_FLAGS = --xla_force_host_platform_device_count=8

.PHONY: test demo bench docs clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# The whole suite: single-device tests and doctests in one process, then the
# 8-simulated-device tests in their own process (XLA_FLAGS must be set before
# jax is imported), then the docs site with --strict.
test: $(VENV)/.installed-test $(VENV)/.installed-docs
	$(PY) -m pytest -q --doctest-modules optaxclip tests --ignore=tests/multidevice
	XLA_FLAGS=$(MULTIDEVICE_FLAGS) $(PY) -m pytest -q tests/multidevice
	$(PY) -m mkdocs build --strict --site-dir build/site

demo: $(VENV)/.installed-examples
	$(PY) examples/exploding_gradients.py

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_clipping.py
	$(PY) benchmarks/bench_sharded.py
	$(PY) benchmarks/bench_train_step.py

# The documentation site (mkdocs.yml, docs/), built with --strict into build/site.
docs: $(VENV)/.installed-docs
	$(PY) -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) build *.egg-info

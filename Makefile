# optaxclip developer commands. Every target creates its virtualenv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The floor-version suite: the oldest releases pyproject.toml allows, pinned.
FLOOR_VENV ?= .venv-floor
FLOOR_PY    = $(FLOOR_VENV)/bin/python
FLOOR_PINS  = .ci/floor-constraints.txt
MULTIDEVICE_FLAGS = --xla_force_host_platform_device_count=8
PYTEST = -m pytest -q -p no:cacheprovider
# The single-device suites run on both cores (pytest-xdist; worksteal
# rebalances the tail) and share one persistent XLA compilation cache: the
# same small programs are compiled by many tests (and by both workers); a
# cache hit skips XLA's compile (30% of the unit suite's time).
XDIST ?= -n 2 --dist worksteal
JAX_CACHE = JAX_COMPILATION_CACHE_DIR=$(CURDIR)/build/jax-cache \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# The unit suite compiles some 6,000 small programs, and compiling is most of
# its time. XLA:CPU's older fusion emitters compile these small programs about
# a third faster than the default MLIR emitters, and LLVM's optimisation of the
# generated code buys nothing for test-sized arrays; the multi-device suite
# compiles the same way. The floor and multi-process suites keep XLA's
# defaults, so the shipped configuration is tested too (every registry row
# runs in the multi-process suite, on the newest versions).
FAST_FLAGS = --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false
FAST_COMPILE = XLA_FLAGS="$(FAST_FLAGS)"
# The floor versions run what can break with an older jax, optax or flax: every
# public example (doctests), every registry row through the policy, checkpoint
# and export suites (jit and eager, low precision, inject_hyperparams, orbax,
# pickle, flax serialization, optax.tree.map_params, jax.export) and the
# framework integrations (NNX, linen, Equinox, MultiSteps). The numerics are the same
# code on every version and run in the unit suite.
FLOOR_TESTS = tests/test_policy.py tests/test_checkpoint.py \
  tests/test_export.py tests/test_flax.py tests/test_agc_flax.py \
  tests/test_real_models.py
PARALLEL = $(MAKE) --no-print-directory -k -j2 --output-sync=target

.PHONY: test lint unit multidevice multiprocess floor package docs demo bench study clean
.PHONY: venvs checks

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# make test's extras in one pip call: its parts run in parallel and must not
# install into one virtualenv at the same time.
$(VENV)/.installed-ci: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,lint,docs]"
	touch $(VENV)/.installed-test $(VENV)/.installed-lint $(VENV)/.installed-docs $@

$(FLOOR_VENV)/.installed: pyproject.toml $(FLOOR_PINS)
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install --quiet --upgrade pip
	$(FLOOR_PY) -m pip install --quiet -c $(FLOOR_PINS) -e ".[test]"
	touch $@

# The whole suite, each part timed (CI's log shows where the minutes go):
# static checks, single-device tests and doctests, 8 simulated devices and two
# real processes (each in its own process: XLA_FLAGS must be set before jax is
# imported), FLOOR_TESTS on the floor versions, the packaging check, and the
# docs site with --strict.
# On 2 cores the parts overlap in three phases: both virtualenvs install at
# once; the unit suite (both cores) runs beside the light checks; then the
# floor, multi-device and multi-process suites together. Each part's
# output is printed whole when it ends (--output-sync); -k runs every part
# even after a failure, and make test fails if any part failed.
test:
	@date +"[test] start %T"
	@$(PARALLEL) venvs
	@$(PARALLEL) unit checks; first=$$?; \
	  $(PARALLEL) -j3 floor multidevice multiprocess; second=$$?; \
	  date +"[test] end %T"; \
	  test $$first -eq 0 && test $$second -eq 0

venvs: $(VENV)/.installed-ci $(FLOOR_VENV)/.installed

checks: $(VENV)/.installed-ci
	@$(MAKE) --no-print-directory lint package docs

lint: $(VENV)/.installed-lint
	@date +"[lint] start %T"
	$(VENV)/bin/ruff check optaxclip
	$(VENV)/bin/ruff format --check optaxclip
	$(VENV)/bin/mypy
	@date +"[lint] end %T"

unit: $(VENV)/.installed-test
	@date +"[unit] start %T"
	$(JAX_CACHE) $(FAST_COMPILE) $(PY) $(PYTEST) $(XDIST) --doctest-modules optaxclip tests --ignore=tests/multidevice --ignore=tests/multiprocess
	@date +"[unit] end %T"

multidevice: $(VENV)/.installed-test
	@date +"[multidevice] start %T"
	$(JAX_CACHE) XLA_FLAGS="$(MULTIDEVICE_FLAGS) $(FAST_FLAGS)" $(PY) $(PYTEST) tests/multidevice
	@date +"[multidevice] end %T"

multiprocess: $(VENV)/.installed-test
	@date +"[multiprocess] start %T"
	$(PY) $(PYTEST) tests/multiprocess
	@date +"[multiprocess] end %T"

floor: $(FLOOR_VENV)/.installed
	@date +"[floor] start %T"
	$(FLOOR_PY) -c "import jax, optax, flax; print('floor versions: jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__)"
	$(JAX_CACHE) $(FLOOR_PY) $(PYTEST) $(XDIST) --doctest-modules optaxclip $(FLOOR_TESTS)
	@date +"[floor] end %T"

# Builds the sdist and wheel, checks their metadata, installs the wheel into a
# fresh virtualenv (outside the checkout, so the source tree cannot be
# imported by accident) and imports it there. The dependencies come from
# .venv through a .pth file (appended after the venv's own site-packages, so
# the wheel's copy is the one imported; .venv's editable hook is not loaded,
# since a path line does not process the .pth files of that path); pip
# installing them again took most of this target's time.
package: $(VENV)/.installed-lint
	@date +"[package] start %T"
	rm -rf build/dist build/wheel-venv
	mkdir -p build
	$(PY) -m build --no-isolation --outdir build/dist . > build/package.log 2>&1 || (cat build/package.log; exit 1)
	$(VENV)/bin/twine check --strict build/dist/*
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet --no-deps build/dist/*.whl
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(build/wheel-venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/deps-from-dot-venv.pth"
	cd build && wheel-venv/bin/python -c "import optaxclip as oc, jax.numpy as jnp; assert 'wheel-venv' in oc.__file__, oc.__file__; print('wheel imports:', oc.__file__, float(oc.global_norm([jnp.ones(4)])))"
	@date +"[package] end %T"

demo: $(VENV)/.installed-examples
	$(PY) examples/exploding_gradients.py

# The stability study (benchmarks/stability/): about 30 min on 2 cores.
study: $(VENV)/.installed-study
	$(PY) benchmarks/stability/study.py

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_clipping.py
	MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 $(PY) benchmarks/bench_clipping.py --rounds 40 --trees stacked --out benchmarks/results/clipping_stacked_mmap
	$(PY) benchmarks/bench_sharded.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_frontier.py

# The documentation site (mkdocs.yml, docs/), built with --strict into build/site.
docs: $(VENV)/.installed-docs
	@date +"[docs] start %T"
	$(PY) -m mkdocs build --strict --site-dir build/site
	@date +"[docs] end %T"

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info

"""Test configuration: strict JAX promotion rules and a fast hypothesis profile.

Strict dtype promotion and raising rank promotion (as in equinox's and
optimistix's test suites) make any hidden upcast or broadcast in the library
an error.
"""

import jax
import pytest
from hypothesis import HealthCheck, settings

# tests/data holds the scripts that recorded the reference trajectories (they
# need torch, which the test suite does not): data generators, not tests.
collect_ignore_glob = ["data/*.py"]

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# JAX compiles on the first call of each new shape, so examples are few and
# there is no deadline; shapes are drawn from a small set to reuse compiles.
# derandomize: CI must be reproducible (a failing example fails every run).
settings.register_profile(
    "optaxclip", max_examples=10, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture])
settings.load_profile("optaxclip")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def use_jit(request):
  """Runs a test with and without ``jax.jit`` (see ``helpers.maybe_jit``)."""
  return request.param


@pytest.fixture
def standard_promotion():
  """optax's own transforms (adam's bias correction, MultiSteps) promote
  int32 counters against floats, which strict mode rejects; tests that run
  them relax the promotion rule to JAX's default for their duration."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def pytest_collection_modifyitems(config, items):
  """Tests marked ``expensive`` run first: under pytest-xdist a long test
  that starts last keeps one worker busy while the other has finished."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("expensive") is None)

"""Test configuration: strict JAX promotion rules and a fast hypothesis profile.

Strict dtype promotion and raising rank promotion (as in equinox's and
optimistix's test suites) make any hidden upcast or broadcast in the library
an error.
"""

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# JAX compiles on the first call of each new shape, so examples are few and
# there is no deadline; shapes are drawn from a small set to reuse compiles.
settings.register_profile(
    "optaxclip", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow,
                           HealthCheck.function_scoped_fixture])
settings.load_profile("optaxclip")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def jit(request):
  """Runs a test with and without ``jax.jit``: ``f = maybe_jit(f)``."""
  return request.param


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn

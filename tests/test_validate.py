"""Bad input: every message names the function, the argument and the value."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optaxclip as oc
from optaxclip import _validate

FACTORIES = [
    (oc.clip_by_global_norm, "clip_by_global_norm", "max_norm"),
    (oc.clip_by_norm, "clip_by_norm", "max_norm"),
    (oc.clip_by_block_rms, "clip_by_block_rms", "threshold"),
    (oc.clip_by_value, "clip_by_value", "max_value"),
    (oc.clip, "clip", "max_delta"),
]


@pytest.mark.parametrize("factory,fn,arg", FACTORIES)
@pytest.mark.parametrize("bad,exc,fragment", [
    (-1.0, ValueError, "got -1.0"),
    (-3, ValueError, "got -3"),
    (float("nan"), ValueError, "got nan"),
    (np.float32(np.nan), ValueError, "got nan"),
    (jnp.array([1.0, 2.0]), ValueError, "shape (2,)"),
    (np.ones((1,)), ValueError, "shape (1,)"),
    ("1.0", TypeError, "'1.0'"),
    (True, TypeError, "True"),
    (None, TypeError, "None"),
    (1 + 2j, TypeError, "(1+2j)"),
])
def test_bad_thresholds(factory, fn, arg, bad, exc, fragment):
  with pytest.raises(exc) as info:
    factory(bad)
  message = str(info.value)
  assert message.startswith(f"{fn}: {arg} ")
  assert fragment in message


@pytest.mark.parametrize("factory,fn,arg", FACTORIES)
@pytest.mark.parametrize("good", [0, 0.0, 1, 2.5, math.inf, np.float32(3.0),
                                  jnp.float32(0.5)])
def test_good_thresholds(factory, fn, arg, good):
  del fn, arg
  factory(good)


def test_negative_threshold_message_is_explicit():
  with pytest.raises(ValueError, match=(
      r"^clip_by_global_norm: max_norm must be a non-negative scalar, "
      r"0 <= max_norm <= inf, got -1.0\. A negative threshold would flip")):
    oc.clip_by_global_norm(-1.0)


@pytest.mark.parametrize("factory", [oc.clip_by_global_norm, oc.clip_by_norm,
                                     oc.global_norm])
@pytest.mark.parametrize("bad", [0, 3, -1, 0.5, "l2", "fro", True, [2]])
def test_bad_ord(factory, bad):
  name = factory.__name__
  with pytest.raises(ValueError,
                     match=rf"^{name}: ord must be one of 1, 2, jnp.inf or"
                     r" 'inf' \(None means 2\), got "):
    if factory is oc.global_norm:
      factory({"a": jnp.ones(2)}, ord=bad)
    else:
      factory(1.0, ord=bad)


@pytest.mark.parametrize("good", [None, 1, 2, 1.0, 2.0, math.inf, jnp.inf,
                                  "inf", "INF", np.inf])
def test_good_ord(good):
  oc.clip_by_global_norm(1.0, ord=good)
  oc.clip_by_norm(1.0, ord=good)


def test_min_value_above_max_value():
  with pytest.raises(ValueError, match=(
      r"^clip_by_value: min_value must be <= max_value, got min_value=2.0 and"
      r" max_value=1.0\.$")):
    oc.clip_by_value(1.0, min_value=2.0)
  with pytest.raises(ValueError, match=r"^clip_by_value: min_value must be "
                     r"a real scalar that is not NaN, got nan"):
    oc.clip_by_value(1.0, min_value=float("nan"))


def test_negative_max_value_without_min_value():
  with pytest.raises(ValueError, match=r"^clip_by_value: max_value must be a"
                     r" non-negative scalar.*got -0.5"):
    oc.clip_by_value(-0.5)


def test_traced_ord_asks_for_static_args():
  tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0, ord=1)
  with pytest.raises(TypeError, match=r"static_args=\('ord',\)"):
    tx.init({"a": jnp.ones(2)})
  # ...and the advice works.
  tx = optax.inject_hyperparams(oc.clip_by_global_norm, static_args=("ord",))(
      max_norm=1.0, ord=1)
  params = {"a": jnp.array([3.0, -4.0])}
  out, _ = jax.jit(tx.update)(params, tx.init(params))
  np.testing.assert_allclose(np.asarray(out["a"]), [3 / 7, -4 / 7], rtol=1e-6)


def test_traced_invalid_threshold_gives_nan_not_a_sign_flip():
  g = {"a": jnp.array([3.0, 4.0])}
  tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0)
  state = tx.init(g)
  state.hyperparams["max_norm"] = jnp.asarray(-1.0)
  out, _ = jax.jit(tx.update)(g, state)
  assert np.isnan(np.asarray(out["a"])).all()


# --------------------------------------------------------------------------
# Low-precision, bool and complex scalars as thresholds.
# --------------------------------------------------------------------------


# --- Defect 1: low-precision scalar thresholds ------------------------------

_LOW_PRECISION_TWOS = [
  pytest.param(jnp.asarray(2.0, jnp.bfloat16), id="jax-bf16-array"),
  pytest.param(jnp.bfloat16(2.0), id="jnp.bfloat16-scalar"),
  pytest.param(ml_dtypes.bfloat16(2.0), id="ml_dtypes-bf16-scalar"),
  pytest.param(np.float16(2.0), id="numpy-fp16-scalar"),
  pytest.param(jnp.asarray(2.0, jnp.float16), id="jax-fp16-array"),
  pytest.param(jnp.float16(2.0), id="jnp.float16-scalar"),
  pytest.param(np.asarray(2.0, ml_dtypes.float8_e4m3fn), id="float8"),
  pytest.param(np.int8(2), id="numpy-int8"),
]


@pytest.mark.parametrize("value", _LOW_PRECISION_TWOS)
def test_low_precision_scalar_thresholds_are_accepted(value):
  _validate.check_threshold("f", "x", value)
  _validate.check_in_range(
    "f", "x", value, 0.0, 4.0, low_open=False, high_open=False
  )
  assert _validate.check_real("f", "x", value) == 2.0
  oc.skip_step(optax.sgd(1.0), max_norm=value, spike_sigmas=value)
  oc.adaptive_grad_clip(value, eps=value)
  oc.clip_per_example(value, noise_multiplier=value)


@pytest.mark.parametrize(
  "value, fragment",
  [
    (jnp.asarray(-1.0, jnp.bfloat16), "got Array(-1, dtype=bfloat16)"),
    (np.float16(-2.0), "-2.0"),  # numpy 2 prints np.float16(-2.0)
    (jnp.asarray(np.nan, jnp.bfloat16), "got nan"),
    (jnp.asarray([1.0, 2.0], jnp.bfloat16), "shape (2,)"),
  ],
)
def test_invalid_low_precision_thresholds_are_still_rejected(value, fragment):
  with pytest.raises(ValueError, match=r"^skip_step: max_norm ") as info:
    oc.skip_step(optax.sgd(1.0), max_norm=value)
  assert fragment in str(info.value)


@pytest.mark.parametrize(
  "value, dtype_name",
  [
    (jnp.asarray(True), "bool"),
    (np.complex64(1.0), "complex64"),
    (jnp.asarray(1.0 + 0j, jnp.complex64), "complex64"),
  ],
)
def test_bool_and_complex_scalars_are_not_real_numbers(value, dtype_name):
  with pytest.raises(
    TypeError,
    match=rf"^clip_per_example: max_norm must be a real number.*{dtype_name}",
  ):
    oc.clip_per_example(value)

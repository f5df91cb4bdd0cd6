"""Regression tests for an adversarial review of skip_step, AGC,
clip_per_example and the construction-time checks.

Each test names the defect it pins down; numeric expectations are computed
independently in float64 NumPy from the documented rule, never copied from
the implementation's output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import maybe_jit

import optaxclip as oc
from optaxclip import _validate

F32_TINY = float(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)


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


def test_bf16_threshold_clips_like_its_float64_value(use_jit):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(5, 3)) * np.linspace(0.1, 2.0, 5)[:, None]
  tx = oc.clip_per_example(jnp.asarray(0.75, jnp.bfloat16), reduce="sum")
  state = tx.init({"w": jnp.zeros(3)})
  out, _ = maybe_jit(tx.update, use_jit)(
    {"w": jnp.asarray(grads, jnp.float32)}, state
  )
  g64 = np.asarray(grads, np.float32).astype(np.float64)
  norms = np.sqrt(np.sum(g64**2, axis=1))
  want = np.sum(g64 * np.minimum(1.0, 0.75 / norms)[:, None], axis=0)
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), want, rtol=1e-6)


# --- Policy: bf16 gradient leaves are floating point -------------------------


def test_bf16_gradient_leaves_pass_the_integer_leaf_policy(use_jit):
  g = {"w": jnp.asarray([[3.0, 0.0], [4.0, 1.0]], jnp.bfloat16)}
  tx = oc.skip_step(optax.sgd(1.0), max_norm=10.0)
  out, state = maybe_jit(tx.update, use_jit)(g, tx.init(g), g)
  assert out["w"].dtype == jnp.bfloat16 and not bool(state.step_skipped)
  agc = oc.adaptive_grad_clip(0.1)
  out, _ = maybe_jit(agc.update, use_jit)(g, agc.init(g), g)
  assert out["w"].dtype == jnp.bfloat16
  per = oc.clip_per_example(1.0)
  out, _ = maybe_jit(per.update, use_jit)(g, per.init(None))
  assert out["w"].dtype == jnp.bfloat16


# --- Defect 2: skip_step with a max_norm schedule that turns NaN/negative ----


@pytest.mark.parametrize("bad", [math.nan, -1.0], ids=["nan", "negative"])
def test_traced_invalid_max_norm_skips_every_step(bad):
  schedule = lambda count: jnp.where(count >= 1, bad, 10.0).astype(jnp.float32)
  tx = optax.inject_hyperparams(oc.skip_step)(optax.sgd(1.0), max_norm=schedule)
  params = {"w": jnp.zeros(2)}
  step = jax.jit(tx.update)
  state = tx.init(params)
  grads = {"w": jnp.array([3.0, 4.0])}  # norm 5, far below the cap of 10
  updates, state = step(grads, state, params)
  np.testing.assert_array_equal(np.asarray(updates["w"]), [-3.0, -4.0])
  assert not bool(state.inner_state.step_skipped)
  for k in range(1, 4):  # the cap is now invalid: fail safe, skip
    updates, state = step(grads, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), [0.0, 0.0])
    assert bool(state.inner_state.step_skipped)
    assert int(state.inner_state.num_consecutive_skipped) == k
    threshold = float(state.inner_state.skip_threshold)
    assert math.isnan(threshold) if math.isnan(bad) else threshold == bad
  # The inner optimizer never moved on a skipped step (sgd has no state, so
  # check the hyperparameter count kept advancing while updates stayed 0).
  assert int(state.inner_state.num_skipped) == 3


def test_concrete_nan_max_norm_from_a_schedule_is_loud_in_eager_mode():
  # Without jit, inject_hyperparams rebuilds skip_step with a *concrete*
  # array, which construction-time validation rejects.
  schedule = lambda count: jnp.where(count >= 1, jnp.nan, 10.0)
  tx = optax.inject_hyperparams(oc.skip_step)(optax.sgd(1.0), max_norm=schedule)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  with pytest.raises(
    ValueError, match=r"^skip_step: max_norm must be a non-negative.*got nan"
  ):
    tx.update({"w": jnp.array([3.0, 4.0])}, state, params)


def test_traced_nan_spike_sigmas_skips_after_warmup():
  tx = optax.inject_hyperparams(
    oc.skip_step, static_args=("window", "warmup_steps")
  )(
    optax.sgd(1.0),
    spike_sigmas=lambda count: jnp.where(count >= 3, jnp.nan, 3.0),
    window=4,
    warmup_steps=2,
  )
  params = {"w": jnp.zeros(2)}
  step = jax.jit(tx.update)
  state = tx.init(params)
  skipped = []
  for norm in [1.0, 1.1, 1.05, 1.0, 1.0]:
    _, state = step({"w": jnp.array([norm, 0.0])}, state, params)
    skipped.append(bool(state.inner_state.step_skipped))
  # Steps 0-2 use sigma 3 (1.05 < mean 1.05 + 3 std), steps 3+ a NaN sigma.
  assert skipped == [False, False, False, True, True]


# --- Defect 3: skip_step(optax.MultiSteps(...)) ------------------------------


def test_multisteps_message_says_gradient_transformation():
  multi = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  with pytest.raises(
    TypeError,
    match=r"^skip_step: inner must be an optax\.GradientTransformation, got"
    r" an instance of MultiSteps, which is not one but builds one: pass"
    r" inner\.gradient_transformation\(\)",
  ):
    oc.skip_step(multi, max_norm=1.0)


def test_any_object_with_gradient_transformation_gets_the_hint():
  class Holder:
    def gradient_transformation(self):
      return optax.sgd(1.0)

  with pytest.raises(
    TypeError, match=r"instance of Holder.*inner\.gradient_transformation\(\)"
  ):
    oc.skip_step(Holder())


@pytest.mark.usefixtures("standard_promotion")
def test_multisteps_gradient_transformation_is_accepted(use_jit):
  multi = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  tx = oc.skip_step(multi.gradient_transformation(), max_norm=10.0)
  params = {"w": jnp.zeros(2)}
  step = maybe_jit(tx.update, use_jit)
  state = tx.init(params)
  first, state = step({"w": jnp.array([1.0, 2.0])}, state, params)
  second, state = step({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_array_equal(np.asarray(first["w"]), [0.0, 0.0])
  np.testing.assert_allclose(np.asarray(second["w"]), [-2.0, -3.0])


# --- Defect 4: AGC params that do not match the gradients --------------------


def test_agc_params_with_other_keys_name_both_structures(use_jit):
  tx = oc.adaptive_grad_clip(0.1)
  grads = {"a": jnp.ones((3, 4)), "b": jnp.ones(2)}
  params = {"a": jnp.ones((3, 4)), "c": jnp.ones(2)}
  with pytest.raises(
    ValueError,
    match=r"^adaptive_grad_clip: params must have the structure of the"
    r" gradients.*gradients are PyTreeDef\(\{'a': \*, 'b': \*\}\), params are"
    r" PyTreeDef\(\{'a': \*, 'c': \*\}\)",
  ):
    maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)


def test_agc_params_deeper_than_gradients_are_a_structure_error():
  tx = oc.adaptive_grad_clip(0.1)
  grads = {"a": jnp.ones((3, 4))}
  params = {"a": {"kernel": jnp.ones((3, 4))}}
  with pytest.raises(ValueError, match=r"params must have the structure"):
    tx.update(grads, None, params)


@pytest.mark.parametrize("param_shape", [(1, 4), (4,), (3, 4, 1)])
def test_agc_broadcastable_param_shapes_are_rejected(param_shape, use_jit):
  tx = oc.adaptive_grad_clip(0.1)
  grads = {"layer": {"kernel": jnp.ones((3, 4))}}
  params = {"layer": {"kernel": jnp.ones(param_shape)}}
  with pytest.raises(
    ValueError,
    match=r"^adaptive_grad_clip: the gradient at 'layer/kernel' has shape"
    rf" \(3, 4\) but its parameter has shape {re_shape(param_shape)}",
  ):
    maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)


def re_shape(shape):
  return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("axis", [0, -1, (0,)])
def test_agc_explicit_axis_on_a_scalar_leaf(axis, use_jit):
  tx = oc.adaptive_grad_clip(0.1, axis=axis)
  g = {"dense": jnp.ones((3, 2)), "temperature": jnp.ones(())}
  first = axis[0] if isinstance(axis, tuple) else axis
  with pytest.raises(
    ValueError,
    match=rf"^adaptive_grad_clip: axis {first} is out of range for the leaf at"
    r" 'temperature' of shape \(\) \(a scalar has no axes",
  ):
    maybe_jit(tx.update, use_jit)(g, tx.init(g), g)


def test_agc_scalar_leaf_with_a_callable_axis_follows_the_hint(use_jit):
  tx = oc.adaptive_grad_clip(
    0.1, axis=lambda path, leaf: None if leaf.ndim == 0 else 0
  )
  g = {"dense": jnp.asarray([[3.0, 1.0], [4.0, 0.0]]), "t": jnp.asarray(2.0)}
  p = {"dense": jnp.asarray([[1.0, 1.0], [0.0, 1.0]]), "t": jnp.asarray(5.0)}
  out, state = maybe_jit(tx.update, use_jit)(g, tx.init(p), p)
  # Units (columns): grad norms 5, 1 vs 0.1 * param norms 1, sqrt(2) ->
  # scales 0.1 / 5, 0.1 sqrt(2) / 1; the scalar: |2| vs 0.1 * 5 -> 0.25.
  g64 = np.array([[3.0, 1.0], [4.0, 0.0]])
  want = g64 * np.array([0.1 * 1.0 / 5.0, 0.1 * math.sqrt(2.0) / 1.0])
  np.testing.assert_allclose(
    np.asarray(out["dense"], np.float64), want, rtol=1e-6
  )
  np.testing.assert_allclose(float(out["t"]), 2.0 * 0.1 * 5.0 / 2.0, rtol=1e-6)
  assert int(state.num_clipped_units) == 3


# --- Defect 5: clip_per_example ---------------------------------------------


def test_forgotten_vmap_is_detected_with_params(use_jit):
  tx = oc.clip_per_example(1.0)
  params = {"w": jnp.zeros((64, 10))}
  mean_grad = {"w": jnp.ones((64, 10))}  # jax.grad of the batch loss
  with pytest.raises(
    ValueError,
    match=r"^clip_per_example: the per-example gradients at 'w' have shape"
    r" \(64, 10\), but their parameter has shape \(64, 10\): expected"
    r" \(batch,\) \+ \(64, 10\).*jax\.vmap",
  ):
    maybe_jit(tx.update, use_jit)(mean_grad, tx.init(params), params)


def test_per_example_leaf_shape_must_match_its_parameter():
  tx = oc.clip_per_example(1.0)
  params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
  grads = {"dense": {"kernel": jnp.zeros((8, 3, 4)), "bias": jnp.zeros((8, 3))}}
  with pytest.raises(
    ValueError, match=r"at 'dense/bias' have shape \(8, 3\).*shape \(4,\)"
  ):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(
    ValueError,
    match=r"^clip_per_example: params must have the structure of the"
    r" per-example gradients.*gradients are PyTreeDef",
  ):
    tx.update({"w": jnp.zeros((8, 4))}, tx.init(params), params)


def test_per_example_with_matching_params_matches_float64(use_jit):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 3, 2)) * np.linspace(0.2, 3.0, 6)[:, None, None]
  b = rng.normal(size=(6, 2))
  grads = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  tx = oc.clip_per_example(1.5)
  out, _ = maybe_jit(tx.update, use_jit)(grads, tx.init(params), params)
  w64 = np.asarray(grads["w"], np.float64)
  b64 = np.asarray(grads["b"], np.float64)
  norms = np.sqrt(np.sum(w64**2, axis=(1, 2)) + np.sum(b64**2, axis=1))
  scale = np.minimum(1.0, 1.5 / norms)
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float64),
    np.sum(w64 * scale[:, None, None], axis=0) / 6,
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(out["b"], np.float64),
    np.sum(b64 * scale[:, None], axis=0) / 6,
    rtol=1e-5,
  )


def _adaptive_reference(c0, norms_per_step, gamma, lr):
  """Float64 Andrew et al. update with the documented float32 bounds."""
  c, trajectory = c0, []
  for norms in norms_per_step:
    fraction = np.mean(np.asarray(norms) <= c)
    c = min(max(c * math.exp(-lr * (fraction - gamma)), F32_TINY), F32_MAX)
    trajectory.append(c)
  return trajectory


def test_adaptive_threshold_cannot_collapse_to_zero(use_jit):
  gamma, lr = 0.5, 20.0  # C shrinks by e^-10 per all-zero step
  tx = oc.clip_per_example(1.0, target_quantile=gamma, quantile_lr=lr)
  step = maybe_jit(tx.update, use_jit)
  state = tx.init({"w": jnp.zeros(3)})
  zeros = {"w": jnp.zeros((4, 3))}
  # Unit-norm examples: (0.6, 0.8, 0) has norm 1 exactly in float32.
  ones = {"w": jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (4, 1))}
  got = []
  for _ in range(12):  # e^-120 < float32 tiny: the exact update underflows
    _, state = step(zeros, state)
    got.append(float(state.per_example_max_norm))
  for _ in range(12):
    out, state = step(ones, state)
    got.append(float(state.per_example_max_norm))
  want = _adaptive_reference(
    1.0, [np.zeros(4)] * 12 + [np.ones(4)] * 12, gamma, lr
  )
  assert min(got) > 0.0
  assert got[11] == pytest.approx(F32_TINY, rel=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # Recovered: C > 1 >= every norm, so the last update is the plain mean.
  assert got[-2] > 1.0
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float64), [0.6, 0.8, 0.0], rtol=1e-6
  )


def test_infinite_initial_threshold_can_come_down(use_jit):
  gamma, lr = 0.5, 20.0
  tx = oc.clip_per_example(math.inf, target_quantile=gamma, quantile_lr=lr)
  step = maybe_jit(tx.update, use_jit)
  state = tx.init({"w": jnp.zeros(3)})
  ones = {"w": jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (4, 1))}
  got = []
  for _ in range(5):
    _, state = step(ones, state)
    got.append(float(state.per_example_max_norm))
  want = _adaptive_reference(math.inf, [np.ones(4)] * 5, gamma, lr)
  assert got[0] == F32_MAX
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_empty_batch_mean_is_a_clear_error(use_jit):
  tx = oc.clip_per_example(1.0)
  empty = {"w": jnp.zeros((0, 3))}
  with pytest.raises(
    ValueError,
    match=r"^clip_per_example: the batch is empty \(leading axis of size 0\),"
    r' and reduce="mean" would divide by 0',
  ):
    maybe_jit(tx.update, use_jit)(empty, tx.init(None))


def test_empty_batch_sum_is_zero(use_jit):
  tx = oc.clip_per_example(1.0, reduce="sum")
  out, state = maybe_jit(tx.update, use_jit)(
    {"w": jnp.zeros((0, 3))}, tx.init({"w": jnp.zeros(3)})
  )
  np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(3))
  assert out["w"].shape == (3,)
  assert int(state.num_clipped_examples) == 0
  assert int(state.num_nonfinite_examples) == 0
  assert float(state.per_example_norm_mean) == 0.0


# --- Policy 6a: integer/bool leaves -------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_leaves_are_type_errors_naming_the_path(dtype, use_jit):
  g = {"layer": {"kernel": jnp.ones((2, 3)), "count": jnp.ones((2, 3), dtype)}}
  name = np.dtype(dtype).name
  for fn, tx, state in [
    ("skip_step", oc.skip_step(optax.sgd(1.0)), None),
    ("adaptive_grad_clip", oc.adaptive_grad_clip(0.1), None),
    ("clip_per_example", oc.clip_per_example(1.0, reduce="sum"), None),
  ]:
    state = tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), g))
    with pytest.raises(
      TypeError,
      match=rf"^{fn}: every leaf of updates must be a floating-point \(or"
      rf" complex\) array, but the leaf at 'layer/count' has dtype {name}\.",
    ):
      maybe_jit(tx.update, use_jit)(g, state, g)


def test_agc_integer_params_are_type_errors_naming_the_path():
  g = {"w": jnp.ones((2, 3))}
  p = {"w": jnp.ones((2, 3), jnp.int32)}
  tx = oc.adaptive_grad_clip(0.1)
  with pytest.raises(
    TypeError,
    match=r"^adaptive_grad_clip: every leaf of params must be a"
    r" floating-point.*'w' has dtype int32",
  ):
    tx.update(g, None, p)


def test_per_example_sum_of_integer_leaves_no_longer_truncates():
  # Defect 5d: reduce="sum" used to cast the clipped float sum back to int.
  tx = oc.clip_per_example(1.0, reduce="sum")
  with pytest.raises(TypeError, match=r"'w' has dtype int32"):
    tx.update({"w": jnp.asarray([[3, 4], [0, 1]], jnp.int32)}, tx.init(None))


# --- Policy 6b: update(updates, None) -----------------------------------------


def test_agc_accepts_state_none(use_jit):
  rng = np.random.default_rng(4)
  g = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  p = {"w": jnp.asarray(rng.normal(size=(3, 2)) * 0.1, jnp.float32)}
  tx = oc.adaptive_grad_clip(0.5)
  update = maybe_jit(tx.update, use_jit)
  got_out, got_state = update(g, None, p)
  want_out, want_state = update(g, tx.init(p), p)
  np.testing.assert_array_equal(
    np.asarray(got_out["w"]), np.asarray(want_out["w"])
  )
  assert type(got_state) is oc.AdaptiveGradClipState
  assert int(got_state.num_clipped_units) == int(want_state.num_clipped_units)
  # Independent count: units are columns; clipped when ||g|| > 0.5 max(||p||,
  # 1e-3).
  g64, p64 = np.asarray(g["w"], np.float64), np.asarray(p["w"], np.float64)
  gn = np.linalg.norm(g64, axis=0)
  pn = np.maximum(np.linalg.norm(p64, axis=0), 1e-3)
  assert int(got_state.num_clipped_units) == int(np.sum(gn > 0.5 * pn))
  assert float(got_state.clipped_unit_fraction) == np.sum(gn > 0.5 * pn) / 2


@pytest.mark.parametrize(
  "fn, tx, grads",
  [
    (
      "skip_step",
      oc.skip_step(optax.sgd(1.0), max_norm=1.0),
      {"w": jnp.ones(2)},
    ),
    ("clip_per_example", oc.clip_per_example(1.0), {"w": jnp.ones((3, 2))}),
    (
      "clip_per_example",
      oc.clip_per_example(1.0, noise_multiplier=1.0, target_quantile=0.5),
      {"w": jnp.ones((3, 2))},
    ),
  ],
)
def test_transforms_with_history_reject_state_none(fn, tx, grads):
  with pytest.raises(
    ValueError,
    match=rf"^{fn}: update\(\) got state=None, but this transform keeps"
    r" history between steps\. Create the state first: state ="
    r" tx\.init\(params\)",
  ):
    tx.update(grads, None)


@pytest.mark.parametrize(
  "hparams",
  [
    dict(target_quantile=lambda count: jnp.where(count >= 1, 1.5, 0.5)),
    dict(
      target_quantile=0.5,
      quantile_lr=lambda count: jnp.where(count >= 1, -0.2, 0.2),
    ),
  ],
  ids=["quantile-1.5", "negative-lr"],
)
def test_traced_invalid_quantile_rule_is_loud(hparams):
  tx = optax.inject_hyperparams(oc.clip_per_example)(max_norm=2.0, **hparams)
  step = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(3)})
  ones = {"w": jnp.tile(jnp.asarray([[0.6, 0.8, 0.0]]), (4, 1))}
  out, state = step(ones, state)  # valid rule: all 4 within C = 2
  np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8, 0.0], rtol=1e-6)
  assert float(state.inner_state.per_example_max_norm) == pytest.approx(
    2.0 * math.exp(-0.2 * (1.0 - 0.5)), rel=1e-6
  )
  _, state = step(ones, state)  # invalid rule: C becomes NaN ...
  assert math.isnan(float(state.inner_state.per_example_max_norm))
  out, _ = step(ones, state)  # ... and every later update is NaN
  assert np.all(np.isnan(np.asarray(out["w"])))

"""Tests of skip_step against the float64 reference in reference.py."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import reference
import reference as ref_skip
from helpers import maybe_jit

NUM_STEPS = 320
# A fixed unit-norm direction: every gradient tree is this tree times a norm.
_RNG = np.random.default_rng(0)
_DIRECTION = {"w": _RNG.normal(size=(4, 3)), "b": _RNG.normal(size=(3,))}
_UNIT = {k: v / reference.norm(list(_DIRECTION.values()))
         for k, v in _DIRECTION.items()}


def _norm_sequence() -> np.ndarray:
  """320 nominal norms: noisy drift, spikes, a level shift, zeros, NaN, inf."""
  rng = np.random.default_rng(1)
  t = np.arange(NUM_STEPS)
  norms = (1.0 + t / NUM_STEPS) * np.exp(0.1 * rng.normal(size=NUM_STEPS))
  for step, factor in [(30, 8.0), (31, 12.0), (75, 5.0), (140, 20.0),
                       (141, 3.0), (200, 30.0), (290, 6.0)]:
    norms[step] *= factor
  norms[100:112] *= 4.0  # a temporary level shift, longer than a short window
  norms[[20, 55, 160, 161]] = 0.0
  norms[[40, 120, 230]] = np.nan
  norms[[41, 170, 250]] = np.inf
  return norms


def _grads_for(norm: float) -> dict[str, np.ndarray]:
  """A float32 gradient tree whose global norm is ``norm`` (NaN/inf too)."""
  if not math.isfinite(norm):
    grads = {k: np.float32(1.0) * v.astype(np.float32) for k, v in _UNIT.items()}
    grads["w"][1, 2] = norm
    return grads
  return {k: (v * norm).astype(np.float32) for k, v in _UNIT.items()}


def _stacked_grads(norms):
  trees = [_grads_for(n) for n in norms]
  return {k: np.stack([t[k] for t in trees]) for k in trees[0]}


def _true_norms(stacked) -> np.ndarray:
  """The float64 norms of the float32 trees actually fed to the transform."""
  return np.array([
      reference.norm([stacked["w"][i], stacked["b"][i]])
      for i in range(stacked["w"].shape[0])
  ])


def _run_scan(tx, stacked, params):
  """Runs ``tx`` over the stacked gradients; returns per-step outputs."""

  def step(state, grads):
    updates, state = tx.update(grads, state, params)
    return state, (updates, state._replace(inner_state=None))

  final, (updates, states) = jax.jit(
      lambda s, g: jax.lax.scan(step, s, g))(tx.init(params), stacked)
  return final, updates, states


CONFIGS = {
    "max_norm": dict(max_norm=3.0, window=16),
    "spike": dict(spike_sigmas=3.0, window=16, warmup_steps=8),
    "both": dict(max_norm=5.0, spike_sigmas=2.5, window=16, warmup_steps=4),
    "keep_nonfinite": dict(max_norm=5.0, spike_sigmas=2.5, window=16,
                           warmup_steps=4, skip_nonfinite=False),
    "maxtext_defaults": dict(spike_sigmas=6.0),  # window 128, warmup 128
    "nonfinite_only": dict(window=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequence_matches_reference(name):
  config = CONFIGS[name]
  lr = 0.5
  tx = oc.skip_step(optax.sgd(lr), **config)
  params = {k: np.zeros_like(v[0]) for k, v in
            _stacked_grads([1.0]).items()}
  stacked = _stacked_grads(_norm_sequence())
  norms = _true_norms(stacked)

  window = config.get("window", 128)
  ref_config = dict(config, window=window)
  decisions = ref_skip.skip_step_reference(norms, **ref_config)
  ref_skipped = np.array([s for s, _ in decisions])
  ref_threshold = np.array([c for _, c in decisions])
  # float32 vs float64: no decision may hinge on the last few digits.
  finite = np.isfinite(norms) & np.isfinite(ref_threshold)
  margin = np.abs(norms[finite] - ref_threshold[finite])
  assert np.all(margin > 1e-4 * ref_threshold[finite]), "test data too close"
  assert 5 <= ref_skipped.sum() <= NUM_STEPS - 50  # the sequence is not trivial

  final, updates, states = _run_scan(tx, stacked, params)

  np.testing.assert_array_equal(np.asarray(states.step_skipped), ref_skipped)
  np.testing.assert_allclose(np.asarray(states.skip_threshold), ref_threshold,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(states.skip_norm), norms, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(states.num_skipped),
                                np.cumsum(ref_skipped))
  consecutive, run = [], 0
  for skipped in ref_skipped:
    run = run + 1 if skipped else 0
    consecutive.append(run)
  np.testing.assert_array_equal(np.asarray(states.num_consecutive_skipped),
                                consecutive)

  # The accepted-norm history: count, ring-buffer contents and statistics.
  accepted = ref_skip.accepted_norms(norms, decisions)
  assert int(final.num_accepted) == len(accepted)
  buffer = np.asarray(final.accepted_norms)
  assert buffer.shape == (window,)
  expected = np.zeros(window)
  for i, n in enumerate(accepted):
    expected[i % window] = n
  np.testing.assert_allclose(buffer, expected, rtol=1e-6)
  recent = np.array(accepted[-window:])
  valid = buffer[: min(len(accepted), window)].astype(np.float64)
  np.testing.assert_allclose(valid.mean(), recent.mean(), rtol=1e-5)
  np.testing.assert_allclose(valid.std(), recent.std(), rtol=1e-4)

  # Updates: exact zeros on skipped steps, plain SGD on accepted ones.
  for k in stacked:
    u = np.asarray(updates[k])
    assert np.all(u[ref_skipped] == 0.0)
    np.testing.assert_allclose(u[~ref_skipped], -lr * stacked[k][~ref_skipped],
                               rtol=1e-6)


def test_keep_nonfinite_lets_nan_and_inf_through():
  tx = oc.skip_step(optax.sgd(1.0), max_norm=5.0)
  tx_keep = oc.skip_step(optax.sgd(1.0), max_norm=5.0, skip_nonfinite=False)
  params = {"w": jnp.zeros(2)}
  for bad in (jnp.nan, jnp.inf):
    grads = {"w": jnp.array([bad, 1.0])}
    updates, state = tx_keep.update(grads, tx_keep.init(params), params)
    assert not bool(state.step_skipped)
    assert not np.all(np.isfinite(np.asarray(updates["w"])))
    assert int(state.num_accepted) == 0  # not recorded in the history
    updates, state = tx.update(grads, tx.init(params), params)
    assert bool(state.step_skipped)


@pytest.mark.usefixtures("standard_promotion")
def test_adam_state_frozen_on_skip_and_equal_to_inner_on_accept(use_jit):
  inner = optax.adam(1e-2)
  tx = oc.skip_step(inner, max_norm=4.0, spike_sigmas=3.0, window=8,
                    warmup_steps=3)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  step = jax.jit(tx.update) if use_jit else tx.update
  inner_step = jax.jit(inner.update) if use_jit else inner.update
  state, inner_state = tx.init(params), inner.init(params)
  nominal = [1.0, 1.1, 0.9, 1.0, 1.05, 50.0, np.nan, np.inf, 0.0, 1.0, 3.5,
             0.95, 1.02, 1.0, 2.0, 0.98]
  skipped_steps = 0
  for n in nominal:
    grads = jax.tree.map(jnp.asarray, _grads_for(n))
    updates, new_state = step(grads, state, params)
    if bool(new_state.step_skipped):
      skipped_steps += 1
      jax.tree.map(np.testing.assert_array_equal,
                   jax.tree.map(np.asarray, new_state.inner_state),
                   jax.tree.map(np.asarray, state.inner_state))
      for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0.0)
    else:
      direct_updates, inner_state = inner_step(grads, inner_state, params)
      check = (np.testing.assert_array_equal if not use_jit else
               lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6))
      jax.tree.map(check, updates, direct_updates)
      jax.tree.map(check, new_state.inner_state, inner_state)
    state = new_state
  decisions = ref_skip.skip_step_reference(
      nominal, max_norm=4.0, spike_sigmas=3.0, window=8, warmup_steps=3)
  # 50, nan, inf, and the spikes 3.5 and 2.0 (after the 0.0 widened the std).
  assert skipped_steps == sum(s for s, _ in decisions) == 5
  assert int(state.num_skipped) == skipped_steps


def test_skipped_updates_are_exact_zeros_for_nonfinite_grads(use_jit):
  tx = oc.skip_step(optax.sgd(1.0))
  params = {"f32": jnp.zeros(3), "bf16": jnp.zeros(2, jnp.bfloat16)}
  step = jax.jit(tx.update) if use_jit else tx.update
  state = tx.init(params)
  for bad in (np.nan, np.inf, -np.inf):
    grads = {"f32": jnp.array([1.0, bad, 2.0]),
             "bf16": jnp.array([bad, bad], jnp.bfloat16)}
    updates, state = step(grads, state, params)
    assert bool(state.step_skipped)
    for k in params:
      assert updates[k].dtype == params[k].dtype
      np.testing.assert_array_equal(np.asarray(updates[k], np.float32), 0.0)
      assert not np.signbit(np.asarray(updates[k], np.float32)).any()
  assert int(state.num_skipped) == 3
  assert int(state.num_consecutive_skipped) == 3
  # An overflowing float32 norm of finite elements also counts as non-finite.
  updates, state = step({"f32": jnp.full(3, 3e38),
                         "bf16": jnp.zeros(2, jnp.bfloat16)}, state, params)
  assert bool(state.step_skipped)


def test_no_retrace_over_ten_steps():
  tx = oc.skip_step(optax.sgd(0.1), max_norm=2.0, spike_sigmas=3.0, window=4,
                    warmup_steps=2)
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state, params)

  state = tx.init(params)
  for n in [1.0, 1.1, np.nan, 0.9, 10.0, 0.0, np.inf, 1.0, 1.2, 1.05]:
    _, state = step(jax.tree.map(jnp.asarray, _grads_for(n)), state)
  assert int(state.num_skipped) == 3


@pytest.mark.usefixtures("standard_promotion")
def test_numpy_round_trip_gives_identical_next_step():
  tx = oc.skip_step(optax.adam(1e-2), spike_sigmas=2.0, window=4,
                    warmup_steps=2)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  step = jax.jit(tx.update)
  state = tx.init(params)
  for n in [1.0, 1.3, 0.8, np.nan, 1.1, 9.0]:
    _, state = step(jax.tree.map(jnp.asarray, _grads_for(n)), state, params)
  leaves, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  grads = jax.tree.map(jnp.asarray, _grads_for(1.05))
  out = step(grads, state, params)
  out_restored = step(grads, restored, params)
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, out),
               jax.tree.map(np.asarray, out_restored))


def test_clip_stats_shows_fields():
  tx = optax.chain(oc.skip_step(optax.sgd(0.1), max_norm=1.0))
  params = {"w": jnp.zeros(2)}
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
  stats = oc.clip_stats(state)
  for field in ("skip_norm", "step_skipped", "num_skipped",
                "num_consecutive_skipped", "num_accepted", "skip_threshold"):
    assert f"skip_step/{field}" in stats
  # The ring buffer is a history, not a number to log: only on request.
  assert "skip_step/accepted_norms" not in stats
  assert "skip_step/accepted_norms" in oc.clip_stats(state,
                                                     include_history=True)
  assert float(stats["skip_step/skip_norm"]) == 5.0
  assert bool(stats["skip_step/step_skipped"])
  assert int(stats["skip_step/num_skipped"]) == 1
  assert float(stats["skip_step/skip_threshold"]) == 1.0
  assert float(optax.tree.get(state, "skip_norm")) == 5.0


def test_extra_args_reach_inner():
  seen = {}

  def update(updates, state, params=None, *, multiplier=1.0):
    del params
    seen["multiplier"] = multiplier
    return jax.tree.map(lambda u: u * multiplier, updates), state

  inner = optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update)
  tx = oc.skip_step(inner)
  grads = {"w": jnp.array([1.0, 2.0])}
  updates, _ = tx.update(grads, tx.init(grads), None, multiplier=3.0)
  assert seen["multiplier"] == 3.0
  np.testing.assert_array_equal(updates["w"], [3.0, 6.0])
  # A plain GradientTransformation inner ignores extra args.
  tx = oc.skip_step(optax.GradientTransformation(
      lambda params: optax.EmptyState(), lambda u, s, p=None: (u, s)))
  tx.update(grads, tx.init(grads), None, multiplier=3.0)


def test_inject_hyperparams_max_norm_schedule():
  tx = optax.inject_hyperparams(oc.skip_step)(
      optax.sgd(1.0), max_norm=lambda count: 2.0 + count.astype(jnp.float32))
  params = {"w": jnp.zeros(2)}
  step = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = tx.init(params)
  skipped = []
  for _ in range(3):  # thresholds 2, 3, 4 against norm 2.5
    _, state = step({"w": jnp.array([1.5, 2.0])}, state, params)
    skipped.append(bool(state.inner_state.step_skipped))
  assert skipped == [True, False, False]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_norm=-1.0), ValueError, r"skip_step: max_norm .*got -1\.0"),
    (dict(max_norm=float("nan")), ValueError, r"skip_step: max_norm.*nan"),
    (dict(spike_sigmas=0.0), ValueError,
     r"skip_step: spike_sigmas must be a positive scalar \(0 < spike_sigmas"
     r" <= inf\).*got 0\.0"),
    (dict(spike_sigmas=-2), ValueError, r"skip_step: spike_sigmas.*got -2"),
    (dict(spike_sigmas=float("nan")), ValueError,
     r"skip_step: spike_sigmas.*nan"),
    (dict(window=0), ValueError, r"skip_step: window must be an int >= 1, got 0"),
    (dict(window=2.5), TypeError, r"skip_step: window must be an int >= 1"),
    (dict(window=True), TypeError, r"skip_step: window must be an int >= 1"),
    (dict(window=jnp.array(4)), TypeError, r"static_args=\('window',\)"),
    (dict(warmup_steps=0), ValueError,
     r"skip_step: warmup_steps must be an int >= 1, got 0"),
    (dict(warmup_steps=-3), ValueError, r"skip_step: warmup_steps.*got -3"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    oc.skip_step(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("inner", [optax.adam, None, "adam"])
def test_inner_must_be_a_gradient_transformation(inner):
  with pytest.raises(TypeError, match=r"skip_step: inner must be an "
                     r"optax.GradientTransformation.*got"):
    oc.skip_step(inner)


def test_clip_stats_finds_clippers_inside_the_wrapped_optimizer():
  tx = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)),
                    max_norm=10.0)
  params = {"w": jnp.zeros(2)}
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
  stats = oc.clip_stats(state)
  assert float(stats["skip_step/skip_norm"]) == 5.0
  assert float(stats["clip_by_global_norm/global_norm"]) == 5.0
  assert "skip_step/inner_state" not in stats


def test_norm_equal_to_threshold_is_accepted():
  tx = oc.skip_step(optax.sgd(1.0), max_norm=5.0, spike_sigmas=3.0, window=4,
                    warmup_steps=2)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  for _ in range(6):  # norm 5 == max_norm, then == mean + 3 * 0 (std 0)
    updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    assert not bool(state.step_skipped)
  assert float(state.skip_threshold) == 5.0
  # With zero spread, anything above the constant level is a spike.
  _, state = tx.update({"w": jnp.array([3.0, 4.001])}, state, params)
  assert bool(state.step_skipped)


@pytest.mark.parametrize("history, spike", [
    ([1e30, 1e30, 2.0], 1e32),  # squared deviations overflow float32
    ([3e38, 3e38, 3e38, 2.9e38], 3.4e38),  # the sum overflows float32
    ([1e-30, 3e-30, 2e-30], 1e-28),  # squared deviations underflow
])
def test_norm_statistics_do_not_overflow_float32(use_jit, history, spike):
  norms = [*history, spike]
  tx = oc.skip_step(optax.sgd(1.0), spike_sigmas=6.0, window=8,
                    warmup_steps=3)
  params = {"w": jnp.zeros(2, jnp.float32)}
  update = jax.jit(tx.update) if use_jit else tx.update
  state = tx.init(params)
  for norm in norms:
    # The norm kernel gets such norms right (rescued sums of squares).
    _, state = update({"w": jnp.array([0.6, 0.8], jnp.float32) * norm}, state)
  recorded = np.asarray(state.accepted_norms[:len(history)], np.float64)
  np.testing.assert_allclose(recorded, history, rtol=1e-6)
  (*_, (skipped, threshold)) = reference.skip_step_reference(
      [*recorded, spike], spike_sigmas=6.0, window=8, warmup_steps=3)
  assert skipped
  assert math.isfinite(float(state.skip_threshold))
  np.testing.assert_allclose(float(state.skip_threshold), threshold,
                             rtol=1e-5)
  assert bool(state.step_skipped)


# --------------------------------------------------------------------------
# Schedules that turn invalid when traced; MultiSteps as the inner transform.
# --------------------------------------------------------------------------


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

"""skip_step's loss rule (``update(..., loss=...)``): MaxText / OLMo-core.

Checked against a float64 NumPy loop (``reference.py``) over long
norm/loss sequences, against OLMo-core's PyTorch rule (trajectories made by
``data/make_skip_loss_trajectories.py``, no torch needed here), and against
hand-computed cases; plus the usual jit/eager, dtype, grad, retrace,
inject_hyperparams, scan, MultiSteps and Flax checks.
"""

from __future__ import annotations

import math
import pathlib

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given

import helpers
import optaxclip as oc
from reference import loss_margins, skip_step_loss_reference

NUM_STEPS = 320
DATA = pathlib.Path(__file__).parent / "data" / "skip_loss_trajectories.npz"
_RNG = np.random.default_rng(0)
_DIRECTION = {"w": _RNG.normal(size=(4, 3)), "b": _RNG.normal(size=(3,))}
_DIR_NORM = math.sqrt(sum(float(np.sum(v * v)) for v in _DIRECTION.values()))
_UNIT = {k: v / _DIR_NORM for k, v in _DIRECTION.items()}
_PARAMS = {k: np.zeros(v.shape, np.float32) for k, v in _UNIT.items()}


def _grads_for(norm: float) -> dict[str, np.ndarray]:
  """A float32 gradient tree with global norm ``norm`` (NaN/inf too)."""
  if not math.isfinite(norm):
    grads = {k: v.astype(np.float32) for k, v in _UNIT.items()}
    grads["w"][1, 2] = norm
    return grads
  return {k: (v * norm).astype(np.float32) for k, v in _UNIT.items()}


def _true_norm(grads) -> float:
  return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2))
                       for v in grads.values()))


def _norm_sequence() -> np.ndarray:
  rng = np.random.default_rng(1)
  t = np.arange(NUM_STEPS)
  norms = (1.0 + t / NUM_STEPS) * np.exp(0.1 * rng.normal(size=NUM_STEPS))
  for step, factor in [(30, 8.0), (75, 5.0), (140, 20.0), (200, 30.0),
                       (290, 6.0)]:
    norms[step] *= factor
  norms[[20, 160]] = 0.0
  norms[[50, 222]] = np.nan
  norms[[51]] = np.inf
  return norms


def _loss_sequence() -> list:
  """Float32 losses: decay, noise, spikes, a plateau, a shift, a drift,
  NaN/inf, and steps without a loss (None)."""
  rng = np.random.default_rng(8)
  t = np.arange(NUM_STEPS, dtype=np.float64)
  losses = 3.0 + 3.0 * np.exp(-t / 60.0)
  losses *= 1.0 + 0.01 * rng.normal(size=NUM_STEPS)
  for step, factor in [(25, 2.0), (80, 1.6), (81, 1.4), (110, 3.0),
                       (150, 2.2), (230, 2.5), (231, 1.5), (300, 3.0)]:
    losses[step] *= factor
  losses[160:190] = 3.125  # a constant plateau, exact in float32
  losses[250:262] += 0.3  # a temporary level shift
  losses[270:] += 0.004 * np.arange(NUM_STEPS - 270)  # slow upward drift
  out: list = [float(x) for x in losses.astype(np.float32)]
  for step in (40, 130, 205):
    out[step] = math.nan
  for step in (41, 240):
    out[step] = math.inf
  out[185] = -math.inf
  for step in (10, 60, 61, 145, 200, 290):
    out[step] = None
  return out


def _run_loop(tx, grads_seq, losses, use_jit=True):
  """Runs ``tx`` step by step; returns stacked per-step states and updates."""
  params = jax.tree.map(jnp.asarray, _PARAMS)
  with_loss = helpers.maybe_jit(
      lambda g, s, loss: tx.update(g, s, params, loss=loss), use_jit)
  without_loss = helpers.maybe_jit(
      lambda g, s: tx.update(g, s, params), use_jit)
  state = tx.init(params)
  states, updates = [], []
  for grads, loss in zip(grads_seq, losses, strict=True):
    grads = jax.tree.map(jnp.asarray, grads)
    if loss is None:
      out, state = without_loss(grads, state)
    else:
      out, state = with_loss(grads, state, np.float32(loss))
    states.append(jax.device_get(state._replace(inner_state=None)))
    updates.append(jax.device_get(out))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *states)
  return state, stacked, jax.tree.map(lambda *xs: np.stack(xs), *updates)


CONFIGS = {
    "maxtext_defaults": dict(),
    "short_loss_window": dict(loss_window=12, loss_spike_sigmas=3.0),
    "both_rules": dict(max_norm=5.0, spike_sigmas=2.5, window=16,
                       warmup_steps=4, loss_window=12, loss_spike_sigmas=3.0),
    "record_skipped": dict(max_norm=5.0, spike_sigmas=2.5, window=16,
                           warmup_steps=4, loss_window=12,
                           loss_spike_sigmas=3.0, record_skipped=True),
    "keep_nonfinite": dict(spike_sigmas=3.3, window=16, loss_window=16,
                           loss_spike_sigmas=2.5, skip_nonfinite=False),
    "no_loss_spike_clause": dict(loss_spike_sigmas=None, window=8),
    "custom_warmup": dict(window=24, loss_warmup_steps=20,
                          loss_spike_sigmas=2.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequence_matches_reference(name):
  config = CONFIGS[name]
  lr = 0.5
  tx = oc.skip_step(optax.sgd(lr), **config)
  grads_seq = [_grads_for(n) for n in _norm_sequence()]
  norms = np.array([_true_norm(g) for g in grads_seq])
  losses = _loss_sequence()
  ref = skip_step_loss_reference(norms, losses, **config)

  window = config.get("window", 128)
  loss_window = config.get("loss_window", window)
  loss_warmup = config.get("loss_warmup_steps",
                           max(1, loss_window // 2 - 1))
  sigmas = config.get("loss_spike_sigmas", 6.0)
  # float32 vs float64: no decision may hinge on the last digits, except
  # exact ties on the constant plateau (equal is accepted in both).
  if sigmas is not None:
    margins = loss_margins(
        losses, ref["skipped"], loss_spike_sigmas=sigmas,
        loss_window=loss_window, loss_warmup_steps=loss_warmup,
        record_skipped=config.get("record_skipped", False))
    assert np.all((margins == 0) | (margins > 1e-5)), "loss data too close"
  threshold = ref["threshold"]
  finite = np.isfinite(norms) & np.isfinite(threshold)
  assert np.all(np.abs(norms[finite] - threshold[finite])
                > 1e-4 * threshold[finite]), "norm data too close"
  assert 5 <= ref["skipped"].sum() <= NUM_STEPS // 2
  if sigmas is not None:
    assert ref["loss_skipped"].sum() >= 3 + 6  # spikes beyond the 6 NaN/inf

  final, states, updates = _run_loop(tx, grads_seq, losses)

  np.testing.assert_array_equal(states.step_skipped, ref["skipped"])
  np.testing.assert_array_equal(states.loss_skipped, ref["loss_skipped"])
  np.testing.assert_allclose(states.skip_threshold, ref["threshold"],
                             rtol=1e-5)
  np.testing.assert_allclose(states.loss_threshold, ref["loss_threshold"],
                             rtol=1e-5)
  np.testing.assert_array_equal(states.num_skipped,
                                np.cumsum(ref["skipped"]))
  # skip_loss: the last loss passed (carried over on steps without one).
  last, expected = 0.0, []
  for loss in losses:
    last = last if loss is None else loss
    expected.append(last)
  np.testing.assert_array_equal(states.skip_loss,
                                np.array(expected, np.float32))

  # The histories: counts and ring-buffer contents.
  for history, count, recorded, size in (
      (final.loss_history, final.num_losses, ref["loss_history"],
       loss_window),
      (final.accepted_norms, final.num_accepted, ref["norm_history"],
       window)):
    assert int(count) == len(recorded)
    buffer = np.asarray(history)
    assert buffer.shape == (size,)
    expected_buffer = np.zeros(size)
    for i, value in enumerate(recorded):
      expected_buffer[i % size] = value
    np.testing.assert_allclose(buffer, expected_buffer, rtol=1e-6)
    assert np.all(np.isfinite(buffer))  # never poisoned

  skipped = ref["skipped"]
  for k in _UNIT:
    u = updates[k]
    assert np.all(u[skipped] == 0.0)
    g = np.stack([g[k] for g in grads_seq])
    accepted_finite = ~skipped & np.isfinite(norms)
    np.testing.assert_allclose(u[accepted_finite], -lr * g[accepted_finite],
                               rtol=1e-6)


def _olmo_cases():
  with np.load(DATA) as data:
    return sorted({k.split("__")[0] for k in data.files})


@pytest.mark.parametrize("case", _olmo_cases())
def test_matches_olmo_core_torch_trajectories(case):
  """OLMo-core's own rule, transcribed in PyTorch, decides identically."""
  with np.load(DATA) as data:
    losses = data[f"{case}__losses"]
    expected = data[f"{case}__skipped"]
    mean, std = data[f"{case}__mean"], data[f"{case}__std"]
    window, sigma, every = data[f"{case}__config"]
  window = int(window)
  assert losses.shape == (400,)
  tx = oc.skip_step(optax.sgd(1.0), loss_spike_sigmas=float(sigma),
                    loss_window=window, record_skipped=bool(every))
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([0.1, -0.2, 0.3])}

  def step(state, loss):
    _, state = tx.update(grads, state, params, loss=loss)
    return state, (state.step_skipped, state.loss_skipped,
                   state.loss_threshold)

  _, (skipped, loss_skipped, threshold) = jax.jit(
      lambda s, xs: jax.lax.scan(step, s, xs))(tx.init(params),
                                              jnp.asarray(losses))
  np.testing.assert_array_equal(np.asarray(skipped), expected)
  np.testing.assert_array_equal(np.asarray(loss_skipped), expected)
  active = ~np.isnan(mean)
  np.testing.assert_allclose(np.asarray(threshold)[active],
                             (mean + sigma * std)[active], rtol=1e-5)
  assert np.all(np.isinf(np.asarray(threshold)[~active]))
  # The rule becomes active where MaxText's and OLMo-core's warmup ends.
  first_active = int(np.argmax(active))
  assert first_active == max(1, window // 2 - 1)


def _loss_steps(tx, losses, params=None, grads=None, use_jit=False):
  params = {"w": jnp.zeros(2)} if params is None else params
  grads = {"w": jnp.array([0.3, 0.4])} if grads is None else grads
  update = helpers.maybe_jit(
      lambda g, s, loss: tx.update(g, s, params, loss=loss), use_jit)
  state = tx.init(params)
  outs = []
  for loss in losses:
    out, state = update(grads, state, jnp.float32(loss))
    outs.append(out)
  return outs, state


def test_hand_computed_threshold(use_jit):
  tx = oc.skip_step(optax.sgd(1.0), loss_window=8)  # warmup 8 // 2 - 1 = 3
  outs, state = _loss_steps(tx, [2.0, 2.1, 1.9, 2.0, 9.0], use_jit=use_jit)
  # History 2.0, 2.1, 1.9, 2.0: mean 2, sample variance 0.02 / 3.
  expected = 2.0 + 6.0 * math.sqrt(0.02 / 3)
  assert math.isclose(float(state.loss_threshold), expected, rel_tol=1e-6)
  assert bool(state.step_skipped) and bool(state.loss_skipped)
  np.testing.assert_array_equal(outs[-1]["w"], 0.0)
  assert int(state.num_losses) == 4 and int(state.num_skipped) == 1
  np.testing.assert_allclose(outs[0]["w"], [-0.3, -0.4])


def test_warmup_is_maxtexts_half_window():
  # Default window 128: the rule needs 63 recorded losses (the current one
  # makes 64 = 128 // 2, MaxText's and OLMo-core's minimum history).
  tx = oc.skip_step(optax.sgd(1.0))
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([0.3, 0.4])}

  def run(losses):
    def step(state, loss):
      _, state = tx.update(grads, state, params, loss=loss)
      return state, state.step_skipped
    return jax.jit(lambda xs: jax.lax.scan(step, tx.init(params), xs))(
        jnp.asarray(losses, jnp.float32))

  losses = np.full(64, 2.0, np.float32)
  losses[63] = 100.0
  _, skipped = run(losses)
  assert np.flatnonzero(np.asarray(skipped)).tolist() == [63]
  _, skipped = run(losses[1:])  # only 62 losses before the spike
  assert not np.asarray(skipped).any()


def test_ties_are_accepted():
  # History 0, 2, 4: mean 2, sample std exactly 2; k = 1.5: boundary 5.
  tx = oc.skip_step(optax.sgd(1.0), loss_window=6, loss_warmup_steps=3,
                    loss_spike_sigmas=1.5)
  _, state = _loss_steps(tx, [0.0, 2.0, 4.0, 5.0])
  assert not bool(state.step_skipped)
  assert float(state.loss_threshold) == 5.0
  _, state = _loss_steps(tx, [0.0, 2.0, 4.0, float(np.nextafter(
      np.float32(5.0), np.float32(6.0)))])
  assert bool(state.step_skipped)
  # A constant history has std 0: equal is accepted, anything above skips.
  tx = oc.skip_step(optax.sgd(1.0), loss_window=4, loss_spike_sigmas=3.0)
  _, state = _loss_steps(tx, [2.5] * 6)
  assert int(state.num_skipped) == 0 and float(state.loss_threshold) == 2.5
  _, state = _loss_steps(tx, [2.5] * 6 + [2.5001])
  assert bool(state.step_skipped)
  # An infinite factor never flags, even over a constant history.
  tx = oc.skip_step(optax.sgd(1.0), loss_window=4, loss_spike_sigmas=math.inf,
                    spike_sigmas=math.inf, window=2, warmup_steps=1)
  _, state = _loss_steps(tx, [2.5] * 4 + [1e30])
  assert int(state.num_skipped) == 0
  assert math.isinf(float(state.loss_threshold))
  assert math.isinf(float(state.skip_threshold))


def test_single_recorded_loss_has_zero_std():
  # loss_window <= 5 makes the rule active after one loss: std is 0 (the
  # max(1, N - 1) divisor, as MaxText), not NaN.
  tx = oc.skip_step(optax.sgd(1.0), loss_window=4)
  _, state = _loss_steps(tx, [2.0, 2.0])
  assert not bool(state.step_skipped) and float(state.loss_threshold) == 2.0
  _, state = _loss_steps(tx, [2.0, 2.5])
  assert bool(state.step_skipped)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_skips_and_never_poisons(use_jit, bad):
  tx = oc.skip_step(optax.sgd(1.0), loss_window=6)
  losses = [2.0, 2.1, 1.9, bad, 2.05, bad, 2.0]
  outs, state = _loss_steps(tx, losses, use_jit=use_jit)
  assert int(state.num_skipped) == 2 and int(state.num_losses) == 5
  assert np.all(np.isfinite(np.asarray(state.loss_history)))
  assert math.isfinite(float(state.loss_threshold))
  for i in (3, 5):
    np.testing.assert_array_equal(outs[i]["w"], 0.0)
  # skip_nonfinite=False: the step goes through and the loss is not recorded.
  tx = oc.skip_step(optax.sgd(1.0), loss_window=6, skip_nonfinite=False)
  outs, state = _loss_steps(tx, losses, use_jit=use_jit)
  assert int(state.num_skipped) == 0 and int(state.num_losses) == 5
  np.testing.assert_allclose(outs[3]["w"], [-0.3, -0.4])


def test_without_loss_nothing_changes(use_jit):
  config = dict(max_norm=3.0, spike_sigmas=2.0, window=4, warmup_steps=2)
  plain = oc.skip_step(optax.sgd(1.0), **config)
  params = {"w": jnp.zeros(2)}
  update = helpers.maybe_jit(plain.update, use_jit)
  state = plain.init(params)
  fresh = jax.device_get(state)
  for norm in [1.0, 1.2, 0.9, np.nan, 5.0, 1.1, 2.9]:
    grads = {"w": jnp.array([0.6, 0.8]) * norm}
    _, state = update(grads, state, params)
  ref = skip_step_loss_reference(
      [1.0, 1.2, 0.9, np.nan, 5.0, 1.1, 2.9], [None] * 7, **config)
  assert int(state.num_skipped) == int(ref["skipped"].sum()) == 3
  for field in ("skip_loss", "loss_skipped", "loss_history", "num_losses",
                "loss_threshold"):
    np.testing.assert_array_equal(getattr(state, field), getattr(fresh, field))
  # A loss passed once, then steps without: the loss fields keep their
  # values (loss_skipped resets to False).
  _, state = plain.update({"w": jnp.array([0.6, 0.8])}, state, params,
                         loss=7.5)
  kept = jax.device_get(state)
  _, state = update({"w": jnp.array([0.6, 0.8])}, state, params)
  assert float(state.skip_loss) == 7.5 == float(kept.skip_loss)
  assert int(state.num_losses) == int(kept.num_losses) == 1
  assert not bool(state.loss_skipped)


def test_record_skipped_adapts_to_a_lasting_shift():
  rng = np.random.default_rng(3)
  losses = list(2.0 + 0.01 * rng.normal(size=20)) + list(
      3.0 + 0.01 * rng.normal(size=40))
  accepted_only = oc.skip_step(optax.sgd(1.0), loss_window=8)
  _, state = _loss_steps(accepted_only, losses)
  assert int(state.num_consecutive_skipped) == 40  # stalled
  every = oc.skip_step(optax.sgd(1.0), loss_window=8, record_skipped=True)
  _, state = _loss_steps(every, losses)
  assert int(state.num_skipped) < 8 and int(state.num_consecutive_skipped) == 0
  for record_skipped, stalled in ((False, True), (True, False)):
    ref = skip_step_loss_reference(
        np.ones(60), losses, loss_window=8, record_skipped=record_skipped)
    assert bool(ref["skipped"][-1]) == stalled


@pytest.mark.usefixtures("standard_promotion")
def test_adam_state_frozen_on_loss_skip_and_equal_to_inner(use_jit):
  inner = optax.adam(1e-2)
  tx = oc.skip_step(inner, loss_window=6, loss_spike_sigmas=3.0)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  step = helpers.maybe_jit(
      lambda g, s, loss: tx.update(g, s, params, loss=loss), use_jit)
  inner_step = helpers.maybe_jit(inner.update, use_jit)
  state, inner_state = tx.init(params), inner.init(params)
  losses = [3.0, 2.9, 2.95, 2.8, 9.0, np.nan, 2.75, 2.7, 4.0, 2.72]
  skipped_steps = []
  for i, loss in enumerate(losses):
    grads = jax.tree.map(jnp.asarray, _grads_for(1.0 + 0.1 * i))
    updates, new_state = step(grads, state, jnp.float32(loss))
    if bool(new_state.step_skipped):
      skipped_steps.append(i)
      jax.tree.map(np.testing.assert_array_equal,
                   jax.device_get(new_state.inner_state),
                   jax.device_get(state.inner_state))
      for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0.0)
    else:
      direct, inner_state = inner_step(grads, inner_state, params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                   updates, direct)
    state = new_state
  ref = skip_step_loss_reference(np.ones(10), losses, loss_window=6,
                                 loss_spike_sigmas=3.0)
  assert skipped_steps == np.flatnonzero(ref["skipped"]).tolist() == [4, 5, 8]


def test_loss_reaches_inner_and_other_extra_args_too():
  seen = {}

  def update(updates, state, params=None, **extra):
    del params
    seen.update(extra)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update)
  tx = oc.skip_step(inner)
  grads = {"w": jnp.array([1.0, 2.0])}
  tx.update(grads, tx.init(grads), None, loss=2.5, grad_norm=3.0)
  assert float(seen["loss"]) == 2.5 and seen["grad_norm"] == 3.0
  # A plain GradientTransformation inner (and a chain) ignores them.
  for inner in (optax.sgd(0.1),
                optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))):
    tx = oc.skip_step(inner)
    updates, state = tx.update(grads, tx.init(grads), grads, loss=2.5)
    assert float(state.skip_loss) == 2.5
    assert updates["w"].shape == (2,)


@pytest.mark.parametrize("loss, error, match", [
    (jnp.ones(3), ValueError,
     r"skip_step: the loss extra argument .* must be a scalar, got an array"
     r" of shape \(3,\)"),
    (np.ones((1, 1)), ValueError, r"must be a scalar.*\(1, 1\)"),
    (True, TypeError, r"skip_step: the loss extra argument .*real scalar,"
     r" got True of type bool"),
    (jnp.array(True), TypeError, r"real scalar, got an array of dtype bool"),
    (jnp.array(1.0 + 2.0j), TypeError, r"real scalar.*complex64"),
    ("2.0", TypeError, r"real scalar, got '2.0' of type str"),
])
def test_bad_loss(loss, error, match):
  tx = oc.skip_step(optax.sgd(0.1))
  grads = {"w": jnp.zeros(2)}
  with pytest.raises(error, match=match):
    tx.update(grads, tx.init(grads), None, loss=loss)


def test_integer_loss_and_none_loss():
  tx = oc.skip_step(optax.sgd(0.1))
  grads = {"w": jnp.zeros(2)}
  _, state = tx.update(grads, tx.init(grads), None, loss=3)
  assert float(state.skip_loss) == 3.0 and int(state.num_losses) == 1
  _, state = tx.update(grads, state, None, loss=None)  # same as no loss
  assert int(state.num_losses) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_spike_sigmas=0.0), ValueError,
     r"skip_step: loss_spike_sigmas must be a positive scalar \(0 <"
     r" loss_spike_sigmas <= inf\) or None to disable the loss spike rule,"
     r" got 0\.0"),
    (dict(loss_spike_sigmas=-1), ValueError,
     r"skip_step: loss_spike_sigmas.*got -1"),
    (dict(loss_spike_sigmas=float("nan")), ValueError,
     r"skip_step: loss_spike_sigmas.*nan"),
    (dict(loss_spike_sigmas="6"), TypeError,
     r"skip_step: loss_spike_sigmas must be a real number"),
    (dict(loss_spike_sigmas=np.ones(2)), ValueError,
     r"skip_step: loss_spike_sigmas must be a scalar"),
    (dict(loss_window=0), ValueError,
     r"skip_step: loss_window must be an int >= 1, got 0"),
    (dict(loss_window=2.5), TypeError,
     r"skip_step: loss_window must be an int >= 1"),
    (dict(loss_window=jnp.array(8)), TypeError,
     r"static_args=\('loss_window',\)"),
    (dict(loss_warmup_steps=0), ValueError,
     r"skip_step: loss_warmup_steps must be an int >= 1, got 0"),
    (dict(loss_warmup_steps=jnp.array(3)), TypeError,
     r"static_args=\('loss_warmup_steps',\)"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    oc.skip_step(optax.sgd(0.1), **kwargs)


def test_state_requires_init_and_float_leaves():
  tx = oc.skip_step(optax.sgd(0.1))
  with pytest.raises(ValueError, match="init"):
    tx.update({"w": jnp.zeros(2)}, None, None, loss=1.0)
  with pytest.raises(TypeError, match="skip_step"):
    tx.update({"w": jnp.zeros(2, jnp.int32)}, tx.init({"w": jnp.zeros(2)}),
              None, loss=1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_structure_kept(use_jit, dtype):
  tx = oc.skip_step(optax.sgd(1.0), loss_window=4)
  params = {"a": jnp.zeros((3,), dtype), "b": [jnp.zeros((2, 2), dtype)]}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, dtype), params)
  update = helpers.maybe_jit(
      lambda g, s, loss: tx.update(g, s, params, loss=loss), use_jit)
  state = tx.init(params)
  for loss in [jnp.asarray(2.0, dtype), jnp.asarray(2.0, dtype),
               jnp.asarray(8.0, dtype)]:
    updates, state = update(grads, state, loss)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and u.shape == p.shape
    np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)
  assert state.loss_history.dtype == jnp.float32
  assert state.skip_loss.dtype == jnp.float32
  assert bool(state.loss_skipped) and int(state.num_losses) == 2


def test_float64_params_keep_a_float64_loss_history():
  with helpers.enable_x64():
    tx = oc.skip_step(optax.sgd(1.0), loss_window=4)
    params = {"w": jnp.zeros(2, jnp.float64)}
    _, state = tx.update({"w": jnp.ones(2, jnp.float64)}, tx.init(params),
                         params, loss=jnp.float64(1.0 + 1e-12))
    assert state.loss_history.dtype == jnp.float64
    assert float(state.skip_loss) == 1.0 + 1e-12


def test_grad_through_update_is_finite():
  tx = oc.skip_step(optax.sgd(1.0), loss_window=4, spike_sigmas=2.0,
                    window=4, warmup_steps=1)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  for loss in [1.0, 1.1, 0.9]:
    _, state = tx.update({"w": jnp.ones(3)}, state, params, loss=loss)

  def objective(grads, loss):
    updates, new_state = tx.update(grads, state, params, loss=loss)
    return jnp.sum(updates["w"]) + new_state.skip_loss

  for grads in ({"w": jnp.zeros(3)}, {"w": jnp.array([0.5, -1.0, 0.2])}):
    for loss in (1.0, 50.0):  # accepted, skipped
      g_grads, g_loss = jax.grad(objective, argnums=(0, 1))(
          grads, jnp.float32(loss))
      assert np.all(np.isfinite(np.asarray(g_grads["w"])))
      assert float(g_loss) == 1.0


def test_no_retrace_with_loss():
  tx = oc.skip_step(optax.sgd(0.1), loss_window=4, loss_warmup_steps=3,
                    max_norm=3.0)
  params = {"w": jnp.zeros(2)}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state, loss):
    return tx.update(grads, state, params, loss=loss)

  state = tx.init(params)
  for loss in [1.0, 1.1, np.nan, 0.9, 10.0, 1.0, np.inf, 1.05, 0.95, 1.0]:
    _, state = step({"w": jnp.array([0.6, 0.8])}, state, loss)
  assert int(state.num_skipped) == 3


def test_inject_hyperparams_loss_sigmas_schedule():
  # Defaults only, the loss passes through inject_hyperparams.
  tx = optax.inject_hyperparams(oc.skip_step)(optax.sgd(1.0))
  params = {"w": jnp.zeros(2)}
  _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params, loss=2.0)
  assert float(state.inner_state.skip_loss) == 2.0
  # A traced factor: 1.0 at first, then 100 from the 5th step on.
  tx = optax.inject_hyperparams(
      oc.skip_step, static_args=("loss_window", "loss_warmup_steps"))(
      optax.sgd(1.0), loss_window=4, loss_warmup_steps=3,
      loss_spike_sigmas=lambda count: jnp.where(count < 4, 1.0, 100.0))
  step = jax.jit(chex.assert_max_traces(
      lambda g, s, loss: tx.update(g, s, params, loss=loss), n=1))
  state = tx.init(params)
  skipped = []
  for loss in [2.0, 2.2, 2.1, 2.6, 2.6, 2.7]:
    _, state = step({"w": jnp.ones(2)}, state, jnp.float32(loss))
    skipped.append(bool(state.inner_state.step_skipped))
  # 2.6 at step 3: mean 2.1 + 1 * std 0.1 = 2.2 -> skip; then k = 100.
  assert skipped == [False, False, False, True, False, False]
  stats = oc.clip_stats(state)
  assert float(stats["skip_step/loss_spike_sigmas"]) == 100.0


def test_scan_training_loop_with_loss():
  """A linear regression trained in lax.scan; a corrupted batch is skipped."""
  rng = np.random.default_rng(0)
  w_true = np.array([1.0, -2.0, 0.5], np.float32)
  xs = rng.normal(size=(60, 8, 3)).astype(np.float32)
  ys = xs @ w_true + 0.01 * rng.normal(size=(60, 8)).astype(np.float32)
  ys[40] += 50.0  # a bad batch: huge loss
  tx = oc.skip_step(optax.sgd(0.05), loss_window=16)

  def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2)

  def step(carry, batch):
    w, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(w, *batch)
    updates, state = tx.update(grads, state, w, loss=loss)
    return (optax.apply_updates(w, updates), state), (
        loss, state.step_skipped, w)

  w0 = jnp.zeros(3)
  (w, _), (losses, skipped, ws) = jax.jit(
      lambda c, b: jax.lax.scan(step, c, b))((w0, tx.init(w0)),
                                             (jnp.asarray(xs), jnp.asarray(ys)))
  ref = skip_step_loss_reference(np.ones(60), np.asarray(losses, np.float64),
                                 loss_window=16)
  np.testing.assert_array_equal(np.asarray(skipped), ref["skipped"])
  assert np.flatnonzero(np.asarray(skipped)).tolist() == [40]
  np.testing.assert_array_equal(np.asarray(ws[41]), np.asarray(ws[40]))
  np.testing.assert_allclose(np.asarray(w), w_true, atol=0.05)


@pytest.mark.usefixtures("standard_promotion")
def test_multisteps_inner_drops_a_spiking_micro_batch():
  k = 2
  tx = oc.skip_step(optax.MultiSteps(optax.sgd(1.0), k)
                    .gradient_transformation(), loss_window=4,
                    loss_warmup_steps=3)
  plain = optax.MultiSteps(optax.sgd(1.0), k).gradient_transformation()
  params = {"w": jnp.zeros(2)}
  micro = [(jnp.array([1.0, 0.0]), 2.0), (jnp.array([0.0, 1.0]), 2.1),
           (jnp.array([2.0, 0.0]), 1.9), (jnp.array([5.0, 5.0]), 30.0),
           (jnp.array([0.0, 2.0]), 2.0), (jnp.array([1.0, 1.0]), 2.05)]
  state, plain_state = tx.init(params), plain.init(params)
  outs, plain_outs = [], []
  for g, loss in micro:
    out, state = tx.update({"w": g}, state, params, loss=loss)
    outs.append(out["w"])
    if loss != 30.0:  # the run without the spiking micro-batch
      out, plain_state = plain.update({"w": g}, plain_state, params)
      plain_outs.append(out["w"])
  assert int(state.num_skipped) == 1
  np.testing.assert_array_equal(outs[3], 0.0)
  del outs[3]
  for a, b in zip(outs, plain_outs, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.inner_state), jax.device_get(plain_state))


def test_nnx_optimizer_update_with_loss():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)[..., 0]

  model = Model(nnx.Rngs(0))
  tx = oc.skip_step(optax.sgd(0.1), loss_window=6)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)

  @nnx.jit
  def train_step(model, optimizer, x, y, offset):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2) + offset
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    if helpers.flax_version() >= (0, 11):
      optimizer.update(model, grads, loss=loss)
    else:  # flax 0.10: update(grads, **kwargs), the model is held inside
      optimizer.update(grads, loss=loss)
    return loss

  skipped = []
  for offset in [0.0, 0.0, 0.0, 0.0, 100.0, 0.0]:
    before = helpers.nnx_pure(nnx.state(model, nnx.Param))
    train_step(model, optimizer, x, y, jnp.float32(offset))
    stats = oc.clip_stats(optimizer.opt_state)
    skipped.append(bool(stats["skip_step/step_skipped"]))
    if skipped[-1]:
      after = helpers.nnx_pure(nnx.state(model, nnx.Param))
      jax.tree.map(np.testing.assert_array_equal, before, after)
  assert skipped == [False] * 4 + [True, False]
  assert bool(stats["skip_step/loss_skipped"]) is False
  assert int(stats["skip_step/num_losses"]) == 5


def test_clip_stats_keys():
  tx = optax.chain(oc.skip_step(optax.sgd(0.1), loss_window=4))
  params = {"w": jnp.zeros(2)}
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params,
                       loss=2.5)
  stats = oc.clip_stats(state)
  for field in ("skip_loss", "loss_skipped", "num_losses", "loss_threshold",
                "skip_norm", "step_skipped"):
    assert f"skip_step/{field}" in stats
  assert "skip_step/loss_history" not in stats
  assert "skip_step/accepted_norms" not in stats
  full = oc.clip_stats(state, include_history=True)
  np.testing.assert_array_equal(full["skip_step/loss_history"],
                                [2.5, 0.0, 0.0, 0.0])
  assert float(stats["skip_step/skip_loss"]) == 2.5
  assert float(optax.tree.get(state, "num_losses")) == 1


def test_numpy_round_trip_gives_identical_next_step():
  tx = oc.skip_step(optax.sgd(0.1), loss_window=4, spike_sigmas=2.0,
                    window=4, warmup_steps=2)
  params = {"w": jnp.zeros(2)}
  step = jax.jit(lambda g, s, loss: tx.update(g, s, params, loss=loss))
  state = tx.init(params)
  for loss in [1.0, 1.3, np.nan, 0.8, 1.1, 9.0]:
    _, state = step({"w": jnp.array([0.6, 0.8])}, state, jnp.float32(loss))
  leaves, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  grads = {"w": jnp.array([0.3, 0.4])}
  out = step(grads, state, jnp.float32(1.05))
  out_restored = step(grads, restored, jnp.float32(1.05))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out),
               jax.device_get(out_restored))


_PROPERTY_TX = oc.skip_step(optax.sgd(1.0), loss_window=6,
                            loss_spike_sigmas=1.5, record_skipped=False)
_PROPERTY_TX_ALL = oc.skip_step(optax.sgd(1.0), loss_window=6,
                                loss_spike_sigmas=1.5, record_skipped=True)


def _scan_decisions(tx, losses):
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([0.3, 0.4])}

  def step(state, loss):
    _, state = tx.update(grads, state, params, loss=loss)
    return state, (state.step_skipped, state.loss_threshold)

  return jax.lax.scan(step, tx.init(params), losses)[1]


_SCAN = {flag: jax.jit(lambda xs, tx=tx: _scan_decisions(tx, xs))
         for flag, tx in ((False, _PROPERTY_TX), (True, _PROPERTY_TX_ALL))}


@given(
    losses=st.lists(
        st.one_of(st.floats(0.0, 10.0, width=32),
                  st.sampled_from([math.nan, math.inf, 2.0])),
        min_size=24, max_size=24),
    record_skipped=st.booleans(),
)
def test_property_matches_reference(losses, record_skipped):
  losses32 = np.asarray(losses, np.float32)
  ref = skip_step_loss_reference(
      np.ones(24), [float(x) for x in losses32], loss_window=6,
      loss_spike_sigmas=1.5, record_skipped=record_skipped)
  margins = loss_margins([float(x) for x in losses32], ref["skipped"],
                         loss_spike_sigmas=1.5, loss_window=6,
                         loss_warmup_steps=2, record_skipped=record_skipped)
  # No decision within float32 rounding of its boundary.
  assume(np.all((margins == 0) | (margins > 1e-4)))
  skipped, threshold = _SCAN[record_skipped](jnp.asarray(losses32))
  np.testing.assert_array_equal(np.asarray(skipped), ref["skipped"])
  np.testing.assert_allclose(np.asarray(threshold), ref["loss_threshold"],
                             rtol=1e-5, atol=1e-5)
  # Every non-finite loss is skipped; a skipped loss is never recorded
  # unless record_skipped.
  nonfinite = ~np.isfinite(losses32)
  assert np.all(np.asarray(skipped)[nonfinite])


def test_axis_name_makes_one_decision_across_devices():
  """Under a named axis (vmap stands in for shard_map), every device sees
  the mean loss and the global norm, so all take the same decision."""
  tx = oc.skip_step(optax.sgd(1.0), loss_window=4, loss_warmup_steps=2,
                    axis_name="d")
  params = {"w": jnp.zeros((2, 2))}  # two devices, each holding half of w
  state = jax.vmap(tx.init)(params)
  step = jax.jit(jax.vmap(
      lambda g, s, loss: tx.update(g, s, None, loss=loss), axis_name="d"))
  grads = {"w": jnp.array([[0.3, 0.4], [0.0, 0.0]])}
  # Device losses average to 2.0, 2.2, 2.1, then 5.0 (device 0 alone: 2.0).
  for losses in ([1.0, 3.0], [2.2, 2.2], [2.1, 2.1], [2.0, 8.0]):
    updates, state = step(grads, state, jnp.array(losses, jnp.float32))
  np.testing.assert_array_equal(state.step_skipped, [True, True])
  np.testing.assert_array_equal(state.skip_loss, [5.0, 5.0])
  np.testing.assert_array_equal(state.skip_norm, [0.5, 0.5])
  np.testing.assert_array_equal(state.loss_history[0], state.loss_history[1])
  np.testing.assert_array_equal(updates["w"], 0.0)


@pytest.mark.parametrize("history, spike", [
    ([1e30, 1e30, 2.0], 1e32),  # squared deviations overflow float32
    ([3e38, 3e38, 3e38, 2.9e38], 3.4e38),  # the sum overflows float32
    ([-3e37, 2e37, 1e37, 3e36], 3e38),  # signed losses, a wide spread
    ([1e-30, 3e-30, 2e-30], 1e-28),  # squared deviations underflow
])
def test_loss_statistics_do_not_overflow_float32(use_jit, history, spike):
  losses = [*history, spike]
  tx = oc.skip_step(optax.sgd(1.0), loss_window=8, loss_warmup_steps=3)
  _, state = _loss_steps(tx, losses, use_jit=use_jit)
  expected = skip_step_loss_reference(
      [0.5] * len(losses), losses, loss_window=8, loss_warmup_steps=3)
  assert expected["loss_skipped"][-1]  # the spike is far above m + 6 s
  assert math.isfinite(float(state.loss_threshold))
  np.testing.assert_allclose(float(state.loss_threshold),
                             expected["loss_threshold"][-1], rtol=1e-5)
  assert bool(state.loss_skipped) and bool(state.step_skipped)


@pytest.mark.parametrize("record_skipped", [False, True])
def test_record_skipped_lets_recurring_spikes_through(record_skipped):
  """The documented cost of MaxText's rule: recorded spikes widen the
  statistics, so a spike every 25 steps passes from the second one on."""
  rng = np.random.default_rng(0)
  losses = list(2.0 + 0.01 * rng.standard_normal(200))
  spikes = list(range(24, 200, 25))
  for step in spikes:
    losses[step] = 2.5
  tx = oc.skip_step(optax.sgd(1.0), loss_window=32,
                    record_skipped=record_skipped)
  update = jax.jit(lambda s, loss: tx.update({"w": jnp.ones(2)}, s, loss=loss))
  state = tx.init({"w": jnp.zeros(2)})
  skipped = []
  for loss in losses:
    state = update(state, jnp.float32(loss))[1]
    skipped.append(bool(state.step_skipped))
  expected = skip_step_loss_reference(
      [2 ** 0.5] * 200, losses, loss_window=32, record_skipped=record_skipped)
  np.testing.assert_array_equal(skipped, expected["skipped"])
  skipped_spikes = [skipped[step] for step in spikes]
  assert skipped_spikes == ([True] * 8 if not record_skipped
                            else [True] + [False] * 7)
  assert "repeated spikes" in oc.skip_step.__doc__

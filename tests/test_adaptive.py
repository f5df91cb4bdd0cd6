"""autoclip and zclip against float64 loop transcriptions of their papers."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
import reference
from helpers import enable_x64, maybe_jit


def norm_sequence(steps=320, seed=0):
  """Gradient norms with a drift, noise, spikes, zeros and a plateau."""
  rng = np.random.default_rng(seed)
  t = np.arange(steps)
  norms = 1.5 * np.exp(-t / 150) + 0.3 + 0.05 * rng.standard_normal(steps)
  norms = np.abs(norms)
  norms[rng.choice(steps, 12, replace=False)] *= rng.uniform(5, 50, 12)
  norms[[40, 41, 200]] = 0.0
  norms[250:265] = 0.7  # constant: zero variance
  return norms


def _tree_with_norm(direction, norm):
  return jax.tree.map(lambda d: d * np.float32(norm), direction)


def _direction():
  rng = np.random.default_rng(1)
  tree = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal((3,))}
  total = math.sqrt(sum(float(np.sum(x**2)) for x in tree.values()))
  return {k: jnp.asarray(v / total, jnp.float32) for k, v in tree.items()}


def _run(tx, norms):
  direction = _direction()
  state = tx.init(direction)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  results = []
  for n in norms:
    grads = _tree_with_norm(direction, n)
    out, state = step(grads, state)
    results.append((out, state, grads))
  chex.clear_trace_counter()
  return results


@pytest.mark.parametrize("percentile,history_size",
                         [(10.0, 1000), (50.0, 64), (0.0, 16), (100.0, 8),
                          (37.5, 5)])
def test_autoclip_matches_algorithm_1(percentile, history_size):
  norms = norm_sequence()
  want = reference.autoclip(norms, percentile, history_size)
  results = _run(oc.autoclip(percentile, history_size=history_size), norms)
  for (out, state, grads), (threshold, scale), n in zip(results, want, norms):
    np.testing.assert_allclose(float(state.autoclip_norm), n, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(float(state.autoclip_threshold), threshold,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(oc.global_norm(out)), n * scale,
                               rtol=2e-5, atol=1e-6)
    assert bool(state.autoclip_clipped) == (
        float(state.autoclip_norm) > float(state.autoclip_threshold))
  if percentile == 100.0:
    assert not any(bool(s.autoclip_clipped) for _, s, _ in results)


@pytest.mark.parametrize("config", [
    {},
    {"max_norm": None},
    {"max_norm": None, "clip_option": "mean"},
    {"max_norm": None, "mode": "percentile", "z_thresh": 2.0},
    {"max_norm": 5.0, "alpha": 0.9, "warmup_steps": 5, "clip_factor": 0.7},
    {"max_norm": None, "skip_update_on_spike": True, "warmup_steps": 10},
    {"max_norm": None, "eps": 0.0, "z_thresh": 1.5, "warmup_steps": 1},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_zclip_matches_the_reference(config):
  norms = norm_sequence(seed=2)
  want = reference.zclip(norms, **config)
  results = _run(oc.zclip(**config), norms)
  spikes = 0
  for i, ((out, state, _), (cap, spike, mean, var), n) in enumerate(
      zip(results, want, norms)):
    assert bool(state.zclip_spike) == spike, i
    spikes += spike
    np.testing.assert_allclose(float(state.zclip_threshold), cap, rtol=1e-5,
                               atol=1e-6, err_msg=str(i))
    np.testing.assert_allclose(float(oc.global_norm(out)),
                               n * reference.clip_scale(n, cap), rtol=2e-5,
                               atol=1e-6, err_msg=str(i))
    if mean is not None:
      np.testing.assert_allclose(float(state.zclip_mean), mean, rtol=1e-5)
      # The state keeps the EMA variance's root; the reference its square.
      np.testing.assert_allclose(float(state.zclip_std), math.sqrt(var),
                                 rtol=1e-5)
  assert spikes > 0  # the sequence does exercise the spike branch


def test_non_finite_norms_are_loud_and_do_not_poison_the_statistics():
  norms = [1.0, 1.1, 0.9, float("nan"), 1.0, float("inf"), 1.05]
  for tx, field in ((oc.autoclip(50.0), "autoclip_count"),
                    (oc.zclip(warmup_steps=2, max_norm=None), "zclip_count")):
    results = _run(tx, norms)
    for (out, state, _), n in zip(results, norms):
      finite = math.isfinite(n)
      assert all(np.isfinite(np.asarray(x)).all() == finite
                 for x in jax.tree.leaves(out))
    assert int(getattr(results[-1][1], field)) == 5
  want = reference.zclip(norms, warmup_steps=2, max_norm=None)
  np.testing.assert_allclose(float(results[-1][1].zclip_mean), want[-1][2],
                             rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: oc.autoclip(30.0, history_size=7),
                                  lambda: oc.zclip(warmup_steps=3)])
def test_state_round_trips_through_numpy_and_clip_stats(make):
  tx = make()
  direction = _direction()
  state = tx.init(direction)
  step = jax.jit(tx.update)
  for n in norm_sequence()[:20]:
    _, state = step(_tree_with_norm(direction, n), state)
  leaves, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  grads = _tree_with_norm(direction, 3.0)
  chex.assert_trees_all_equal(step(grads, restored), step(grads, state))
  stats = oc.clip_stats(state, include_history=True)
  prefix = "autoclip" if "autoclip_count" in state._fields else "zclip"
  for field in state._fields:
    assert f"{prefix}/{field}" in stats


def test_scheduled_hyperparameters_under_inject_hyperparams():
  norms = norm_sequence()[:60]
  tx = optax.inject_hyperparams(oc.autoclip)(
      percentile=optax.constant_schedule(25.0))
  want = reference.autoclip(norms, 25.0, 1000)
  got = [float(s.inner_state.autoclip_threshold) for _, s, _ in _run(tx, norms)]
  np.testing.assert_allclose(got, [c for c, _ in want], rtol=1e-5, atol=1e-6)
  tx = optax.inject_hyperparams(oc.zclip)(z_thresh=optax.constant_schedule(2.0))
  want = reference.zclip(norms, z_thresh=2.0)
  got = [float(s.inner_state.zclip_threshold) for _, s, _ in _run(tx, norms)]
  np.testing.assert_allclose(got, [c for c, *_ in want], rtol=1e-5, atol=1e-6)


def test_grad_through_update_is_finite():
  for tx in (oc.autoclip(10.0), oc.zclip(warmup_steps=1, max_norm=None)):
    def loss(g, tx=tx):
      state = tx.init(g)
      out, state = tx.update(g, state)
      out, _ = tx.update(jax.tree.map(lambda x: 3 * x, g), state)
      return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))
    for g in (jax.tree.map(jnp.zeros_like, _direction()), _direction()):
      for d in jax.tree.leaves(jax.jit(jax.grad(loss))(g)):
        assert np.isfinite(np.asarray(d)).all()


@pytest.mark.parametrize("call,message", [
    (lambda: oc.autoclip(150), r"^autoclip: percentile must be in \[0, 100\], got 150"),
    (lambda: oc.autoclip(-1.0), r"^autoclip: percentile must be in \[0, 100\], got -1.0"),
    (lambda: oc.autoclip(10.0, history_size=0), r"^autoclip: history_size must be an int >= 1, got 0"),
    (lambda: oc.zclip(alpha=1.0), r"^zclip: alpha must be in \(0, 1\), got 1.0"),
    (lambda: oc.zclip(alpha=0), r"^zclip: alpha must be in \(0, 1\), got 0"),
    (lambda: oc.zclip(z_thresh=0.0), r"^zclip: z_thresh must be in \(0, inf\], got 0.0"),
    (lambda: oc.zclip(max_norm=-1.0), r"^zclip: max_norm must be a non-negative"),
    (lambda: oc.zclip(warmup_steps=0), r"^zclip: warmup_steps must be an int >= 1, got 0"),
    (lambda: oc.zclip(mode="z"), r"^zclip: mode must be one of 'zscore', 'percentile', got 'z'"),
    (lambda: oc.zclip(clip_option="max"), r"^zclip: clip_option must be one of 'adaptive_scaling', 'mean', got 'max'"),
    (lambda: oc.zclip(eps=-1e-6), r"^zclip: eps must be a non-negative"),
])
def test_bad_arguments(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize("make, fields", [
    (lambda f: oc.autoclip(10.0, history_size=64),
     ("autoclip_threshold", "autoclip_clipped")),
    (lambda f: oc.zclip(max_norm=None, warmup_steps=10, eps=1e-6 * f),
     ("zclip_threshold", "zclip_spike")),
    (lambda f: oc.zclip(max_norm=None, warmup_steps=10, eps=1e-6 * f,
                        clip_option="mean"),
     ("zclip_threshold", "zclip_spike")),
    (lambda f: oc.zclip(max_norm=None, warmup_steps=10, mode="percentile"),
     ("zclip_threshold", "zclip_spike")),
], ids=["autoclip", "zclip", "zclip-mean", "zclip-percentile"])
@pytest.mark.parametrize("power", [70, 100, -100])
def test_statistics_of_huge_norms_scale_exactly(make, fields, power):
  """Norms times a power of two give the same decisions and thresholds
  times that power (the norm kernel already gets such norms right): 2**70
  (~1.2e21) and 2**100 (~1.3e30) have squares beyond float32's range,
  2**-100 (~7.9e-31) squares below it. zclip's eps is an absolute term, so
  it is scaled with the norms."""
  factor = 2.0 ** power
  norms = norm_sequence(seed=2)
  small = _run(make(1.0), norms)
  huge = _run(make(factor), norms * factor)
  threshold, flag = fields
  for i, ((_, a, _), (_, b, _)) in enumerate(zip(small, huge)):
    assert bool(getattr(a, flag)) == bool(getattr(b, flag)), i
    np.testing.assert_allclose(float(getattr(b, threshold)) / factor,
                               float(getattr(a, threshold)), rtol=1e-5,
                               err_msg=str(i))


@pytest.mark.parametrize("config", [
    {"max_norm": None},
    {"max_norm": None, "clip_option": "mean"},
    {"max_norm": None, "mode": "percentile"},
    {"max_norm": None, "eps": 0.0},
], ids=["zscore", "mean", "percentile", "eps0"])
@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30, 1e36])
def test_zclip_flags_a_spike_at_any_norm_float32_holds(config, scale,
                                                       use_jit):
  """Regression: the state once kept the EMA variance, inf in float32 once
  the norms' spread passed ~1.8e19 (at 1e20 a 100x spike was then neither
  flagged nor clipped) and 0 for norms near 1e-30 (with eps=0, spikes were
  clipped to the mean). Checked against the float64 reference; eps, an
  absolute term, is scaled with the norms unless the case sets it."""
  config = {"eps": 1e-6 * scale, **config}
  rng = np.random.default_rng(0)
  norms = list(scale * (1 + 0.3 * rng.standard_normal(12)))
  norms[10] = 100 * norms[9]
  want = reference.zclip(norms, warmup_steps=8, **config)
  direction = _direction()
  tx = oc.zclip(warmup_steps=8, **config)
  state = tx.init(direction)
  update = maybe_jit(tx.update, use_jit)
  for i, (n, (cap, spike, mean, var)) in enumerate(zip(norms, want)):
    out, state = update(_tree_with_norm(direction, n), state)
    assert bool(state.zclip_spike) == spike, i
    np.testing.assert_allclose(float(state.zclip_threshold), cap, rtol=1e-5,
                               err_msg=str(i))
    np.testing.assert_allclose(float(oc.global_norm(out)),
                               n * reference.clip_scale(n, cap), rtol=2e-5,
                               err_msg=str(i))
    if mean is not None:
      np.testing.assert_allclose(float(state.zclip_mean), mean, rtol=1e-5)
      np.testing.assert_allclose(float(state.zclip_std), math.sqrt(var),
                                 rtol=1e-5)
  assert want[10][1]  # the 100x spike is one


def test_zclip_std_update_has_a_finite_gradient_at_zero():
  """The EMA's square root goes through the norm kernel's safe_sqrt: a norm
  equal to the mean over a zero deviation takes the root of exactly 0."""
  tx = oc.zclip(warmup_steps=1, max_norm=None)
  state = tx.init({"g": jnp.zeros(1)})

  def std_after(std):
    stats = state._replace(zclip_mean=jnp.float32(1.0), zclip_std=std,
                           zclip_count=jnp.int32(1))
    _, new = tx.update({"g": jnp.ones(1)}, stats)
    return new.zclip_std

  for fn in (jax.grad(std_after), jax.jit(jax.grad(std_after))):
    assert float(std_after(jnp.float32(0.0))) == 0.0
    assert np.isfinite(float(fn(jnp.float32(0.0))))


# --------------------------------------------------------------------------
# Edge inputs: float64 norms beyond float32's range under x64, counters at
# int32's maximum, zero gradients (never an absorbing state).
# --------------------------------------------------------------------------


INT32_MAX = int(np.iinfo(np.int32).max)


def _unit_direction(dtype=jnp.float32):
  """A two-leaf tree of global L2 norm 1."""
  rng = np.random.default_rng(1)
  tree = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal((3,))}
  total = math.sqrt(sum(float(np.sum(x**2)) for x in tree.values()))
  return {k: jnp.asarray(v / total, dtype) for k, v in tree.items()}


def _with_norm(direction, norm):
  return jax.tree.map(lambda d: d * jnp.asarray(norm, d.dtype), direction)


def _run_norms(tx, norms, use_jit, dtype=jnp.float32, state=None):
  """Steps ``tx`` over trees of the given global norms; (outputs, states)."""
  direction = _unit_direction(dtype)
  if state is None:
    state = tx.init(direction)
  update = maybe_jit(tx.update, use_jit)
  outs, states = [], []
  for n in norms:
    out, state = update(_with_norm(direction, n), state)
    outs.append(out)
    states.append(state)
  return outs, states


def _out_norm(out) -> float:
  return reference.norm([np.asarray(x) for x in jax.tree.leaves(out)])


def _check_zclip(outs, states, want, norms, rtol=1e-5):
  for i, (out, state, (cap, spike, mean, var), n) in enumerate(
    zip(outs, states, want, norms)
  ):
    assert bool(state.zclip_spike) == spike, i
    np.testing.assert_allclose(
      float(state.zclip_threshold), cap, rtol=rtol, atol=1e-12, err_msg=str(i)
    )
    np.testing.assert_allclose(
      _out_norm(out),
      n * reference.clip_scale(n, cap),
      rtol=rtol,
      atol=1e-12,
      err_msg=str(i),
    )
    if mean is not None:
      np.testing.assert_allclose(float(state.zclip_mean), mean, rtol=rtol)
      # The state keeps the EMA variance's root; the reference its square.
      np.testing.assert_allclose(
        float(state.zclip_std), math.sqrt(var), rtol=5 * rtol, atol=0
      )


# 1. Under x64, state follows the accumulation dtype of the params.


def test_autoclip_float64_norms_beyond_float32_range(use_jit):
  norms = [5e100, 1e100, 3e100, 2e101, 4e100]
  with enable_x64():
    tx = oc.autoclip(50.0, history_size=3)
    outs, states = _run_norms(tx, norms, use_jit, jnp.float64)
    want = reference.autoclip(norms, 50.0, 3)
    for out, state, (c, scale), n in zip(outs, states, want, norms):
      assert state.autoclip_history.dtype == jnp.float64
      assert state.autoclip_threshold.dtype == jnp.float64
      np.testing.assert_allclose(float(state.autoclip_norm), n, rtol=1e-13)
      np.testing.assert_allclose(float(state.autoclip_threshold), c, rtol=1e-13)
      np.testing.assert_allclose(_out_norm(out), n * scale, rtol=1e-13)
      chex.assert_trees_all_equal_dtypes(out, _unit_direction(jnp.float64))
    assert bool(states[3].autoclip_clipped)
    # float32 params under x64 keep a float32 state.
    assert oc.autoclip().init(_unit_direction()).autoclip_history.dtype == (
      jnp.float32
    )


@pytest.mark.parametrize(
  "config",
  [
    {"max_norm": None},
    {"max_norm": None, "mode": "percentile", "z_thresh": 1.0},
    {"max_norm": 1e102, "clip_option": "mean"},
  ],
  ids=["zscore", "percentile", "mean"],
)
def test_zclip_float64_norms_beyond_float32_range(config, use_jit):
  rng = np.random.default_rng(0)
  norms = list(1e100 * (1 + 0.1 * rng.standard_normal(12)))
  norms[8] = 9e100  # a spike
  with enable_x64():
    tx = oc.zclip(warmup_steps=4, **config)
    outs, states = _run_norms(tx, norms, use_jit, jnp.float64)
    for field in states[-1]._fields:
      value = getattr(states[-1], field)
      if jnp.issubdtype(value.dtype, jnp.floating):
        assert value.dtype == jnp.float64, field
    want = reference.zclip(norms, warmup_steps=4, **config)
    _check_zclip(outs, states, want, norms, rtol=1e-12)
    assert any(bool(s.zclip_spike) for s in states)
    assert oc.zclip().init(_unit_direction()).zclip_mean.dtype == jnp.float32


# 2. Counters saturate instead of wrapping.


def test_autoclip_count_saturates_and_history_keeps_rolling(use_jit):
  size = 4
  tx = oc.autoclip(25.0, history_size=size)
  first = [1.0, 2.0, 3.0, 4.0, 5.0]
  _, states = _run_norms(tx, first, use_jit)
  state = states[-1]._replace(
    autoclip_count=jnp.asarray(INT32_MAX - 1, jnp.int32)
  )
  later = [0.5, 7.0, 0.25, 6.0, 9.0]
  outs, states = _run_norms(tx, later, use_jit, state=state)
  assert [int(s.autoclip_count) for s in states] == [INT32_MAX] * len(later)
  want = reference.autoclip(first + later, 25.0, size)[len(first) :]
  for out, s, (c, scale), n in zip(outs, states, want, later):
    assert math.isfinite(float(s.autoclip_threshold))
    np.testing.assert_allclose(float(s.autoclip_threshold), c, rtol=1e-6)
    np.testing.assert_allclose(_out_norm(out), n * scale, rtol=1e-6)
  # The history is the last `size` norms, in order.
  np.testing.assert_allclose(states[-1].autoclip_history, later[-size:])


def test_zclip_count_saturates_and_never_reenters_warmup(use_jit):
  config = dict(warmup_steps=3, max_norm=None)
  tx = oc.zclip(**config)
  first = [1.0, 1.2, 0.8, 1.1, 0.9]
  _, states = _run_norms(tx, first, use_jit)
  state = states[-1]._replace(zclip_count=jnp.asarray(INT32_MAX - 1, jnp.int32))
  later = [1.0, 20.0, 1.05, 30.0]
  outs, states = _run_norms(tx, later, use_jit, state=state)
  assert [int(s.zclip_count) for s in states] == [INT32_MAX] * len(later)
  want = reference.zclip(first + later, **config)[len(first) :]
  _check_zclip(outs, states, want, later)
  assert bool(states[1].zclip_spike) and bool(states[3].zclip_spike)
  assert float(_out_norm(outs[1])) < 2.0


# 3. Zero is not an absorbing state.


@pytest.mark.parametrize(
  "config",
  [
    {"max_norm": None},
    {"max_norm": None, "clip_option": "mean"},
    {"max_norm": None, "mode": "percentile"},
    {},  # the default fixed cap of 1
    {"max_norm": None, "skip_update_on_spike": True},
  ],
  ids=["zscore", "mean", "percentile", "max_norm", "skip"],
)
def test_zclip_all_zero_warmup_does_not_zero_later_updates(config, use_jit):
  norms = [0.0] * 6 + [0.5, 0.6, 0.4, 0.55, 0.45, 0.5, 0.52, 5.0, 0.5]
  tx = oc.zclip(warmup_steps=3, **config)
  outs, states = _run_norms(tx, norms, use_jit)
  want = reference.zclip(norms, warmup_steps=3, **config)
  _check_zclip(outs, states, want, norms)
  # Warmup ends after three nonzero norms; later updates are not zeroed.
  assert int(states[5].zclip_count) == 0 and int(states[-1].zclip_count) == 9
  for out, n in zip(outs[6:], norms[6:]):
    if n < 1.0:
      np.testing.assert_allclose(_out_norm(out), n, rtol=1e-6)
  assert bool(states[-2].zclip_spike) and _out_norm(outs[-2]) > 0.4


def test_zclip_long_zero_run_after_warmup_does_not_absorb():
  """Thousands of zero steps after warmup (a frozen group) leave the EMA."""
  tx = oc.zclip(warmup_steps=5, max_norm=None)
  direction = _unit_direction()

  def step(state, norm):
    out, state = tx.update(_with_norm(direction, norm), state)
    return state, (oc.global_norm(out), state.zclip_mean)

  norms = jnp.concatenate(
    [
      jnp.asarray([1.0, 1.1, 0.9, 1.05, 0.95]),
      jnp.zeros(5000),
      jnp.asarray([1.0, 1.02, 0.98]),
    ]
  ).astype(jnp.float32)
  _, (out_norms, means) = jax.lax.scan(step, tx.init(direction), norms)
  np.testing.assert_allclose(out_norms[-3:], norms[-3:], rtol=1e-6)
  np.testing.assert_allclose(means[-4], 1.0, rtol=1e-6)  # unchanged by zeros


def test_zclip_recovers_from_a_state_with_zero_statistics(use_jit):
  """A state saved when zeros were fed (mean = var = 0) is not absorbing."""
  tx = oc.zclip(warmup_steps=2, max_norm=None)
  state = tx.init(_unit_direction())._replace(zclip_count=jnp.asarray(2, jnp.int32))
  outs, states = _run_norms(tx, [0.7, 0.8, 0.75], use_jit, state=state)
  np.testing.assert_allclose(_out_norm(outs[0]), 0.7, rtol=1e-6)
  assert not bool(states[0].zclip_spike)
  assert float(states[-1].zclip_mean) > 0
  assert all(_out_norm(o) > 0.1 for o in outs)


def test_zclip_zero_spike_threshold_is_not_fed_to_the_statistics(use_jit):
  norms = [1.0, 1.1, 0.9] + [1.0, 9.0, 1.05, 12.0, 0.95, 15.0, 1.0]
  config = dict(warmup_steps=3, max_norm=None, clip_factor=0.0)
  outs, states = _run_norms(oc.zclip(**config), norms, use_jit)
  want = reference.zclip(norms, **config)
  _check_zclip(outs, states, want, norms)
  assert _out_norm(outs[4]) == 0.0  # clip_factor = 0 zeroes the spike ...
  assert float(states[-1].zclip_mean) > 0.9  # ... but not the statistics

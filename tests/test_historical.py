"""clip_by_historical_norm (Levanter's rule): references, state, policy."""

import math
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64, maybe_jit
from reference import historical_norm_reference

import optaxclip as oc

DATA = pathlib.Path(__file__).parent / "data" / "levanter_trajectories.npz"


def _tree(b, w):
  return {"b": jnp.asarray(b), "w": jnp.asarray(w)}


def _sequence(seed, steps=300, nonfinite=False):
  """(b, w) float32 leaves per step: drifting noise with spikes and dips."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    scale = math.exp(0.3 * rng.normal()) * (1 + t / 100)
    if rng.random() < 0.08:
      scale *= rng.uniform(3, 50)  # spike
    if t in (120, 121):
      scale = 0.0  # zero updates are ordinary observations
    g = (rng.normal(size=17) * scale).astype(np.float32)
    seq.append(g)
  if nonfinite:
    seq[40][3] = np.nan
    seq[41][0] = np.inf
    seq[200][16] = -np.inf
  return [(g[:5], g[5:].reshape(3, 4)) for g in seq]


def _run(tx, seq, use_jit=True):
  update = maybe_jit(tx.update, use_jit)
  state = tx.init(_tree(*seq[0]))
  outs, states = [], []
  for b, w in seq:
    out, state = update(_tree(b, w), state)
    outs.append(out)
    states.append(jax.tree.map(np.asarray, state))
  return outs, states


def _compare(outs, states, want, rtol=2e-5):
  for t, (out, state) in enumerate(zip(outs, states)):
    msg = f"step {t}"
    want_b, want_w = want["outputs"][t]
    np.testing.assert_allclose(
      out["b"], want_b, rtol=rtol, atol=1e-30, err_msg=msg
    )
    np.testing.assert_allclose(
      out["w"], want_w, rtol=rtol, atol=1e-30, err_msg=msg
    )
    np.testing.assert_allclose(
      state.historical_norm, want["norm"][t], rtol=rtol, err_msg=msg
    )
    np.testing.assert_allclose(
      state.historical_threshold, want["threshold"][t], rtol=rtol, err_msg=msg
    )
    threshold, norm = want["threshold"][t], want["norm"][t]
    if not (
      math.isfinite(threshold) and abs(norm - threshold) <= 1e-5 * threshold
    ):
      assert bool(state.historical_clipped) == want["clipped"][t], msg


CONFIGS = [
  pytest.param(dict(), id="levanter-defaults"),
  pytest.param(dict(window=8, sigmas=3.0), id="w8"),
  pytest.param(dict(window=5, sigmas=1.5), id="w5-odd"),
  pytest.param(dict(window=2, sigmas=0.0), id="w2-sigma0"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config, use_jit):
  # Eager dispatch is slow: fewer steps, still past the activation point.
  seq = _sequence(seed=1)[: 300 if use_jit else 100]
  outs, states = _run(oc.clip_by_historical_norm(**config), seq, use_jit)
  want = historical_norm_reference(
    [[b, w] for b, w in seq],
    config.get("window", 128),
    config.get("sigmas", 3.0),
  )
  _compare(outs, states, want)
  clipped = sum(bool(s.historical_clipped) for s in states)
  assert 0 < clipped < len(seq) - 5  # both branches exercised


def test_hand_computed_steps():
  tx = oc.clip_by_historical_norm(window=4, sigmas=3.0)
  state = tx.init({"u": jnp.zeros(1)})
  got = []
  for norm in (1.0, 3.0, 10.0, 2.0, 30.0):
    u, state = tx.update({"u": jnp.array([norm])}, state)
    got.append((float(u["u"][0]), float(state.historical_threshold)))
  # Steps 1-2: fewer than max(2, 4 // 2) = 2 norms held, no clipping.
  assert got[0] == (1.0, math.inf) and got[1] == (3.0, math.inf)
  # Step 3: {1, 3}: mean 2, population std 1, threshold 2 + 3 = 5.
  assert got[2] == (5.0, 5.0)
  # Step 4: the *unclipped* 10 is in the history: {1, 3, 10}, mean 14/3,
  # std sqrt(134/9), threshold 14/3 + 3 sqrt(134/9) = 16.2425...
  want = 14 / 3 + 3 * math.sqrt(134 / 9)
  np.testing.assert_allclose(got[3][1], want, rtol=1e-6)
  assert got[3][0] == 2.0
  # Step 5: {1, 3, 10, 2}: mean 4, std sqrt(50 / 4), threshold 14.6066...
  want = 4 + 3 * math.sqrt(12.5)
  np.testing.assert_allclose(got[4], (want, want), rtol=1e-6)
  # The window is full: the next norm replaces the oldest (1).
  np.testing.assert_allclose(
    np.sort(state.historical_norms), [2.0, 3.0, 10.0, 30.0]
  )


@pytest.mark.parametrize("window,needed", [(2, 2), (3, 2), (10, 5), (11, 5)])
def test_active_after_max_2_half_window(window, needed):
  tx = oc.clip_by_historical_norm(window=window)
  state = tx.init({"u": jnp.zeros(1)})
  for step in range(needed + 1):
    _, state = tx.update({"u": jnp.array([1.0 + step % 2])}, state)
    active = bool(np.isfinite(state.historical_threshold))
    assert active == (step == needed), (step, active)


def test_flat_history_uses_the_std_floor():
  tx = oc.clip_by_historical_norm(window=4, sigmas=3.0)
  state = tx.init({"u": jnp.zeros(1)})
  for _ in range(3):
    _, state = tx.update({"u": jnp.array([2.0])}, state)
  u, state = tx.update({"u": jnp.array([3.0])}, state)
  # std 0 -> 1e-6: threshold 2 + 3e-6.
  np.testing.assert_allclose(state.historical_threshold, 2.0 + 3e-6, rtol=1e-7)
  np.testing.assert_allclose(u["u"], [2.0 + 3e-6], rtol=1e-7)


def test_nonfinite_steps_are_nan_and_not_recorded(use_jit):
  seq = _sequence(seed=2, nonfinite=True)[: 300 if use_jit else 60]
  tx = oc.clip_by_historical_norm(window=16)
  outs, states = _run(tx, seq, use_jit)
  want = historical_norm_reference([[b, w] for b, w in seq], 16, 3.0)
  _compare(outs, states, want)
  for t in (40, 41, 200)[: 3 if use_jit else 2]:
    assert all(np.isnan(np.asarray(x)).all() for x in outs[t].values()), t
    assert not np.isfinite(states[t].historical_norm)
    assert states[t].historical_count == states[t - 1].historical_count
    np.testing.assert_array_equal(
      states[t].historical_norms, states[t - 1].historical_norms
    )
  assert np.isfinite(np.asarray(outs[-1]["w"])).all()


def test_levanter_placement_in_a_chain():
  """After Adam and weight decay, before the learning-rate scale."""
  tx = optax.chain(
    optax.scale_by_adam(b1=0.9, b2=0.95),
    optax.add_decayed_weights(0.1),
    oc.clip_by_historical_norm(window=4),
    optax.scale(-1e-3),
  )
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with jax.numpy_dtype_promotion("standard"):
    for step in range(4):
      grads = {"w": jnp.full(3, 1.0 + 100.0 * (step == 3))}
      _, state = jax.jit(tx.update)(grads, state, params)
  stats = oc.clip_stats(state)
  assert int(stats["clip_by_historical_norm/historical_count"]) == 4
  assert np.isfinite(stats["clip_by_historical_norm/historical_threshold"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_statistics_in_float32(dtype, use_jit):
  seq = _sequence(seed=3, steps=40)
  low = [(b.astype(dtype), w.astype(dtype)) for b, w in seq]
  tx = oc.clip_by_historical_norm(window=8)
  outs, states = _run(tx, low, use_jit)
  assert states[-1].historical_norms.dtype == np.float32
  assert states[-1].historical_threshold.dtype == np.float32
  assert all(o["w"].dtype == dtype and o["w"].shape == (3, 4) for o in outs)
  want = historical_norm_reference(
    [[np.asarray(b, np.float32), np.asarray(w, np.float32)] for b, w in low],
    8,
    3.0,
  )
  np.testing.assert_allclose(
    [s.historical_threshold for s in states], want["threshold"], rtol=2e-5
  )


def test_float64_tree_keeps_float64_statistics():
  with enable_x64():
    tx = oc.clip_by_historical_norm(window=4)
    state = tx.init({"u": jnp.zeros(2, jnp.float64)})
    for norm in (1e200, 3e200, 1e201):
      u, state = tx.update({"u": jnp.array([norm, 0.0])}, state)
    assert state.historical_threshold.dtype == jnp.float64
    np.testing.assert_allclose(state.historical_threshold, 5e200, rtol=1e-12)
    np.testing.assert_allclose(u["u"], [5e200, 0.0], rtol=1e-12)


def test_grad_is_finite_at_zeros():
  tx = oc.clip_by_historical_norm(window=2, sigmas=0.0)
  state = tx.init({"u": jnp.zeros(3)})
  for _ in range(2):
    _, state = tx.update({"u": jnp.zeros(3)}, state)

  def loss(u):
    out, _ = tx.update({"u": u}, state)
    return jnp.sum(out["u"])

  for u in (jnp.zeros(3), jnp.array([1.0, -2.0, 3.0])):
    grad = jax.grad(loss)(u)
    assert np.isfinite(np.asarray(grad)).all()


def test_state_after_pickle_and_numpy_round_trip():
  seq = _sequence(seed=4, steps=12)
  tx = oc.clip_by_historical_norm(window=4)
  _, states = _run(tx, seq[:6], use_jit=False)
  restored = pickle.loads(pickle.dumps(jax.tree.map(np.asarray, states[-1])))
  assert isinstance(restored.historical_norms, np.ndarray)
  out_eager, s_eager = tx.update(_tree(*seq[6]), restored)
  out_jit, s_jit = jax.jit(tx.update)(_tree(*seq[6]), restored)
  np.testing.assert_array_equal(out_eager["w"], out_jit["w"])
  np.testing.assert_array_equal(
    s_eager.historical_norms, s_jit.historical_norms
  )


def test_clip_stats_keys():
  tx = oc.clip_by_historical_norm(window=4)
  state = tx.init({"u": jnp.zeros(1)})
  _, state = tx.update({"u": jnp.ones(1)}, state)
  stats = oc.clip_stats(state)
  assert set(stats) == {
    f"clip_by_historical_norm/{f}"
    for f in (
      "historical_count",
      "historical_index",
      "historical_norm",
      "historical_threshold",
      "historical_clipped",
    )
  }
  full = oc.clip_stats(state, include_history=True)
  assert "clip_by_historical_norm/historical_norms" in full


def test_inject_hyperparams_sigmas_schedule_compiles_once():
  schedule = optax.linear_schedule(3.0, 1.0, 10)
  tx = optax.inject_hyperparams(oc.clip_by_historical_norm)(sigmas=schedule)
  state = tx.init({"u": jnp.zeros(2)})
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return tx.update(g, s)

  with jax.numpy_dtype_promotion("standard"):
    for t in range(6):
      _, state = step({"u": jnp.array([1.0 + t % 2, 0.0])}, state)
  assert len(traces) == 1
  assert float(oc.clip_stats(state)["clip_by_historical_norm/sigmas"]) < 3.0


def test_traced_window_asks_for_static_args():
  with pytest.raises(TypeError, match=r"static_args=\('window',\)"):
    tx = optax.inject_hyperparams(oc.clip_by_historical_norm)(window=8)
    tx.init({"u": jnp.zeros(1)})
  tx = optax.inject_hyperparams(
    oc.clip_by_historical_norm, static_args=("window",)
  )(window=8)
  assert tx.init({"u": jnp.zeros(1)}).inner_state.historical_norms.shape == (8,)


@pytest.mark.parametrize(
  "kwargs,error,pattern",
  [
    (dict(window=1), ValueError, "window must be an int >= 2, got 1"),
    (dict(window=0), ValueError, "window must be an int >= 2"),
    (dict(window=2.5), TypeError, "window must be an int"),
    (dict(window=True), TypeError, "window must be an int"),
    (dict(sigmas=-1.0), ValueError, "sigmas must be a non-negative"),
    (dict(sigmas=float("nan")), ValueError, "sigmas must be"),
    (dict(sigmas=[1.0, 2.0]), ValueError, "sigmas must be a scalar"),
    (dict(sigmas="3"), TypeError, "sigmas must be a real number"),
  ],
)
def test_validation_at_construction(kwargs, error, pattern):
  with pytest.raises(error, match="clip_by_historical_norm: " + pattern):
    oc.clip_by_historical_norm(**kwargs)


def test_update_policies():
  tx = oc.clip_by_historical_norm()
  with pytest.raises(ValueError, match="state=None"):
    tx.update({"u": jnp.ones(1)}, None)
  state = tx.init({"u": jnp.ones(1)})
  with pytest.raises(TypeError, match="'u'"):
    tx.update({"u": jnp.ones(1, jnp.int32)}, state)


def test_matches_levanters_recorded_trajectory(use_jit):
  """Levanter's own transform (tests/data/make_levanter_trajectories.py)."""
  data = np.load(DATA)
  for name in ("default", "w8") if use_jit else ("w8",):
    window, sigmas = int(data[f"{name}_config"][0]), data[f"{name}_config"][1]
    seq = list(zip(data[f"{name}_b"], data[f"{name}_w"]))
    outs, states = _run(
      oc.clip_by_historical_norm(window, float(sigmas)), seq, use_jit
    )
    for t, (out, state) in enumerate(zip(outs, states)):
      msg = f"{name} step {t}"
      np.testing.assert_allclose(
        out["b"], data[f"{name}_out_b"][t], rtol=2e-6, err_msg=msg
      )
      np.testing.assert_allclose(
        out["w"], data[f"{name}_out_w"][t], rtol=2e-6, err_msg=msg
      )
      np.testing.assert_allclose(
        state.historical_norm, data[f"{name}_norm"][t], rtol=2e-6, err_msg=msg
      )
    clipped = [bool(s.historical_clipped) for s in states]
    np.testing.assert_array_equal(clipped, data[f"{name}_did_clip"])


def test_levanter_nan_deviation_is_what_the_recording_shows():
  """Levanter records a NaN norm: its threshold is NaN (no clipping) until
  the NaN leaves the window. Here the NaN step is all NaN, is not recorded,
  and clipping stays active; before the NaN both agree."""
  data = np.load(DATA)
  seq = list(zip(data["nan_b"], data["nan_w"]))
  outs, states = _run(oc.clip_by_historical_norm(8, 3.0), seq)
  assert np.isnan(data["nan_threshold"][31:39]).all()
  assert not data["nan_did_clip"][31:39].any()
  for t in range(30):
    np.testing.assert_allclose(outs[t]["w"], data["nan_out_w"][t], rtol=2e-6)
  assert np.isnan(np.asarray(outs[30]["b"])).all()
  assert np.isfinite(np.asarray(data["nan_out_b"][30][:3])).all()
  assert all(np.isfinite(s.historical_threshold) for s in states[31:])

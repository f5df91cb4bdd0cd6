"""skip_and_clip_by_global_norm (axlearn's drop-norm rule): references,
axlearn's recorded run, state and policy."""

import math
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import maybe_jit
from reference import skip_and_clip_reference

import optaxclip as oc

DATA = pathlib.Path(__file__).parent / "data" / "axlearn_trajectories.npz"
FN = "skip_and_clip_by_global_norm"


def _tree(b, w):
  return {"b": jnp.asarray(b), "w": jnp.asarray(w)}


def _sequence(seed, steps=160):
  """(b, w) float32 leaves: drifting noise, spikes, a NaN and an inf step."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    scale = math.exp(0.2 * rng.normal()) * (1 + t / 80)
    if rng.random() < 0.1:
      scale *= rng.uniform(3, 300)
    seq.append((rng.normal(size=17) * scale).astype(np.float32))
  if steps > 51:
    seq[50][3] = np.nan
    seq[51][0] = np.inf
  return [(g[:5], g[5:].reshape(3, 4)) for g in seq]


def _run(tx, seq, use_jit=True, params=None):
  update = maybe_jit(tx.update, use_jit)
  state = tx.init(_tree(*seq[0]) if params is None else params)
  outs, states = [], []
  for b, w in seq:
    out, state = update(_tree(b, w), state, params)
    outs.append(out)
    states.append(jax.tree.map(np.asarray, state))
  return outs, states


CONFIGS = [
  pytest.param(
    dict(drop_norm="mean", grad_norm_ema_decay=0.9, max_norm=2.0),
    dict(drop_norm="mean", multipliers=(20, 40, 100), decay=0.9, max_norm=2.0),
    id="mean-defaults",
  ),
  pytest.param(
    dict(
      drop_norm="mean",
      grad_norm_ema_decay=0.8,
      drop_multipliers=(3, 10),
      max_norm=2.0,
    ),
    dict(drop_norm="mean", multipliers=(3, 10), decay=0.8, max_norm=2.0),
    id="mean-3-10",
  ),
  pytest.param(
    dict(
      drop_norm="stddev",
      grad_norm_ema_decay=0.95,
      drop_min_count=20,
      drop_multipliers=(3, 6),
    ),
    dict(drop_norm="stddev", multipliers=(3, 6), min_count=20, decay=0.95),
    id="stddev",
  ),
  pytest.param(
    dict(drop_norm=8.0, max_norm=1.5),
    dict(drop_norm=8.0, max_norm=1.5),
    id="fixed",
  ),
  pytest.param(dict(max_norm=1.0), dict(max_norm=1.0), id="clip-only"),
]


@pytest.mark.parametrize("config,want_config", CONFIGS)
def test_matches_reference(config, want_config, use_jit):
  seq = _sequence(seed=1)[: 160 if use_jit else 60]
  tx = oc.skip_and_clip_by_global_norm(optax.identity(), **config)
  outs, states = _run(tx, seq, use_jit)
  want = skip_and_clip_reference([[b, w] for b, w in seq], **want_config)
  for t, (out, state) in enumerate(zip(outs, states)):
    msg = f"step {t}"
    want_b, want_w = want["outputs"][t]
    np.testing.assert_allclose(out["b"], want_b, rtol=2e-5, err_msg=msg)
    np.testing.assert_allclose(out["w"], want_w, rtol=2e-5, err_msg=msg)
    assert bool(state.drop_skipped) == (not want["valid"][t]), msg
    assert int(state.drop_count) == want["count"][t], msg
    assert int(state.drop_num_nonvalid) == want["nonvalid"][t], msg
    if "decay" in want_config:
      np.testing.assert_allclose(
        state.drop_norm_ema, want["ema"][t], rtol=2e-5, err_msg=msg
      )
      np.testing.assert_allclose(
        state.drop_norm_square_ema,
        want["square_ema"][t],
        rtol=5e-5,
        err_msg=msg,
      )
    for key, limit in want["thresholds"][t].items():
      np.testing.assert_allclose(
        state.drop_thresholds[key], limit, rtol=5e-5, err_msg=msg
      )
    for key, count in want["exceeds"][t].items():
      assert int(state.drop_exceed_counts[f"count_exceeds_{key}"]) == count
  dropped = sum(bool(s.drop_skipped) for s in states)
  assert 2 <= dropped < len(seq) - 2


def test_matches_axlearns_recorded_run(standard_promotion):
  """axlearn's own code around optax.adam
  (tests/data/make_axlearn_trajectories.py), step for step."""
  data = np.load(DATA)
  cases = {
    "mean": dict(
      drop_norm="mean",
      grad_norm_ema_decay=0.9,
      drop_multipliers=(3, 10),
      max_norm=2.0,
    ),
    "stddev": dict(
      drop_norm="stddev",
      grad_norm_ema_decay=0.95,
      drop_min_count=20,
      drop_multipliers=(3, 6),
    ),
    "fixed": dict(drop_norm=8.0, max_norm=1.5),
  }
  params = {"b": jnp.zeros(5), "w": jnp.zeros((3, 4))}
  for name, config in cases.items():
    tx = oc.skip_and_clip_by_global_norm(optax.adam(0.01), **config)
    seq = list(zip(data[f"{name}_b"], data[f"{name}_w"]))
    outs, states = _run(tx, seq, params=params)
    exceeds = [k for k in data if k.startswith(f"{name}_exceeds_")]
    for t, (out, state) in enumerate(zip(outs, states)):
      msg = f"{name} step {t}"
      for leaf in ("b", "w"):
        np.testing.assert_allclose(
          out[leaf],
          data[f"{name}_out_{leaf}"][t],
          rtol=1e-4,
          atol=1e-7,
          err_msg=msg,
        )
      assert state.drop_num_nonvalid == data[f"{name}_nonvalid_count"][t]
      if f"{name}_count" in data:
        assert state.drop_count == data[f"{name}_count"][t], msg
        np.testing.assert_allclose(
          state.drop_norm_ema, data[f"{name}_ema"][t], rtol=1e-5
        )
        np.testing.assert_allclose(
          state.drop_norm_square_ema, data[f"{name}_square_ema"][t], rtol=1e-5
        )
      for key in exceeds:
        ours = key.replace(f"{name}_exceeds_", "count_exceeds_")
        assert state.drop_exceed_counts[ours] == data[key][t], (msg, key)
    assert 5 < int(states[-1].drop_num_nonvalid) < len(seq) - 5


def test_hand_computed_bias_corrected_ema():
  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(), drop_norm="mean", grad_norm_ema_decay=0.9
  )
  state = tx.init({"g": jnp.zeros(1)})
  # EMAs start at 1: the first threshold is 20 x 1.
  assert float(state.drop_norm_ema) == 1.0
  _, state = tx.update({"g": jnp.array([5.0])}, state)
  # Effective decay 0 on the first valid step: the EMA is the norm.
  assert float(state.drop_norm_ema) == 5.0
  assert float(state.drop_norm_square_ema) == 25.0
  _, state = tx.update({"g": jnp.array([10.0])}, state)
  # Then decay (1 - 0.9) / (1 - 0.81) * 0.9 = 0.9 / 1.9.
  np.testing.assert_allclose(
    state.drop_norm_ema, (0.9 * 5 + 10) / 1.9, rtol=1e-6
  )
  np.testing.assert_allclose(
    state.drop_norm_square_ema, (0.9 * 25 + 100) / 1.9, rtol=1e-6
  )
  np.testing.assert_allclose(state.drop_thresholds["20x_mean"], 20 * 5.0)
  # 200 >= 20 x 7.63: dropped; the EMAs and the count do not move.
  before = state
  _, state = tx.update({"g": jnp.array([200.0])}, state)
  assert bool(state.drop_skipped) and int(state.drop_count) == 2
  assert float(state.drop_norm_ema) == float(before.drop_norm_ema)
  assert int(state.drop_exceed_counts["count_exceeds_20x_mean"]) == 1
  assert int(state.drop_exceed_counts["count_exceeds_100x_mean"]) == 0


def test_first_norms_at_or_above_20_are_dropped_forever():
  """axlearn's rule as written: the EMAs start at 1, so a run whose norms
  are all >= 20 never has a valid step (documented, not changed)."""
  tx = oc.skip_and_clip_by_global_norm(
    optax.sgd(1.0), drop_norm="mean", grad_norm_ema_decay=0.99
  )
  state = tx.init({"g": jnp.zeros(1)})
  for _ in range(5):
    u, state = tx.update({"g": jnp.array([20.0])}, state)
  assert int(state.drop_num_nonvalid) == 5 and int(state.drop_count) == 0
  assert float(u["g"][0]) == 0.0


def test_near_constant_norms_never_deadlock_the_stddev_rule(use_jit):
  """Norms that vary by 1e-5: axlearn's sqrt(square_ema - ema**2) is then
  float32 rounding noise, negative about half the time (NaN: every later
  step drops). The variance kept by its own recursion stays accurate."""
  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(),
    drop_norm="stddev",
    grad_norm_ema_decay=0.9,
    drop_min_count=3,
  )
  rng = np.random.default_rng(0)
  base = np.array([0.1, 0.2, 0.3], np.float32)
  state = tx.init({"g": jnp.asarray(base)})
  update = maybe_jit(tx.update, use_jit)
  norms = []
  for _ in range(40):
    g = base * np.float32(1 + 1e-5 * rng.standard_normal())
    norms.append(float(np.linalg.norm(g.astype(np.float64))))
    _, state = update({"g": jnp.asarray(g)}, state)
    assert np.isfinite(state.drop_thresholds["20x_stddev"])
  assert int(state.drop_num_nonvalid) == 0
  # The std of the weighted norms is about 1e-5 of the norm, as it should be.
  std = math.sqrt(float(state.drop_norm_variance))
  assert 1e-7 < std / norms[-1] < 1e-4
  want = skip_and_clip_reference(
    [[np.full(1, n)] for n in norms],
    drop_norm="stddev",
    multipliers=(20,),
    min_count=3,
    decay=0.9,
  )
  np.testing.assert_allclose(
    state.drop_norm_variance,
    want["square_ema"][-1] - want["ema"][-1] ** 2,
    rtol=1e-2,
  )


def test_exactly_constant_norms_drop_under_the_stddev_rule():
  """The rule as written: std 0, so `norm < mean + k * 0` fails."""
  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(),
    drop_norm="stddev",
    grad_norm_ema_decay=0.9,
    drop_min_count=3,
  )
  g = {"g": jnp.array([0.1, 0.2, 0.3], jnp.float32)}
  state = tx.init(g)
  for _ in range(5):
    _, state = tx.update(g, state)
  assert int(state.drop_count) == 3 and int(state.drop_num_nonvalid) == 2
  assert float(state.drop_norm_variance) == 0.0


def test_nonfinite_steps_drop_and_keep_the_inner_state():
  tx = oc.skip_and_clip_by_global_norm(
    optax.sgd(0.1, momentum=0.9), drop_norm=100.0, max_norm=1.0
  )
  params = {"g": jnp.zeros(2)}
  state = tx.init(params)
  _, state = tx.update({"g": jnp.array([3.0, 4.0])}, state, params)
  inner_before = state.drop_inner_state
  for bad in (jnp.nan, jnp.inf):
    u, state = tx.update({"g": jnp.array([bad, 1.0])}, state, params)
    assert np.array_equal(np.asarray(u["g"]), [0.0, 0.0])
    jax.tree.map(
      np.testing.assert_array_equal, state.drop_inner_state, inner_before
    )
  assert int(state.drop_num_nonvalid) == 2
  assert int(state.drop_exceed_counts["count_exceeds_drop_norm"]) == 2


def test_callable_drop_norm_follows_axlearns_protocol():
  def thresholds(*, count, mean, stddev):
    del count, stddev
    return {"5x": mean * 5}

  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(), drop_norm=thresholds, grad_norm_ema_decay=0.5
  )
  state = tx.init({"g": jnp.zeros(1)})
  for norm, dropped in ((4.0, False), (30.0, True), (19.0, False)):
    _, state = tx.update({"g": jnp.array([norm])}, state)
    assert bool(state.drop_skipped) == dropped, norm
  stats = oc.clip_stats(state)
  assert int(stats[f"{FN}/count_exceeds_5x"]) == 1
  np.testing.assert_allclose(stats[f"{FN}/5x"], 20.0)


def test_bf16_statistics_in_float32(use_jit):
  seq = _sequence(seed=3, steps=30)
  low = [(b.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) for b, w in seq]
  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(), drop_norm="mean", grad_norm_ema_decay=0.9, max_norm=2.0
  )
  outs, states = _run(tx, low, use_jit)
  assert states[-1].drop_norm_ema.dtype == np.float32
  assert outs[0]["w"].dtype == jnp.bfloat16
  want = skip_and_clip_reference(
    [[np.asarray(b, np.float32), np.asarray(w, np.float32)] for b, w in low],
    drop_norm="mean",
    multipliers=(20, 40, 100),
    decay=0.9,
    max_norm=2.0,
  )
  np.testing.assert_allclose(
    [s.drop_norm_ema for s in states], want["ema"], rtol=2e-5
  )


def test_grad_is_finite_at_zeros():
  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(), drop_norm="mean", grad_norm_ema_decay=0.9, max_norm=1.0
  )
  state = tx.init({"g": jnp.zeros(3)})

  def loss(g):
    out, _ = tx.update({"g": g}, state)
    return jnp.sum(out["g"])

  for g in (jnp.zeros(3), jnp.array([3.0, -4.0, 12.0])):
    assert np.isfinite(np.asarray(jax.grad(loss)(g))).all()


def test_host_numpy_state_after_pickle():
  seq = _sequence(seed=4, steps=8)
  tx = oc.skip_and_clip_by_global_norm(
    optax.adam(0.1), drop_norm="mean", grad_norm_ema_decay=0.9, max_norm=1.0
  )
  params = {"b": jnp.zeros(5), "w": jnp.zeros((3, 4))}
  with jax.numpy_dtype_promotion("standard"):
    _, states = _run(tx, seq[:5], use_jit=False, params=params)
    restored = pickle.loads(pickle.dumps(jax.tree.map(np.asarray, states[-1])))
    out_eager, _ = tx.update(_tree(*seq[5]), restored, params)
    out_jit, _ = jax.jit(tx.update)(_tree(*seq[5]), restored, params)
  np.testing.assert_allclose(out_eager["w"], out_jit["w"], rtol=1e-5)


def test_clip_stats_keys():
  tx = oc.skip_and_clip_by_global_norm(
    optax.sgd(1.0),
    drop_norm="stddev",
    grad_norm_ema_decay=0.9,
    drop_multipliers=(3,),
    max_norm=1.0,
  )
  state = tx.init({"g": jnp.zeros(2)})
  _, state = tx.update({"g": jnp.array([3.0, 4.0])}, state)
  stats = oc.clip_stats(state)
  for key in (
    "drop_grad_norm",
    "drop_skipped",
    "drop_num_nonvalid",
    "drop_count",
    "drop_norm_ema",
    "drop_norm_square_ema",
    "drop_clip_scale",
    "3x_stddev",
    "count_exceeds_3x_stddev",
  ):
    assert f"{FN}/{key}" in stats, key
  np.testing.assert_allclose(stats[f"{FN}/drop_clip_scale"], 0.2)


def test_inject_hyperparams_max_norm_and_static_min_count():
  schedule = optax.linear_schedule(2.0, 0.5, 4)
  tx = optax.inject_hyperparams(oc.skip_and_clip_by_global_norm)(
    inner=optax.identity(),
    max_norm=schedule,
    drop_norm="mean",
    grad_norm_ema_decay=0.9,
  )
  state = tx.init({"g": jnp.zeros(2)})
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return tx.update(g, s)

  with jax.numpy_dtype_promotion("standard"):
    for _ in range(3):
      out, state = step({"g": jnp.array([3.0, 4.0])}, state)
  assert len(traces) == 1
  # The third step runs at schedule count 2: max_norm 1.25 on a norm of 5.
  np.testing.assert_allclose(out["g"], [0.75, 1.0], rtol=1e-6)
  with pytest.raises(TypeError, match=r"static_args=\('drop_min_count',\)"):
    optax.inject_hyperparams(oc.skip_and_clip_by_global_norm)(
      inner=optax.identity(),
      drop_norm="stddev",
      grad_norm_ema_decay=0.9,
      drop_min_count=5,
    ).init({"g": jnp.zeros(2)})


@pytest.mark.parametrize(
  "kwargs,error,pattern",
  [
    (dict(drop_norm="median"), ValueError, "drop_norm must be one of"),
    (dict(drop_norm="mean"), ValueError, ".*needs grad_norm_ema_decay"),
    (dict(drop_norm=-1.0), ValueError, "drop_norm must be a non-negative"),
    (dict(max_norm=float("nan")), ValueError, "max_norm must be"),
    (
      dict(grad_norm_ema_decay=1.0),
      ValueError,
      r"grad_norm_ema_decay must be in \[0, 1\)",
    ),
    (dict(drop_multipliers=()), ValueError, "drop_multipliers must be"),
    (dict(drop_multipliers=(3, -1)), ValueError, "drop_multipliers must"),
    (dict(drop_min_count=-1), ValueError, "drop_min_count must be an int"),
    (dict(drop_min_count=2.5), TypeError, "drop_min_count must be an int"),
  ],
)
def test_validation_at_construction(kwargs, error, pattern):
  with pytest.raises(error, match=f"{FN}: " + pattern):
    oc.skip_and_clip_by_global_norm(optax.sgd(1.0), **kwargs)


def test_inner_must_be_a_transformation():
  with pytest.raises(TypeError, match=f"{FN}: inner must be"):
    oc.skip_and_clip_by_global_norm(optax.adam)


def test_axlearns_recorded_nan_deadlock_does_not_happen_here():
  """The recording of axlearn's code on norms that vary by 1e-5: its
  variance turns NaN after the warm-up and it drops every later step."""
  data = np.load(DATA)
  assert int(data["jitter_count"][-1]) == 3
  assert int(data["jitter_nonvalid_count"][-1]) == 37
  tx = oc.skip_and_clip_by_global_norm(
    optax.identity(),
    drop_norm="stddev",
    grad_norm_ema_decay=0.9,
    drop_min_count=3,
  )
  seq = list(zip(data["jitter_b"], data["jitter_w"]))
  outs, states = _run(tx, seq)
  assert int(states[-1].drop_num_nonvalid) == 0
  for t in range(3):  # before axlearn's NaN both agree
    np.testing.assert_allclose(outs[t]["w"], data["jitter_out_w"][t])

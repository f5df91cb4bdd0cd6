"""adaclip and adagn (Stable-SPAM): float64 references, the authors' PyTorch
trajectories, state, jit, grad, dtypes, validation."""

import contextlib
import math
import os

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import enable_x64, maybe_jit, run_steps
from hypothesis import given
from hypothesis import strategies as st
from reference import adaclip_reference, adagn_reference

import optaxclip as oc

SHAPES = [(3, 4), (5,), (2, 2, 2)]
NUM_STEPS = 320
EAGER_STEPS = 30  # eager steps dispatch op by op: a shorter prefix suffices
DATA = os.path.join(
  os.path.dirname(__file__), "data", "stable_spam_trajectories.npz"
)


def _grad_sequence(seed, num_steps=NUM_STEPS, nonfinite=False):
  """Drifts, a plateau, spikes (whole tensor and single element), zero
  elements, zero tensors and an all-zero step, in float32."""
  rng = np.random.default_rng(seed)
  seq, plateau = [], None
  for t in range(num_steps):
    scales = [2.0 * math.exp(-t / 150), 0.1 * (1 + t / 100), 0.5]
    if 100 <= t < 130:
      if plateau is None:
        plateau = [rng.normal(size=s) * c for s, c in zip(SHAPES, scales)]
      step = [g.copy() for g in plateau]
    else:
      step = []
      for shape, c in zip(SHAPES, scales):
        g = rng.normal(size=shape) * c
        g[rng.random(shape) < 0.15] = 0.0
        if rng.random() < 0.04:
          g = g * 50.0
        if rng.random() < 0.06:
          g.reshape(-1)[rng.integers(g.size)] *= 1000.0
        if rng.random() < 0.03:
          g = np.zeros(shape)
        step.append(g)
    seq.append([g.astype(np.float32) for g in step])
  seq[0][1][...] = 0.0  # a tensor whose first step has no gradient
  seq[3][2][...] = 0.0
  seq[min(150, num_steps - 1)] = [np.zeros(s, np.float32) for s in SHAPES]
  if nonfinite:
    seq[5][0][1, 1] = np.nan
    seq[9][1][2] = np.inf
    seq[10][2][0, 0, 0] = -np.inf
    seq[11][2][1, 0, 1] = np.nan
  return seq


def _tree(leaves):
  # Keys sort in list order, so jax.tree.leaves order is the list's order.
  return {f"t{i}": jnp.asarray(x) for i, x in enumerate(leaves)}


def _run(tx, seq, use_jit, tree=_tree):
  if not use_jit:
    seq = seq[:EAGER_STEPS]
  return run_steps(tx, [tree(x) for x in seq], use_jit, leaves=True)


def _assert_outputs(outs, want, rtol, atol):
  for t, out in enumerate(outs):
    for i, (got, exp) in enumerate(zip(out, want["outputs"][t])):
      np.testing.assert_allclose(
        got, exp, rtol=rtol, atol=atol, err_msg=f"step {t + 1} leaf {i}"
      )


def _ambiguous(grads, threshold, per_tensor, rtol=1e-5):
  """Elements within rounding of the threshold: float32 and float64 may
  disagree on whether they are above it (a plateau puts the max on it)."""
  count = 0
  for i, g in enumerate(grads):
    th = threshold[i if per_tensor else 0]
    if math.isfinite(th):
      count += int(
        np.sum(np.abs(np.abs(g.astype(np.float64)) - th) <= rtol * th)
      )
  return count


def _compare_adaclip(
  outs, states, seq, want, per_tensor=True, rtol=2e-5, atol=1e-30
):
  _assert_outputs(outs, want, rtol, atol)
  for t, state in enumerate(states):
    msg = f"step {t + 1}"
    np.testing.assert_array_equal(
      np.asarray(state.adaclip_count).reshape(-1), want["count"][t], err_msg=msg
    )
    for field, key in (
      ("adaclip_max", "max"),
      ("adaclip_max_ema", "ema"),
      ("adaclip_threshold", "threshold"),
    ):
      np.testing.assert_allclose(
        np.asarray(getattr(state, field)).reshape(-1),
        want[key][t],
        rtol=rtol,
        atol=atol,
        err_msg=f"{msg} {field}",
      )
    slack = _ambiguous(seq[t], want["threshold"][t], per_tensor)
    assert (
      abs(int(state.adaclip_num_clipped) - want["num_clipped"][t]) <= slack
    ), msg


def _compare_adagn(outs, states, want, rtol=2e-5, atol=1e-30):
  _assert_outputs(outs, want, rtol, atol)
  for t, state in enumerate(states):
    msg = f"step {t + 1}"
    np.testing.assert_array_equal(
      np.asarray(state.adagn_count).reshape(-1), want["count"][t], err_msg=msg
    )
    for field, key in (
      ("adagn_norm", "norm"),
      ("adagn_norm_mean", "mean"),
      ("adagn_norm_sq_mean", "sq_mean"),
      ("adagn_scale", "scale"),
    ):
      np.testing.assert_allclose(
        np.asarray(getattr(state, field)).reshape(-1),
        want[key][t],
        rtol=rtol,
        atol=atol,
        err_msg=f"{msg} {field}",
      )


# ---------------------------------------------------------------------------
# Long runs against the float64 references.

ADACLIP_CONFIGS = {
  "defaults": {},
  "theta0.9": dict(theta=0.9),
  "global": dict(theta=0.95, per_tensor=False),
}
ADAGN_CONFIGS = {
  "defaults": {},
  "slow_eps0": dict(gamma1=0.9, gamma2=0.999, eps=0.0),
  "global": dict(gamma1=0.5, per_tensor=False, eps=1e-3),
}


@pytest.mark.parametrize("name", list(ADACLIP_CONFIGS))
def test_adaclip_matches_reference(name, use_jit):
  config = ADACLIP_CONFIGS[name]
  seq = _grad_sequence(seed=len(name))
  outs, states = _run(oc.adaclip(**config), seq, use_jit)
  want = adaclip_reference(seq, **config)
  _compare_adaclip(
    outs, states, seq, want, per_tensor=config.get("per_tensor", True)
  )
  assert sum(int(s.adaclip_num_clipped) for s in states) > 5


@pytest.mark.parametrize("name", list(ADAGN_CONFIGS))
def test_adagn_matches_reference(name, use_jit):
  config = ADAGN_CONFIGS[name]
  seq = _grad_sequence(seed=10 + len(name))
  outs, states = _run(oc.adagn(**config), seq, use_jit)
  _compare_adagn(outs, states, adagn_reference(seq, **config))


def test_float64_matches_reference_tightly():
  seq = _grad_sequence(seed=21)
  seq64 = [[x.astype(np.float64) for x in step] for step in seq]
  with enable_x64():
    outs, states = _run(oc.adaclip(theta=0.99), seq64, use_jit=True)
    assert states[0].adaclip_max_ema.dtype == np.float64
    _compare_adaclip(
      outs, states, seq64, adaclip_reference(seq64, theta=0.99), rtol=1e-12
    )
    outs, states = _run(oc.adagn(), seq64, use_jit=True)
    assert states[0].adagn_norm_mean.dtype == np.float64
    _compare_adagn(outs, states, adagn_reference(seq64), rtol=1e-12)


def test_nonfinite_is_loud_and_keeps_the_history(use_jit):
  seq = _grad_sequence(seed=3, num_steps=40, nonfinite=True)
  for tx, ref, compare, ema in (
    (
      oc.adaclip(theta=0.9),
      adaclip_reference(seq, theta=0.9),
      lambda o, s, w: _compare_adaclip(o, s, seq, w),
      "adaclip_max_ema",
    ),
    (oc.adagn(), adagn_reference(seq), _compare_adagn, "adagn_norm_mean"),
  ):
    outs, states = _run(tx, seq, use_jit)
    compare(outs, states, ref)
    # Step 6: only tensor 0 (one NaN element) is all NaN; its EMA is kept.
    assert np.isnan(outs[5][0]).all()
    assert np.isfinite(outs[5][1]).all() and np.isfinite(outs[5][2]).all()
    assert getattr(states[5], ema)[0] == getattr(states[4], ema)[0]
    assert np.isnan(outs[9][1]).all() and np.isnan(outs[10][2]).all()
    assert np.isfinite(np.asarray(getattr(states[-1], ema))).all()


def test_global_nonfinite_makes_every_tensor_nan():
  seq = _grad_sequence(seed=4, num_steps=12, nonfinite=True)
  for tx in (oc.adaclip(per_tensor=False), oc.adagn(per_tensor=False)):
    outs, states = _run(tx, seq, use_jit=True)
    assert all(np.isnan(x).all() for x in outs[5])
    assert all(np.isfinite(x).all() for x in outs[6])
    assert int(np.asarray(states[5][0])) == int(np.asarray(states[4][0]))


# ---------------------------------------------------------------------------
# The authors' PyTorch optimizer (tests/data/make_stable_spam_trajectories.py).


def _torch_data():
  data = np.load(DATA)
  return {k: data[k] for k in data.files}


def _split(flat, shapes=((3, 4), (5,))):
  out, start = [], 0
  for s in shapes:
    size = int(np.prod(s))
    out.append(flat[start : start + size].reshape(s))
    start += size
  return out


def _flat(tree):
  return np.concatenate(
    [np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)]
  )


def _run_stable_spam(data, clip, gn, adam):
  """Stable-SPAM as a chain; returns per-step AdaClip and AdaGN outputs,
  params and states."""
  params = _tree(_split(data["params0"]))

  @jax.jit
  def step(grads, states, params):
    clipped, clip_state = clip.update(grads, states[0])
    normalized, gn_state = gn.update(clipped, states[1])
    updates, adam_state = adam.update(normalized, states[2], params)
    return (
      clipped,
      normalized,
      optax.apply_updates(params, updates),
      (clip_state, gn_state, adam_state),
    )

  states = (clip.init(params), gn.init(params), adam.init(params))
  rows = []
  for flat_grads in data["grads"]:
    clipped, normalized, params, states = step(
      _tree(_split(flat_grads)), states, params
    )
    rows.append((_flat(clipped), _flat(normalized), _flat(params), states))
  return rows


def _inner(state):
  return getattr(state, "inner_state", state)


@pytest.mark.parametrize("x64", [False, True], ids=["f32", "f64"])
def test_matches_authors_pytorch_trajectories(x64, standard_promotion):
  """AdaClip's and AdaGN's outputs and statistics every step, and the
  parameters of the whole chain with Adam. The stored trajectories are
  float64 runs rounded to float32. In float32, Adam's own rounding (optax's
  and torch's) accumulates in the parameters over 320 steps of lr 1e-2, so
  they get an absolute tolerance; the float64 run pins them down."""
  data = _torch_data()
  lr, b1, b2, eps, gamma1, gamma2, theta, _ = data["hyper"]
  rtol, params_atol = (2e-6, 1e-6) if x64 else (1e-5, 1e-4)
  with enable_x64() if x64 else contextlib.nullcontext():
    if x64:
      data = {
        k: v.astype(np.float64) if v.dtype == np.float32 else v
        for k, v in data.items()
      }
    rows = _run_stable_spam(
      data,
      oc.adaclip(theta=theta),
      oc.adagn(gamma1=gamma1, gamma2=gamma2, eps=eps),
      optax.adam(lr, b1=b1, b2=b2, eps=eps),
    )
  assert (data["plain_clipped"] != data["grads"]).any()  # AdaClip acted
  for t, (clipped, normalized, params, states) in enumerate(rows):
    msg = f"step {t + 1}"
    np.testing.assert_allclose(
      clipped, data["plain_clipped"][t], rtol=rtol, atol=1e-30, err_msg=msg
    )
    np.testing.assert_allclose(
      normalized, data["plain_normalized"][t], rtol=rtol, atol=1e-7, err_msg=msg
    )
    np.testing.assert_allclose(
      params, data["plain_params"][t], rtol=rtol, atol=params_atol, err_msg=msg
    )
    m_max, m_norm, v_norm = data["plain_stats"][t].T
    np.testing.assert_allclose(
      states[0].adaclip_max_ema, m_max, rtol=rtol, err_msg=msg
    )
    np.testing.assert_allclose(
      states[1].adagn_norm_mean, m_norm, rtol=rtol, err_msg=msg
    )
    np.testing.assert_allclose(
      states[1].adagn_norm_sq_mean, v_norm, rtol=rtol, err_msg=msg
    )


def test_scheduled_gamma1_matches_authors_total_t(standard_promotion):
  """The authors' total_T (a cosine factor on gamma1 and Adam's beta1) is
  reproduced by schedules under inject_hyperparams."""
  data = _torch_data()
  lr, b1, b2, eps, gamma1, gamma2, theta, total_t = data["hyper"]

  def cosine(count):  # torch's CosineAnnealingLR closed form, step count + 1
    t = count + 1
    return 0.5 + 0.25 * (1 + jnp.cos(jnp.pi * t / (total_t + 1)))

  np.testing.assert_allclose(
    [float(cosine(t)) for t in range(len(data["grads"]))],
    data["cosine_scale"],
    rtol=1e-6,
  )
  rows = _run_stable_spam(
    data,
    oc.adaclip(theta=theta),
    optax.inject_hyperparams(oc.adagn)(
      gamma1=lambda c: gamma1 * cosine(c), gamma2=gamma2, eps=eps
    ),
    optax.inject_hyperparams(optax.adam)(
      learning_rate=lr, b1=lambda c: b1 * cosine(c), b2=b2, eps=eps
    ),
  )
  for t, (_, normalized, params, states) in enumerate(rows):
    msg = f"step {t + 1}"
    np.testing.assert_allclose(
      normalized,
      data["cosine_normalized"][t],
      rtol=1e-5,
      atol=1e-7,
      err_msg=msg,
    )
    np.testing.assert_allclose(
      params, data["cosine_params"][t], rtol=1e-5, atol=1e-4, err_msg=msg
    )
    np.testing.assert_allclose(
      _inner(states[1]).adagn_norm_mean,
      data["cosine_stats"][t][:, 1],
      rtol=1e-5,
    )


# ---------------------------------------------------------------------------
# Hand-computed cases.


def test_adaclip_hand_computed():
  tx = oc.adaclip(theta=0.5)
  g1 = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(g1)
  out, state = tx.update(g1, state)
  # Step 1: T = max |g| exactly, nothing clipped, bit-identical.
  assert jnp.array_equal(out["w"], g1["w"])
  assert float(state.adaclip_threshold[0]) == 2.0
  assert int(state.adaclip_num_clipped) == 0
  # Step 2: m = 0.5 * 1 + 0.5 * 11 = 6, T = 6 / 0.75 = 8; -11 and 8.8 are
  # above it and scaled by 8 / 11; 1 is not touched.
  out, state = tx.update({"w": jnp.array([1.0, -11.0, 8.8])}, state)
  np.testing.assert_allclose(out["w"], [1.0, -8.0, 6.4], rtol=1e-6)
  assert float(out["w"][0]) == 1.0
  assert float(state.adaclip_max_ema[0]) == 6.0
  assert int(state.adaclip_num_clipped) == 2
  # A zero step: no observation, output zero, threshold unchanged.
  out, state = tx.update({"w": jnp.zeros(3)}, state)
  assert int(state.adaclip_count[0]) == 2
  assert float(state.adaclip_threshold[0]) == 8.0
  assert not jnp.any(out["w"])


def test_adagn_hand_computed():
  tx = oc.adagn(gamma1=0.5, gamma2=0.5, eps=0.0)
  state = tx.init({"w": jnp.zeros(2)})
  out, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
  np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
  # n = 10: mu = 0.5 * 2.5 + 5 = 6.25 -> 6.25 / 0.75; nu = 0.5 * 12.5 + 50
  # = 56.25 -> 75; ratio = (25 / 3) / sqrt(75) = 0.96225.
  out, state = tx.update({"w": jnp.array([6.0, 8.0])}, state)
  ratio = (6.25 / 0.75) / math.sqrt(56.25 / 0.75)
  np.testing.assert_allclose(out["w"], np.array([0.6, 0.8]) * ratio, rtol=1e-6)
  np.testing.assert_allclose(float(state.adagn_scale[0]), ratio / 10, rtol=1e-6)
  # A zero tensor passes through, the statistics stay.
  out, new_state = tx.update({"w": jnp.zeros(2)}, state)
  assert not jnp.any(out["w"])
  chex.assert_trees_all_equal(new_state.adagn_norm_mean, state.adagn_norm_mean)
  assert float(new_state.adagn_scale[0]) == 1.0


def test_adagn_unrepresentable_square_uses_the_history():
  """float32 norms whose square overflows (or underflows) are no observation:
  the update is rescaled by the history's ratio, finite; none yet: as is."""
  tx = oc.adagn(eps=0.0)
  huge = {"w": jnp.array([3e19, 4e19], jnp.float32)}
  tiny = {"w": jnp.array([3e-25, 4e-25], jnp.float32)}
  state = tx.init(huge)
  out, state = tx.update(huge, state)
  assert jnp.array_equal(out["w"], huge["w"]) and int(state.adagn_count[0]) == 0
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
  for g in (huge, tiny):
    out, new_state = tx.update(g, state)
    np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-5)
    assert int(new_state.adagn_count[0]) == 1
    assert np.isfinite(np.asarray(new_state.adagn_norm_sq_mean)).all()


def test_empty_tree(use_jit):
  for tx, field in (
    (oc.adaclip(), "adaclip_count"),
    (oc.adagn(), "adagn_count"),
  ):
    update = maybe_jit(tx.update, use_jit)
    out, state = update({}, tx.init({}))
    assert out == {} and getattr(state, field).shape == (1,)
    out, state = update({}, state)
    assert int(getattr(state, field)[0]) == 0


def test_mismatched_tree_is_a_clear_error():
  for tx in (oc.adaclip(), oc.adagn()):
    state = tx.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"statistics for 1 tensors.*2 leaves"):
      tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)


# ---------------------------------------------------------------------------
# Differentiation, dtypes, properties.


@pytest.mark.parametrize(
  "make",
  [
    oc.adaclip,
    oc.adagn,
    lambda: oc.adagn(eps=0.0),
    lambda: oc.adaclip(per_tensor=False),
  ],
  ids=["adaclip", "adagn", "adagn_eps0", "adaclip_global"],
)
def test_grad_finite_including_at_zero(make):
  tx = make()
  zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  point = {"a": jnp.array([1.0, -3.0, 0.5]), "b": jnp.ones((2, 2))}

  def loss(grads, state):
    out, new_state = tx.update(grads, state)
    total = sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))
    for x in jax.tree.leaves(new_state):  # the statistics too (inf: skipped)
      if jnp.issubdtype(x.dtype, jnp.floating):
        total = total + jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0))
    return total

  grad_fn = jax.jit(jax.grad(loss))
  fresh = tx.init(zeros)
  _, warm = tx.update(point, fresh)
  for state in (fresh, warm):
    for at in (zeros, point):
      grads = grad_fn(at, state)
      assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_and_structure_kept(dtype):
  seq = _grad_sequence(seed=5, num_steps=40)
  seq_low = [[np.asarray(jnp.asarray(x, dtype)) for x in step] for step in seq]
  structured = lambda leaves: {
    "x": jnp.asarray(leaves[0], dtype),
    "y": [jnp.asarray(leaves[1], dtype), (jnp.asarray(leaves[2], dtype), None)],
  }
  ref64 = [[x.astype(np.float64) for x in step] for step in seq_low]
  for tx, ref, field in (
    (
      oc.adaclip(theta=0.9),
      adaclip_reference(ref64, theta=0.9),
      "adaclip_max_ema",
    ),
    (oc.adagn(), adagn_reference(ref64), "adagn_norm_mean"),
  ):
    update = jax.jit(tx.update)
    state = tx.init(structured(seq_low[0]))
    assert getattr(state, field).dtype == jnp.float32
    for t, step in enumerate(seq_low):
      tree = structured(step)
      out, state = update(tree, state)
      chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
      assert jax.tree.structure(out) == jax.tree.structure(tree)
      for got, exp in zip(jax.tree.leaves(out), ref["outputs"][t]):
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(
          np.asarray(got, np.float64), exp, rtol=tol, atol=1e-30
        )
    assert getattr(state, field).dtype == jnp.float32


_vectors = hnp.arrays(
  np.float32,
  (6,),
  elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
)


# Traced hyperparameters: one compile serves every example.
_adaclip_update = jax.jit(
  lambda g, s, theta: oc.adaclip(theta=theta).update(g, s)
)
_adagn_update = jax.jit(
  lambda g, s, g1, g2: oc.adagn(gamma1=g1, gamma2=g2).update(g, s)
)


@given(
  st.lists(_vectors, min_size=1, max_size=4),
  st.floats(0.05, 0.999),
  st.booleans(),
)
def test_adaclip_properties(steps, theta, zero_last):
  if zero_last:
    steps = [*steps, np.zeros(6, np.float32)]
  state = oc.adaclip().init({"g": jnp.zeros(6)})
  update = lambda g, s: _adaclip_update(g, s, jnp.float32(theta))
  theta = float(np.float32(theta))
  want = adaclip_reference([[s] for s in steps], theta=theta)
  for t, g in enumerate(steps):
    out, state = update({"g": jnp.asarray(g)}, state)
    out, threshold = np.asarray(out["g"]), float(state.adaclip_threshold[0])
    np.testing.assert_allclose(threshold, want["threshold"][t][0], rtol=1e-5)
    within = np.abs(g) <= threshold
    np.testing.assert_array_equal(out[within], g[within])  # bit-identical
    if t == 0:  # the first threshold is the maximum itself: nothing clipped
      assert int(state.adaclip_num_clipped) == 0 and within.all()
    assert np.all(np.abs(out) <= threshold * (1 + 1e-6))
    assert np.all(np.sign(out) == np.sign(g))
    if not within.all():  # the largest element lands on the threshold
      np.testing.assert_allclose(np.max(np.abs(out)), threshold, rtol=1e-6)


@given(
  st.lists(_vectors, min_size=1, max_size=4),
  st.floats(0.05, 0.95),
  st.floats(0.05, 0.999),
)
def test_adagn_properties(steps, gamma1, gamma2):
  state = oc.adagn().init({"g": jnp.zeros(6)})
  update = lambda g, s: _adagn_update(
    g, s, jnp.float32(gamma1), jnp.float32(gamma2)
  )
  gamma1, gamma2 = float(np.float32(gamma1)), float(np.float32(gamma2))
  want = adagn_reference([[s] for s in steps], gamma1=gamma1, gamma2=gamma2)
  for t, g in enumerate(steps):
    out, state = update({"g": jnp.asarray(g)}, state)
    scale = float(state.adagn_scale[0])
    np.testing.assert_allclose(scale, want["scale"][t][0], rtol=1e-4)
    # The direction is kept: out = scale * g.
    np.testing.assert_allclose(
      np.asarray(out["g"]), scale * g, rtol=1e-6, atol=1e-30
    )


# ---------------------------------------------------------------------------
# Tracing, schedules, state.


def test_no_retrace():
  seq = _grad_sequence(seed=7, num_steps=8)
  for tx in (oc.adaclip(), oc.adagn()):
    traces = []

    @jax.jit
    def step(grads, state, tx=tx, traces=traces):
      traces.append(1)
      return tx.update(grads, state)

    state = tx.init(_tree(seq[0]))
    for leaves in seq:
      _, state = step(_tree(leaves), state)
    assert len(traces) == 1


def test_inject_hyperparams_theta_schedule():
  schedule = optax.linear_schedule(0.9, 0.999, transition_steps=50)
  tx = optax.inject_hyperparams(oc.adaclip)(theta=schedule)
  seq = _grad_sequence(seed=13, num_steps=80)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  state = tx.init(_tree(seq[0]))
  outs, states = [], []
  for leaves in seq:
    out, state = step(_tree(leaves), state)
    outs.append([np.asarray(x, np.float64) for x in jax.tree.leaves(out)])
    states.append(jax.tree.map(np.asarray, state.inner_state))
  want = adaclip_reference(seq, theta=lambda t: float(schedule(t)))
  _compare_adaclip(outs, states, seq, want)
  assert float(state.hyperparams["theta"]) == pytest.approx(0.999)


@pytest.mark.parametrize(
  "factory,arg",
  [
    (oc.adaclip, "theta"),
    (oc.adagn, "gamma1"),
    (oc.adagn, "gamma2"),
    (oc.adagn, "eps"),
  ],
)
def test_inject_hyperparams_each_argument(factory, arg):
  """Every other argument at its default; one compile for every value."""
  values = {"theta": 0.99, "gamma1": 0.6, "gamma2": 0.95, "eps": 1e-6}
  schedule = lambda count: values[arg]
  tx = optax.inject_hyperparams(factory)(**{arg: schedule})
  g = {"a": jnp.array([1.0, -4.0]), "b": jnp.ones(3)}
  traces = []

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state)

  state = tx.init(g)
  plain = factory(**{arg: values[arg]})
  plain_state = plain.init(g)
  for k in range(3):
    grads = jax.tree.map(lambda x, k=k: x * (1 + 3 * k), g)
    out, state = step(grads, state)
    want, plain_state = plain.update(grads, plain_state)
    chex.assert_trees_all_close(out, want, rtol=1e-6)
  assert len(traces) == 1


def test_clip_stats_keys(standard_promotion):
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  grads = jax.tree.map(lambda x: x * 2.0, params)
  tx = optax.chain(oc.adaclip(), oc.adagn(), optax.adam(1e-3))
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  stats = oc.clip_stats(state)
  paths = ["dense/bias", "dense/kernel"]
  want = {"adaclip/adaclip_num_clipped"}
  for field in (
    "adaclip_count",
    "adaclip_max_ema",
    "adaclip_max",
    "adaclip_threshold",
  ):
    want |= {f"adaclip/{field}/{p}" for p in paths}
  for field in (
    "adagn_count",
    "adagn_norm_mean",
    "adagn_norm_sq_mean",
    "adagn_norm",
    "adagn_scale",
  ):
    want |= {f"adagn/{field}/{p}" for p in paths}
  assert set(stats) == want
  assert float(stats["adagn/adagn_norm/dense/bias"]) == pytest.approx(
    2 * math.sqrt(3)
  )
  assert optax.tree.get(state, "adaclip_threshold").shape == (2,)
  # One statistic for the whole tree: scalar fields, plain keys.
  tx = optax.chain(oc.adaclip(per_tensor=False), oc.adagn(per_tensor=False))
  state = tx.init(params)
  _, state = tx.update(grads, state)
  stats = oc.clip_stats(state)
  assert "adaclip/adaclip_threshold" in stats and "adagn/adagn_scale" in stats
  assert all(v.shape == () for v in stats.values())
  assert float(stats["adagn/adagn_norm"]) == pytest.approx(6.0)


def test_numpy_round_trip():
  seq = _grad_sequence(seed=11, num_steps=8)
  for tx in (oc.adaclip(), oc.adagn(per_tensor=False)):
    state = tx.init(_tree(seq[0]))
    for leaves in seq[:5]:
      _, state = tx.update(_tree(leaves), state)
    flat, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in flat])
    assert type(restored) is type(state)
    for leaves in seq[5:]:
      out_a, state = tx.update(_tree(leaves), state)
      out_b, restored = tx.update(_tree(leaves), restored)
      chex.assert_trees_all_equal(out_a, out_b)
      chex.assert_trees_all_equal(state, restored)


def test_axis_name_split_tree_equals_whole():
  """Tensors split across a mapped axis (vmap stands in for shard_map)."""
  rng = np.random.default_rng(9)
  steps = [
    {
      "a": rng.normal(size=(2, 4)).astype(np.float32) * (1 + 10 * k),
      "b": rng.normal(size=(2, 3)).astype(np.float32),
    }
    for k in range(3)
  ]
  for make in (oc.adaclip, oc.adagn):
    for per_tensor in (True, False):
      whole = make(per_tensor=per_tensor)
      split = make(per_tensor=per_tensor, axis_name="dev")
      whole_state = whole.init(jax.tree.map(lambda x: x.reshape(-1), steps[0]))
      whole_update = jax.jit(whole.update)
      split_state = jax.vmap(split.init)(steps[0])
      split_update = jax.jit(jax.vmap(split.update, axis_name="dev"))
      for g in steps:
        want, whole_state = whole_update(
          jax.tree.map(lambda x: jnp.asarray(x.reshape(-1)), g), whole_state
        )
        got, split_state = split_update(
          jax.tree.map(jnp.asarray, g), split_state
        )
        chex.assert_trees_all_close(
          jax.tree.map(lambda x: x.reshape(-1), got), want, rtol=1e-5
        )


# ---------------------------------------------------------------------------
# Policies and validation.


@pytest.mark.parametrize("make", [oc.adaclip, oc.adagn])
def test_state_none_says_call_init(make):
  with pytest.raises(ValueError, match=r"state=None.*tx\.init"):
    make().update({"a": jnp.ones(2)}, None)


@pytest.mark.parametrize("make", [oc.adaclip, oc.adagn])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_bool_leaves(make, dtype, use_jit):
  tx = make()
  grads = {"a": jnp.ones(2), "step": {"count": jnp.zeros((), dtype)}}
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(TypeError, match=r"step/count.*" + np.dtype(dtype).name):
    maybe_jit(tx.update, use_jit)(grads, state)


BAD_ARGS = [
  (
    oc.adaclip,
    dict(theta=0.0),
    ValueError,
    r"adaclip: theta must be in the open interval \(0, 1\), got 0\.0",
  ),
  (oc.adaclip, dict(theta=1.0), ValueError, r"adaclip: theta .*got 1\.0"),
  (oc.adaclip, dict(theta=math.nan), ValueError, r"adaclip: theta .*nan"),
  (
    oc.adaclip,
    dict(theta="0.9"),
    TypeError,
    r"adaclip: theta must be a real number",
  ),
  (
    oc.adaclip,
    dict(theta=np.ones(2)),
    ValueError,
    r"adaclip: theta must be a scalar",
  ),
  (
    oc.adaclip,
    dict(per_tensor=1),
    TypeError,
    r"adaclip: per_tensor must be a bool.*got 1",
  ),
  (
    oc.adagn,
    dict(gamma1=1.5),
    ValueError,
    r"adagn: gamma1 must be in the open interval \(0, 1\), got 1\.5",
  ),
  (oc.adagn, dict(gamma1=-0.1), ValueError, r"adagn: gamma1 .*got -0\.1"),
  (
    oc.adagn,
    dict(gamma2=0.0),
    ValueError,
    r"adagn: gamma2 must be in the open interval \(0, 1\), got 0\.0",
  ),
  (
    oc.adagn,
    dict(gamma2=None),
    TypeError,
    r"adagn: gamma2 must be a real number",
  ),
  (
    oc.adagn,
    dict(eps=-1e-8),
    ValueError,
    r"adagn: eps must be finite and non-negative \(0 <= eps < inf\), got"
    r" -1e-08",
  ),
  (oc.adagn, dict(eps=math.inf), ValueError, r"adagn: eps .*got inf"),
  (
    oc.adagn,
    dict(per_tensor="yes"),
    TypeError,
    r"adagn: per_tensor must be a bool.*got 'yes'",
  ),
]


@pytest.mark.parametrize(
  "factory,kwargs,error,message",
  BAD_ARGS,
  ids=[f"{a[0].__name__}-{a[1]}" for a in BAD_ARGS],
)
def test_bad_arguments(factory, kwargs, error, message):
  with pytest.raises(error, match=message):
    factory(**kwargs)

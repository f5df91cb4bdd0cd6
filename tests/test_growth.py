"""clip_norm_growth (Fira's norm-growth limiter): references, state, policy."""

import itertools
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import maybe_jit, run_steps
from hypothesis import given
from hypothesis import strategies as st
from reference import global_norm_reference, norm_growth_reference

import optaxclip as oc

NUM_STEPS = 320
DATA = pathlib.Path(__file__).parent / "data" / "growth_trajectories.npz"


def _tree(b, w):
  return {"b": jnp.asarray(b), "w": jnp.asarray(w)}


def _grad_sequence(seed, nonfinite=False):
  """(b, w) float32 leaves per step: noise, drifts, plateau, spikes, zeros."""
  rng = np.random.default_rng(seed)
  plateau = rng.normal(size=17)
  seq = []
  for t in range(NUM_STEPS):
    noise = rng.normal(size=17)
    if t < 60:
      g = noise
    elif t < 110:
      g = noise * 1.04 ** (t - 60)  # drift up, faster than any small gamma
    elif t < 170:
      g = plateau * 3.0  # the same gradient: growth ratio exactly 1
    elif t < 240:
      g = noise * 3.0 * 0.97 ** (t - 170)  # drift down: never limited
    else:
      g = noise * 0.05
    if rng.random() < 0.05:
      g = g * rng.uniform(5, 500)  # spike
    if t in (0, 1, 2, 100, 101, 200) or 150 <= t < 156:
      g = np.zeros(17)  # zero steps, also before the first observation
    seq.append(g.astype(np.float32))
  if nonfinite:
    seq[3][0] = np.nan  # the first nonzero step is NaN: no reference yet
    seq[50][7] = np.inf
    seq[51][2] = np.nan
    seq[260][16] = -np.inf
  return [(s[:5], s[5:].reshape(3, 4)) for s in seq]


def _run(tx, seq, use_jit=True):
  return run_steps(tx, [_tree(b, w) for b, w in seq], use_jit)


def _compare(outs, states, want, rtol=2e-5):
  """Every step's outputs and state against the float64 reference."""
  for t, (out, state) in enumerate(zip(outs, states)):
    msg = f"step {t}"
    got_b = np.asarray(out["b"], np.float64)
    got_w = np.asarray(out["w"], np.float64)
    want_b, want_w = want["outputs"][t]
    np.testing.assert_allclose(got_b, want_b, rtol=rtol, atol=1e-30,
                               err_msg=msg)
    np.testing.assert_allclose(got_w, want_w, rtol=rtol, atol=1e-30,
                               err_msg=msg)
    np.testing.assert_allclose(state.norm_growth_norm, want["norm"][t],
                               rtol=rtol, err_msg=msg)
    np.testing.assert_allclose(state.norm_growth_limit, want["limit"][t],
                               rtol=rtol, err_msg=msg)
    np.testing.assert_allclose(state.norm_growth_prev_norm,
                               want["prev_norm"][t], rtol=rtol, err_msg=msg)
    # The clip decision may differ only where the norm sits on the limit
    # within float32 rounding.
    limit, norm = want["limit"][t], want["norm"][t]
    if not (math.isfinite(limit) and abs(norm - limit) <= 1e-5 * limit):
      assert bool(state.norm_growth_clipped) == want["clipped"][t], msg


CONFIGS = [
  pytest.param(dict(gamma=1.01), id="fira"),
  pytest.param(dict(gamma=1.5), id="gamma1.5"),
  pytest.param(dict(gamma=1.01, ord=1), id="l1"),
  pytest.param(dict(gamma=1.2, ord="inf"), id="linf"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config, use_jit):
  seq = _grad_sequence(seed=1)
  outs, states = _run(oc.clip_norm_growth(**config), seq, use_jit)
  ord_ = {"inf": math.inf}.get(config.get("ord"), config.get("ord", 2))
  want = norm_growth_reference(seq, config["gamma"], ord_)
  _compare(outs, states, want)
  clipped = sum(bool(s.norm_growth_clipped) for s in states)
  assert 10 < clipped < NUM_STEPS - 10  # both branches well exercised


def test_nonfinite_matches_reference_and_history_is_not_poisoned(use_jit):
  seq = _grad_sequence(seed=2, nonfinite=True)
  outs, states = _run(oc.clip_norm_growth(1.1), seq, use_jit)
  want = norm_growth_reference(seq, 1.1)
  _compare(outs, states, want)
  for t in (3, 50, 51, 260):  # loud: every element NaN
    assert all(np.isnan(np.asarray(x)).all() for x in outs[t].values()), t
    assert not np.isfinite(states[t].norm_growth_norm)
    # The reference norm is kept as it was.
    before = states[t - 1].norm_growth_prev_norm if t > 3 else 0.0
    assert states[t].norm_growth_prev_norm == before
  assert float(states[3].norm_growth_prev_norm) == 0.0
  assert np.isfinite(outs[-1]["w"]).all()


def test_matches_the_authors_pytorch_trajectory(use_jit):
  """Fira's own limiter (tests/data/make_growth_trajectories.py) on 320
  steps without zero or non-finite norms, where the two must agree."""
  data = np.load(DATA)
  seq = list(zip(data["clean_b"], data["clean_w"]))
  outs, states = _run(oc.clip_norm_growth(1.01), seq, use_jit)
  for t, (out, state) in enumerate(zip(outs, states)):
    msg = f"step {t}"
    np.testing.assert_allclose(out["b"], data["clean_out_b"][t], rtol=2e-5,
                               err_msg=msg)
    np.testing.assert_allclose(out["w"], data["clean_out_w"][t], rtol=2e-5,
                               err_msg=msg)
    # The authors' stored norm is the limited one, like the reference here.
    np.testing.assert_allclose(state.norm_growth_prev_norm,
                               data["clean_stored"][t], rtol=2e-5,
                               err_msg=msg)
    limiter = data["clean_limiter"][t]
    if abs(limiter - 1.0) > 1e-5:
      assert bool(state.norm_growth_clipped) == (limiter > 1.0), msg
  assert (data["clean_limiter"] > 1.0).sum() > 100


def test_zero_step_deviates_from_the_authors_on_purpose():
  """The authors store a zero norm and then crush every update to ~1e-8;
  here a zero step passes and the reference norm is kept (documented)."""
  data = np.load(DATA)
  seq = list(zip(data["zero_b"], data["zero_w"]))
  outs, states = _run(oc.clip_norm_growth(1.01), seq)
  got = [np.concatenate([np.ravel(o["b"]), np.ravel(o["w"])]) for o in outs]
  theirs = np.concatenate(
    [data["zero_out_b"], data["zero_out_w"].reshape(60, 12)], axis=1)
  for t in range(21):  # identical up to and including the zero step
    np.testing.assert_allclose(got[t], theirs[t], rtol=2e-5, atol=1e-30)
  assert float(states[20].norm_growth_prev_norm) == pytest.approx(
    data["zero_stored"][19], rel=1e-5)
  # After it, the authors' updates are crushed; ours follow the reference.
  assert np.linalg.norm(theirs[21:], axis=1).max() < 1e-6
  want = norm_growth_reference(seq, 1.01)
  _compare(outs, states, want)
  assert np.linalg.norm(got[21]) > 1.0


def test_nan_step_deviates_from_the_authors_on_purpose():
  data = np.load(DATA)
  seq = list(zip(data["nan_b"], data["nan_w"]))
  outs, states = _run(oc.clip_norm_growth(1.01), seq)
  theirs = np.concatenate(
    [data["nan_out_b"], data["nan_out_w"].reshape(60, 12)], axis=1)
  got = [np.concatenate([np.ravel(o["b"]), np.ravel(o["w"])]) for o in outs]
  for t in range(20):
    np.testing.assert_allclose(got[t], theirs[t], rtol=2e-5)
  assert np.isnan(got[20]).all()
  # The authors store NaN: every later update is NaN. Here it recovers.
  assert np.isnan(theirs[21:]).all() and np.isnan(data["nan_stored"][20])
  assert np.isfinite(np.stack(got[21:])).all()
  np.testing.assert_allclose(states[20].norm_growth_prev_norm,
                             data["nan_stored"][19], rtol=1e-5)
  _compare(outs, states, norm_growth_reference(seq, 1.01))


def test_hand_computed_steps(use_jit):
  tx = oc.clip_norm_growth(gamma=1.1)
  update = maybe_jit(tx.update, use_jit)
  g = lambda *v: {"g": jnp.array(v, jnp.float32)}
  state = tx.init(g(0.0, 0.0))
  assert float(state.norm_growth_limit) == math.inf
  # Zero steps before any observation pass and record nothing.
  out, state = update(g(0.0, 0.0), state)
  assert float(state.norm_growth_prev_norm) == 0.0
  assert not bool(state.norm_growth_clipped)
  # The first nonzero step passes bit-identically and becomes the reference.
  first = g(3.0, 4.0)
  out, state = update(first, state)
  assert jnp.array_equal(out["g"], first["g"])
  assert float(state.norm_growth_prev_norm) == 5.0
  # A spike: held to 1.1 * 5 = 5.5, exactly.
  out, state = update(g(30.0, 40.0), state)
  np.testing.assert_allclose(out["g"], [3.3, 4.4], rtol=1e-6)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["g"])), 5.5, rtol=1e-6)
  assert float(state.norm_growth_limit) == pytest.approx(5.5)
  assert float(state.norm_growth_prev_norm) == pytest.approx(5.5)
  assert bool(state.norm_growth_clipped)
  # Still above: 10 > 1.1 * 5.5 = 6.05, held to 6.05 (the limited norm
  # is the reference, not the spike's 50).
  out, state = update(g(6.0, 8.0), state)
  np.testing.assert_allclose(float(jnp.linalg.norm(out["g"])), 6.05,
                             rtol=1e-6)
  # A zero step in between changes nothing.
  out, state = update(g(0.0, 0.0), state)
  assert jnp.array_equal(out["g"], jnp.zeros(2))
  assert float(state.norm_growth_prev_norm) == pytest.approx(6.05)
  # A fall passes bit-identically and lowers the reference.
  small = g(0.3, 0.4)
  out, state = update(small, state)
  assert jnp.array_equal(out["g"], small["g"])
  assert float(state.norm_growth_prev_norm) == pytest.approx(0.5)
  # Growth of exactly gamma passes: 0.55 = 1.1 * 0.5.
  out, state = update(g(0.55, 0.0), state)
  assert jnp.array_equal(out["g"], jnp.array([0.55, 0.0], jnp.float32))


def test_gamma_inf_disables_and_gamma_one_forbids_growth():
  seq = _grad_sequence(seed=3)[:40]
  outs, _ = _run(oc.clip_norm_growth(math.inf), seq)
  for (b, w), out in zip(seq, outs):
    assert jnp.array_equal(out["b"], b) and jnp.array_equal(out["w"], w)
  outs, _ = _run(oc.clip_norm_growth(1.0), seq)
  norms = [global_norm_reference(list(o.values())) for o in outs]
  observed = [n for n in norms if n > 0]
  assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(observed))


def test_empty_tree(use_jit):
  tx = oc.clip_norm_growth()
  update = maybe_jit(tx.update, use_jit)
  state = tx.init({})
  out, state = update({}, state)
  assert out == {}
  assert float(state.norm_growth_norm) == 0.0
  assert float(state.norm_growth_prev_norm) == 0.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_trees_keep_dtype_and_structure(dtype):
  seq = _grad_sequence(seed=4)[:80]
  cast = [(np.asarray(jnp.asarray(b, dtype)), np.asarray(jnp.asarray(w, dtype)))
          for b, w in seq]
  tx = oc.clip_norm_growth(1.05)
  update = jax.jit(tx.update)
  state = tx.init(_tree(*cast[0]))
  assert state.norm_growth_prev_norm.dtype == jnp.float32
  want = norm_growth_reference(
    [[x.astype(np.float64) for x in step] for step in cast], 1.05)
  rtol = 1e-5 if dtype == jnp.float32 else 1e-2
  for t, (b, w) in enumerate(cast):
    tree = _tree(b, w)
    out, state = update(tree, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert state.norm_growth_norm.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["w"], np.float64),
                               want["outputs"][t][1], rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(state.norm_growth_prev_norm,
                               want["prev_norm"][t], rtol=rtol)


def test_float64_state_under_x64():
  import helpers  # pylint: disable=g-import-not-at-top
  with helpers.enable_x64():
    tx = oc.clip_norm_growth(1.01)
    big = {"g": jnp.array([1e200, 1e200], jnp.float64)}
    state = tx.init(big)
    assert state.norm_growth_prev_norm.dtype == jnp.float64
    _, state = tx.update(big, state)
    out, state = tx.update(jax.tree.map(lambda x: 10 * x, big), state)
    np.testing.assert_allclose(float(state.norm_growth_prev_norm),
                               1.01 * math.sqrt(2) * 1e200, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out["g"]), [1.01e200] * 2,
                               rtol=1e-12)


def test_grad_through_update_is_finite():
  tx = oc.clip_norm_growth(1.1)
  zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  fresh = tx.init(zeros)
  _, with_ref = tx.update({"a": jnp.ones(3), "b": jnp.ones((2, 2))}, fresh)
  for state in (fresh, with_ref):
    def loss(grads, state=state):
      out, _ = tx.update(grads, state)
      return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    for point in (zeros, {"a": jnp.full(3, 1e-30), "b": jnp.zeros((2, 2))},
                  {"a": jnp.full(3, 0.1), "b": jnp.ones((2, 2)) * 0.1},
                  {"a": jnp.full(3, 50.0), "b": jnp.ones((2, 2))}):
      grads = jax.grad(loss)(point)
      assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))
    # Unclipped (zero, or below the limit): the derivative is the identity.
    chex.assert_trees_all_close(jax.grad(loss)(zeros),
                                jax.tree.map(jnp.ones_like, zeros))


def test_no_retrace_over_steps():
  tx = oc.clip_norm_growth(1.01)
  seq = _grad_sequence(seed=5)[:12]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  state = tx.init(_tree(*seq[0]))
  for b, w in seq:  # zero steps, the first observation, clipped steps
    _, state = step(_tree(b, w), state)
  chex.clear_trace_counter()


def test_inject_hyperparams_schedule():
  schedule = optax.linear_schedule(1.5, 1.01, transition_steps=200,
                                   transition_begin=50)
  tx = optax.inject_hyperparams(oc.clip_norm_growth)(gamma=schedule)
  seq = _grad_sequence(seed=6)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  state = tx.init(_tree(*seq[0]))
  outs, states = [], []
  for b, w in seq:
    out, state = step(_tree(b, w), state)
    outs.append(out)
    states.append(jax.tree.map(np.asarray, state.inner_state))
  chex.clear_trace_counter()
  want = norm_growth_reference(seq, lambda t: float(schedule(t)))
  _compare(outs, states, want)
  assert float(state.hyperparams["gamma"]) == pytest.approx(1.01)
  assert "clip_norm_growth/gamma" in oc.clip_stats(state)


def test_inject_hyperparams_ord_is_static():
  with pytest.raises(TypeError, match=r"static_args=\('ord',\)"):
    optax.inject_hyperparams(oc.clip_norm_growth)(ord=1).init(
      {"a": jnp.ones(2)})
  tx = optax.inject_hyperparams(oc.clip_norm_growth, static_args=("ord",))(
    gamma=1.1, ord=1)
  state = tx.init({"a": jnp.ones(2)})
  _, state = jax.jit(tx.update)({"a": jnp.array([1.0, -2.0])}, state)
  assert float(state.inner_state.norm_growth_norm) == 3.0


def test_axis_name_combines_a_split_tree(use_jit):
  """Under a mapped axis, the norm is that of the whole (split) tree."""
  seq = _grad_sequence(seed=7)[:30]
  tx = oc.clip_norm_growth(1.05, axis_name="d")
  whole = oc.clip_norm_growth(1.05)
  # Each "device" holds half of every leaf along a new leading axis.
  split = lambda b, w: {"b": jnp.stack([jnp.asarray(b[:3]),
                                        jnp.asarray(np.r_[b[3:], 0.0])]),
                        "w": jnp.asarray(w).reshape(2, 6)}
  state = tx.init(jax.tree.map(lambda x: x[0], split(*seq[0])))
  states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  mapped = maybe_jit(jax.vmap(tx.update, axis_name="d"), use_jit)
  outs, want_states = _run(whole, seq)
  for (b, w), want, want_state in zip(seq, outs, want_states):
    out, states = mapped(split(b, w), states)
    np.testing.assert_allclose(np.asarray(out["w"]).reshape(3, 4),
                               want["w"], rtol=1e-5)
    np.testing.assert_allclose(states.norm_growth_prev_norm,
                               [want_state.norm_growth_prev_norm] * 2,
                               rtol=1e-5)


_step_cache = {}


def _jitted_step(gamma):
  if gamma not in _step_cache:
    _step_cache[gamma] = jax.jit(oc.clip_norm_growth(gamma).update)
  return _step_cache[gamma]


@given(
  scales=st.lists(
    st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.just(math.inf)),
    min_size=2, max_size=10),
  gamma=st.sampled_from([1.0, 1.01, 2.0]),
)
def test_property_growth_is_bounded_and_matches_reference(scales, gamma):
  direction = np.array([0.6, -0.8, 0.0], np.float32)
  seq = [[np.float32(s) * direction if math.isfinite(s)
          else np.array([np.inf, 1.0, 0.0], np.float32)] for s in scales]
  tx = oc.clip_norm_growth(gamma)
  step = _jitted_step(gamma)
  state = tx.init({"g": jnp.zeros(3)})
  want = norm_growth_reference(seq, gamma)
  prev_out = None
  for t, (g,) in enumerate(seq):
    out, state = step({"g": jnp.asarray(g)}, state)
    np.testing.assert_allclose(np.asarray(out["g"], np.float64),
                               want["outputs"][t][0], rtol=1e-5, atol=1e-30)
    n = float(jnp.linalg.norm(out["g"]))
    if math.isfinite(n) and n > 0:
      if prev_out is not None:  # at most gamma times the last accepted norm
        assert n <= gamma * prev_out * (1 + 1e-5)
      prev_out = n
    np.testing.assert_allclose(float(state.norm_growth_prev_norm),
                               want["prev_norm"][t], rtol=1e-5)


def test_update_without_state_says_call_init():
  tx = oc.clip_norm_growth()
  with pytest.raises(ValueError, match=r"clip_norm_growth: .*state=None.*"
                     r"tx\.init"):
    tx.update({"a": jnp.ones(2)}, None)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_bool_leaves_are_a_type_error(dtype, use_jit):
  tx = oc.clip_norm_growth()
  tree = {"a": jnp.ones(2), "step": jnp.zeros((), dtype)}
  state = tx.init({"a": jnp.ones(2)})
  with pytest.raises(TypeError, match=r"clip_norm_growth: .*'step'"):
    maybe_jit(tx.update, use_jit)(tree, state)


def test_clip_stats_and_tree_get():
  tx = optax.chain(oc.clip_norm_growth(1.1), optax.sgd(0.1))
  params = {"a": jnp.zeros(2)}
  state = tx.init(params)
  for v in (1.0, 5.0):
    _, state = tx.update({"a": jnp.array([v, 0.0])}, state, params)
  stats = oc.clip_stats(state)
  assert sorted(stats) == [
    "clip_norm_growth/norm_growth_clipped",
    "clip_norm_growth/norm_growth_limit",
    "clip_norm_growth/norm_growth_norm",
    "clip_norm_growth/norm_growth_prev_norm",
  ]
  assert float(stats["clip_norm_growth/norm_growth_norm"]) == 5.0
  assert float(stats["clip_norm_growth/norm_growth_limit"]) == pytest.approx(
    1.1)
  assert bool(stats["clip_norm_growth/norm_growth_clipped"])
  assert float(optax.tree.get(state, "norm_growth_prev_norm")) == (
    pytest.approx(1.1))


def test_numpy_round_trip():
  tx = oc.clip_norm_growth(1.05)
  seq = _grad_sequence(seed=8)[:16]
  state = tx.init(_tree(*seq[0]))
  for b, w in seq[:10]:
    _, state = tx.update(_tree(b, w), state)
  flat, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in flat])
  assert type(restored) is oc.ClipNormGrowthState
  for b, w in seq[10:]:
    out_a, state = tx.update(_tree(b, w), state)
    out_b, restored = tx.update(_tree(b, w), restored)
    chex.assert_trees_all_equal(out_a, out_b)
    chex.assert_trees_all_equal(state, restored)


BAD_ARGS = [
  (dict(gamma=0.5), ValueError,
   r"clip_norm_growth: gamma must be in \[1, inf\] .*got 0\.5"),
  (dict(gamma=-1.0), ValueError, r"clip_norm_growth: gamma .*got -1\.0"),
  (dict(gamma=0.0), ValueError, r"clip_norm_growth: gamma .*got 0\.0"),
  (dict(gamma=math.nan), ValueError,
   r"clip_norm_growth: gamma must be a real scalar that is not NaN, got nan"),
  (dict(gamma="1.01"), TypeError,
   r"clip_norm_growth: gamma must be a real number"),
  (dict(gamma=None), TypeError,
   r"clip_norm_growth: gamma must be a real number"),
  (dict(gamma=np.ones(2)), ValueError,
   r"clip_norm_growth: gamma must be a scalar"),
  (dict(ord=3), ValueError,
   r"clip_norm_growth: ord must be one of 1, 2, jnp.inf or 'inf'"),
  (dict(ord=jnp.asarray(2)), TypeError,
   r"clip_norm_growth: ord must be a static Python value"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGS,
                         ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments(kwargs, error, message):
  with pytest.raises(error, match=message):
    oc.clip_norm_growth(**kwargs)


def test_traced_gamma_is_not_checked_and_nan_is_loud():
  tx = optax.inject_hyperparams(oc.clip_norm_growth)(gamma=1.1)
  state = tx.init({"a": jnp.ones(2)})
  update = jax.jit(tx.update)
  _, state = update({"a": jnp.ones(2)}, state)
  state.hyperparams["gamma"] = jnp.asarray(math.nan)
  out, state = update({"a": jnp.ones(2)}, state)
  assert np.isnan(np.asarray(out["a"])).all()
  assert float(state.inner_state.norm_growth_prev_norm) == pytest.approx(
    math.sqrt(2))  # not recorded

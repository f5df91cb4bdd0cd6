"""adagc: long runs against the float64 reference, state, jit, grad, dtypes."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import helpers
import pytest

import optaxclip as oc
import reference
from helpers import enable_x64, maybe_jit, run_steps
from reference import adagc_reference

SHAPES = [(3, 4), (5,), (2, 2, 2)]
NUM_STEPS = 320
DEFAULTS = dict(beta=0.98, lambda_rel=1.05, lambda_abs=1.0, warmup_steps=100,
                eps=1e-8)


def _grad_sequence(seed, num_steps=NUM_STEPS, nonfinite=False):
  """Drifting per-tensor scales with spikes, zero tensors and a zero step."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(num_steps):
    scales = [2.0 * math.exp(-t / 150), 0.1 * (1 + t / 100), 0.5]
    step = []
    for i, shape in enumerate(SHAPES):
      g = rng.normal(size=shape) * scales[i]
      if rng.random() < 0.04:
        g = g * 50.0  # spike
      if rng.random() < 0.03:
        g = np.zeros(shape)
      step.append(g.astype(np.float32))
    seq.append(step)
  seq[2][2][...] = 0.0  # a zero tensor inside every warmup: gamma_2 = 0
  if num_steps > 150:
    seq[150] = [np.zeros(s, np.float32) for s in SHAPES]  # an all-zero step
  if nonfinite:
    seq[1][0][0, 0] = np.nan      # warmup: every tensor NaN, gamma kept
    seq[200][1][2] = np.inf       # after warmup: only tensor 1 NaN
    seq[201][2][0, 0, 0] = np.nan
  return seq


def _tree(leaves):
  return {"w": jnp.asarray(leaves[0]), "b": jnp.asarray(leaves[1]),
          "k": [jnp.asarray(leaves[2])]}


def _leaf_order(step):
  # jax.tree.leaves order of _tree: "b", "k"[0], "w" (dict keys sorted).
  return [step[1], step[2], step[0]]


def _compare(outs, states, want, rtol=1e-5, atol=1e-12):
  for t, (out, state) in enumerate(zip(outs, states)):
    msg = f"step {t + 1}"
    want_out = _leaf_order(want["outputs"][t])
    for got, exp in zip(out, want_out):
      np.testing.assert_allclose(got, exp, rtol=rtol, atol=atol, err_msg=msg)
    perm = [1, 2, 0]
    for field, key in (("adagc_gamma", "gamma"), ("adagc_norms", "norms"),
                       ("adagc_thresholds", "thresholds")):
      np.testing.assert_allclose(getattr(state, field),
                                 want[key][t][perm], rtol=rtol, atol=atol,
                                 err_msg=f"{msg} {field}")
    np.testing.assert_allclose(state.adagc_global_norm, want["global_norm"][t],
                               rtol=rtol, err_msg=msg)
    assert int(state.adagc_num_clipped) == want["num_clipped"][t], msg
    assert int(state.adagc_count) == t + 1


CONFIGS = {
    "defaults": DEFAULTS,
    "warmup1": dict(DEFAULTS, warmup_steps=1, lambda_abs=0.5),
    "warmup5": dict(beta=0.9, lambda_rel=1.5, lambda_abs=2.0, warmup_steps=5,
                    eps=0.0),
    "warmup5_eps": dict(DEFAULTS, warmup_steps=5, eps=1e-3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, use_jit):
  config = CONFIGS[name]
  seq = _grad_sequence(seed=len(name))
  if not use_jit:  # eager dispatch is slow: the warmup and 40 steps after it
    seq = seq[: config["warmup_steps"] + 40]
  outs, states = run_steps(
      oc.adagc(**config), [_tree(x) for x in seq], use_jit, leaves=True)
  _compare(outs, states, adagc_reference(seq, **config))
  assert sum(s.adagc_num_clipped for s in states) > 0


def test_nonfinite_matches_reference(use_jit):
  config = dict(DEFAULTS, warmup_steps=5)
  seq = _grad_sequence(seed=3, nonfinite=True)
  outs, states = run_steps(
      oc.adagc(**config), [_tree(x) for x in seq], use_jit, leaves=True)
  want = adagc_reference(seq, **config)
  _compare(outs, states, want)
  # Warmup step 2: every tensor NaN, thresholds untouched.
  assert all(np.isnan(x).all() for x in outs[1])
  np.testing.assert_array_equal(states[1].adagc_gamma, states[0].adagc_gamma)
  # Step 201: only the inf tensor ("b", leaf 0) is NaN; its gamma is kept.
  assert np.isnan(outs[200][0]).all()
  assert np.isfinite(outs[200][1]).all() and np.isfinite(outs[200][2]).all()
  assert states[200].adagc_gamma[0] == states[199].adagc_gamma[0]
  assert np.isfinite(states[-1].adagc_gamma).all()


def test_zero_warmup_tensor_is_not_absorbing():
  """A zero tensor in warmup leaves gamma unset (inf), with or without eps:
  its first nonzero norm initializes gamma (it used to set gamma = 0, which
  zeroed the tensor forever with eps=0)."""
  zero_then_ones = [[np.zeros(2, np.float32)]] + [
      [np.ones(2, np.float32)]] * 20
  tree = lambda leaves: {"a": jnp.asarray(leaves[0])}
  for eps in (0.0, 1e-2):
    tx = oc.adagc(warmup_steps=1, eps=eps, lambda_rel=2.0)
    state = tx.init(tree(zero_then_ones[0]))
    _, state = tx.update(tree(zero_then_ones[0]), state)
    assert float(state.adagc_gamma[0]) == math.inf
    for leaves in zero_then_ones[1:]:
      out, state = tx.update(tree(leaves), state)
    assert jnp.array_equal(out["a"], jnp.ones(2))
    np.testing.assert_allclose(float(state.adagc_gamma[0]), math.sqrt(2),
                               rtol=1e-6)


def test_unclipped_bit_identical_and_clipped_norm_exact():
  tx = oc.adagc(warmup_steps=1, lambda_rel=1.05)
  g1 = {"a": jnp.array([3.0, 4.0]) / 10, "b": jnp.array([0.3, -0.7])}
  state = tx.init(g1)
  _, state = tx.update(g1, state)
  g2 = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([0.3, -0.7])}
  out, state = tx.update(g2, state)
  assert jnp.array_equal(out["b"], g2["b"])
  np.testing.assert_allclose(float(jnp.linalg.norm(out["a"])), 1.05 * 0.5,
                             rtol=1e-6)
  assert int(state.adagc_num_clipped) == 1


def test_empty_tree(use_jit):
  tx = oc.adagc()
  update = jax.jit(tx.update) if use_jit else tx.update
  state = tx.init({})
  out, state = update({}, state)
  # One placeholder entry: orbax refuses zero-size arrays.
  assert out == {} and state.adagc_gamma.shape == (1,)
  assert float(state.adagc_global_norm) == 0.0
  assert int(state.adagc_num_clipped) == 0


def test_no_retrace_across_warmup():
  tx = oc.adagc(warmup_steps=5)
  seq = _grad_sequence(seed=7, num_steps=10)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state)

  state = tx.init(_tree(seq[0]))
  for leaves in seq:
    _, state = step(_tree(leaves), state)
  assert int(state.adagc_count) == 10


def test_numpy_round_trip():
  tx = oc.adagc(warmup_steps=3)
  seq = _grad_sequence(seed=11, num_steps=8)
  state = tx.init(_tree(seq[0]))
  for leaves in seq[:6]:
    _, state = tx.update(_tree(leaves), state)
  flat, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in flat])
  assert type(restored) is type(state)
  for leaves in seq[6:]:
    out_a, state = tx.update(_tree(leaves), state)
    out_b, restored = tx.update(_tree(leaves), restored)
    chex.assert_trees_all_equal(out_a, out_b)
    chex.assert_trees_all_equal(state, restored)


@pytest.mark.parametrize("warmup_steps", [1, 100])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_grad_finite_at_zero(warmup_steps, eps):
  tx = oc.adagc(warmup_steps=warmup_steps, eps=eps)
  zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = tx.init(zeros)
  _, state = tx.update(zeros, state)  # gamma stays unset (inf): zero norms
  # A state with gamma = 0 (threshold 0 after warmup when eps = 0; zero norms
  # no longer produce it, but a hand-made or old state can hold it).
  zero_gamma = state._replace(adagc_gamma=jnp.zeros_like(state.adagc_gamma))

  for s in (state, zero_gamma):
    def loss(grads, s=s):
      out, _ = tx.update(grads, s)
      return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    for point in (zeros, {"a": jnp.full(3, 5.0), "b": jnp.ones((2, 2))}):
      grads = jax.grad(loss)(point)
      assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))
    grads = jax.grad(loss)(zeros)
    # A threshold of exactly 0 (gamma = 0, eps = 0, after warmup) zeroes the
    # update (docs/design.md#numerics, item 3), so its derivative is 0; otherwise the identity.
    zeroed = s is zero_gamma and eps == 0.0 and warmup_steps == 1
    want = jnp.zeros_like if zeroed else jnp.ones_like
    chex.assert_trees_all_close(grads, jax.tree.map(want, zeros))


def test_bf16_keeps_dtype():
  config = dict(DEFAULTS, warmup_steps=5)
  seq = _grad_sequence(seed=5, num_steps=60)
  seq16 = [[np.asarray(jnp.asarray(x, jnp.bfloat16)) for x in step]
           for step in seq]
  tx = oc.adagc(**config)
  state = tx.init(jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                               _tree(seq[0])))
  assert state.adagc_gamma.dtype == jnp.float32
  update = jax.jit(tx.update)
  want = adagc_reference([[x.astype(np.float64) for x in s] for s in seq16],
                         **config)
  for t, step in enumerate(seq16):
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(step))
    out, state = update(tree, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert state.adagc_gamma.dtype == jnp.float32
    for got, exp in zip(jax.tree.leaves(out), _leaf_order(want["outputs"][t])):
      np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=1e-2,
                                 atol=1e-30)
  np.testing.assert_allclose(state.adagc_gamma, want["gamma"][-1][[1, 2, 0]],
                             rtol=1e-3)


def test_clip_stats_and_tree_get(standard_promotion):
  tx = optax.chain(oc.adagc(warmup_steps=2), optax.sgd(0.1))
  params = _tree([np.zeros(s, np.float32) for s in SHAPES])
  state = tx.init(params)
  for leaves in _grad_sequence(seed=2, num_steps=3):
    _, state = tx.update(_tree(leaves), state, params)
  stats = oc.clip_stats(state)
  for field in ("adagc_count", "adagc_global_norm", "adagc_num_clipped"):
    assert f"adagc/{field}" in stats
  # Per-tensor fields are returned by path, one scalar per tensor.
  paths = ["b", "k/0", "w"]  # _tree's leaves, in jax.tree.leaves order
  for field in ("adagc_gamma", "adagc_norms", "adagc_thresholds"):
    assert [k for k in stats if k.startswith(f"adagc/{field}/")] == [
      f"adagc/{field}/{p}" for p in paths]
  assert int(stats["adagc/adagc_count"]) == 3
  gamma = optax.tree.get(state, "adagc_gamma")
  assert gamma.shape == (3,)
  np.testing.assert_array_equal(
    np.asarray(gamma), [float(stats[f"adagc/adagc_gamma/{p}"]) for p in paths])


def test_inject_hyperparams_schedule():
  schedule = optax.linear_schedule(1.05, 3.0, transition_steps=40,
                                   transition_begin=100)
  tx = optax.inject_hyperparams(oc.adagc)(lambda_rel=schedule)
  seq = _grad_sequence(seed=13, num_steps=160)

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
  want = adagc_reference(seq, **dict(
      DEFAULTS, lambda_rel=lambda t: float(schedule(t))))
  _compare(outs, states, want)
  assert float(state.hyperparams["lambda_rel"]) == pytest.approx(3.0)


def test_inject_hyperparams_warmup_steps_static():
  with pytest.raises(TypeError, match=r"static_args=\('warmup_steps',\)"):
    optax.inject_hyperparams(oc.adagc)(warmup_steps=5).init({"a": jnp.ones(2)})
  tx = optax.inject_hyperparams(oc.adagc, static_args=("warmup_steps",))(
      warmup_steps=5, lambda_rel=1.2)
  state = tx.init({"a": jnp.ones(2)})
  _, state = jax.jit(tx.update)({"a": jnp.ones(2)}, state)
  assert int(state.inner_state.adagc_count) == 1


BAD_ARGS = [
    (dict(beta=0.0), ValueError, r"adagc: beta must be in the open interval "
     r"\(0, 1\), got 0\.0"),
    (dict(beta=1.0), ValueError, r"adagc: beta .* \(0, 1\), got 1\.0"),
    (dict(beta=-0.5), ValueError, r"adagc: beta .* got -0\.5"),
    (dict(beta=math.nan), ValueError, r"adagc: beta must be .*got nan"),
    (dict(beta="0.9"), TypeError, r"adagc: beta must be a real number"),
    (dict(lambda_rel=-1.0), ValueError,
     r"adagc: lambda_rel must be a non-negative scalar.*got -1\.0"),
    (dict(lambda_rel=math.nan), ValueError, r"adagc: lambda_rel .*got nan"),
    (dict(lambda_rel=np.ones(2)), ValueError,
     r"adagc: lambda_rel must be a scalar"),
    (dict(lambda_abs=-0.1), ValueError,
     r"adagc: lambda_abs must be a non-negative scalar.*got -0\.1"),
    (dict(lambda_abs=None), TypeError, r"adagc: lambda_abs must be a real"),
    (dict(warmup_steps=0), ValueError,
     r"adagc: warmup_steps must be an int >= 1, got 0"),
    (dict(warmup_steps=2.5), TypeError,
     r"adagc: warmup_steps must be an int >= 1, got 2\.5"),
    (dict(warmup_steps=jnp.asarray(3)), TypeError,
     r"adagc: warmup_steps .*static_args"),
    (dict(eps=-1e-8), ValueError,
     r"adagc: eps must be finite and non-negative \(0 <= eps < inf\), got"
     r" -1e-08"),
    (dict(eps=math.inf), ValueError, r"adagc: eps .*got inf"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGS,
                         ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments(kwargs, error, message):
  with pytest.raises(error, match=message):
    oc.adagc(**kwargs)


def test_valid_edge_arguments():
  tx = oc.adagc(lambda_rel=math.inf, lambda_abs=0.0, warmup_steps=1, eps=0.0)
  g = {"a": jnp.array([3.0, 4.0])}
  out, state = tx.update(g, tx.init(g))
  assert float(jnp.max(jnp.abs(out["a"]))) == 0.0  # lambda_abs = 0: zeros
  out, state = tx.update(g, state)
  assert jnp.array_equal(out["a"], g["a"])  # lambda_rel = inf: no clipping
  assert int(state.adagc_num_clipped) == 0


# --------------------------------------------------------------------------
# Edge inputs: float64 norms under x64, the counter at int32's maximum, zero
# tensors (never frozen), a state from another tree, the empty tree.
# --------------------------------------------------------------------------


INT32_MAX = int(np.iinfo(np.int32).max)


def test_adagc_float64_norms_beyond_float32_range(use_jit):
  rng = np.random.default_rng(2)
  seq = [
    [1e150 * rng.standard_normal((3, 2)), 1e-150 * rng.standard_normal(4)]
    for _ in range(8)
  ]
  seq[5][0] = seq[5][0] * 30.0  # a spike after warmup
  config = dict(
    beta=0.9, lambda_rel=1.1, lambda_abs=1e151, warmup_steps=3, eps=0.0
  )
  want = reference.adagc_reference(seq, **config)
  with enable_x64():
    tx = oc.adagc(**config)
    update = maybe_jit(tx.update, use_jit)
    tree = lambda s: {"a": jnp.asarray(s[0]), "b": jnp.asarray(s[1])}
    state = tx.init(tree(seq[0]))
    assert state.adagc_gamma.dtype == jnp.float64
    for t, leaves in enumerate(seq):
      out, state = update(tree(leaves), state)
      for got, exp in zip(jax.tree.leaves(out), want["outputs"][t]):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-12)
      np.testing.assert_allclose(
        state.adagc_gamma, want["gamma"][t], rtol=1e-12
      )
      assert int(state.adagc_num_clipped) == want["num_clipped"][t], t
    assert want["num_clipped"][5] >= 1  # the spike was clipped


def test_adagc_count_saturates(use_jit):
  config = dict(
    beta=0.9, lambda_rel=1.5, lambda_abs=10.0, warmup_steps=2, eps=0.0
  )
  rng = np.random.default_rng(3)
  seq = [[rng.standard_normal(3).astype(np.float32)] for _ in range(8)]
  seq[6][0] = seq[6][0] * 40  # a spike after warmup
  tx = oc.adagc(**config)
  update = maybe_jit(tx.update, use_jit)
  tree = lambda s: {"a": jnp.asarray(s[0])}
  state = tx.init(tree(seq[0]))
  for leaves in seq[:4]:
    _, state = update(tree(leaves), state)
  state = state._replace(adagc_count=jnp.asarray(INT32_MAX - 1, jnp.int32))
  want = reference.adagc_reference(seq, **config)
  for t in range(4, 8):
    out, state = update(tree(seq[t]), state)
    np.testing.assert_allclose(
      np.asarray(out["a"]), want["outputs"][t][0], rtol=1e-5
    )
    np.testing.assert_allclose(state.adagc_gamma, want["gamma"][t], rtol=1e-5)
  assert int(state.adagc_count) == INT32_MAX


def _lora_sequence(num_steps, zero_steps, seed=0):
  """Leaf 0 ("a", LoRA's A) is zero for its first ``zero_steps`` steps."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(num_steps):
    a = rng.standard_normal((4, 2)).astype(np.float32) * 0.3
    b = rng.standard_normal((2, 4)).astype(np.float32) * 0.3
    if t < zero_steps:
      a = np.zeros_like(a)
    seq.append([a, b])
  return seq


@pytest.mark.parametrize(
  "zero_steps", [1, 5, 12], ids=["step1", "warmup", "past_warmup"]
)
def test_adagc_tensor_with_zero_first_gradients_is_not_frozen(
  zero_steps, use_jit
):
  config = dict(
    beta=0.98, lambda_rel=1.05, lambda_abs=10.0, warmup_steps=5, eps=1e-8
  )
  seq = _lora_sequence(60, zero_steps)
  seq[40][0] = seq[40][0] * 100.0  # a later spike on "a" is still clipped
  want = reference.adagc_reference(seq, **config)
  tx = oc.adagc(**config)
  update = maybe_jit(tx.update, use_jit)
  tree = lambda s: {"a": jnp.asarray(s[0]), "b": jnp.asarray(s[1])}
  state = tx.init(tree(seq[0]))
  for t, leaves in enumerate(seq):
    out, state = update(tree(leaves), state)
    for got, exp in zip(jax.tree.leaves(out), want["outputs"][t]):
      np.testing.assert_allclose(
        np.asarray(got), exp, rtol=1e-4, atol=1e-7, err_msg=str(t)
      )
    np.testing.assert_allclose(
      state.adagc_gamma, want["gamma"][t], rtol=1e-4, err_msg=str(t)
    )
    if t < zero_steps:
      assert float(state.adagc_gamma[0]) == math.inf
    if t == zero_steps:  # the first nonzero norm initialises gamma
      np.testing.assert_allclose(
        float(state.adagc_gamma[0]), reference.norm([leaves[0]]), rtol=1e-6
      )
    if t == 40:
      assert float(jnp.linalg.norm(out["a"])) < 0.1 * reference.norm(
        [leaves[0]]
      )
  # "a" moves with (almost) its whole gradient, not 1e-8 of it.
  ratio = float(jnp.linalg.norm(out["a"])) / reference.norm([seq[-1][0]])
  assert ratio > 0.5


def test_adagc_zero_tensor_later_leaves_gamma_unchanged(use_jit):
  config = dict(
    beta=0.9, lambda_rel=1.05, lambda_abs=10.0, warmup_steps=3, eps=0.0
  )
  seq = _lora_sequence(30, 0, seed=4)
  for t in (1, 2, 10, 11, 12):  # zero inside warmup and after it
    seq[t][0] = np.zeros_like(seq[t][0])
  want = reference.adagc_reference(seq, **config)
  tx = oc.adagc(**config)
  update = maybe_jit(tx.update, use_jit)
  tree = lambda s: {"a": jnp.asarray(s[0]), "b": jnp.asarray(s[1])}
  state = tx.init(tree(seq[0]))
  gammas = []
  for t, leaves in enumerate(seq):
    out, state = update(tree(leaves), state)
    gammas.append(float(state.adagc_gamma[0]))
    for got, exp in zip(jax.tree.leaves(out), want["outputs"][t]):
      np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-5, atol=1e-7)
  assert gammas[0] == gammas[1] == gammas[2] > 0
  assert gammas[9] == gammas[10] == gammas[11] == gammas[12] > 0
  assert float(jnp.linalg.norm(out["a"])) > 0.1


# 4. Clear errors; a non-empty placeholder for an empty tree.


def test_adagc_state_from_a_different_tree_is_a_clear_error(use_jit):
  tx = oc.adagc()
  state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)})
  update = maybe_jit(tx.update, use_jit)
  with pytest.raises(
    ValueError,
    match=(
      r"^adagc: the state was created by init on a different tree: it holds"
      r" statistics for 3 tensors at a, b, c, but the updates have 2 leaves"
      r" \(2 tensors at a, b\)\. Call init on a tree with the structure"
    ),
  ):
    update({"a": jnp.ones(2), "b": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match=r"^adagc: .* 3 tensors.* 0 leaves"):
    update({}, state)


@pytest.mark.usefixtures("standard_promotion")  # optax.adam's counters
def test_adagc_empty_group_checkpoints_with_orbax(tmp_path):
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  labels = {"w": "main", "b": "main"}
  tx = optax.multi_transform(
    {
      "main": optax.chain(oc.adagc(warmup_steps=2), optax.adam(1e-2)),
      "empty": optax.chain(oc.adagc(warmup_steps=2), optax.adam(1e-2)),
    },
    labels,
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  for scale in (1.0, 2.0, 0.5, 8.0):
    grads = jax.tree.map(lambda p, s=scale: jnp.full_like(p, s), params)
    _, state = step(grads, state, params)
  empty = state.inner_states["empty"].inner_state[0]
  assert empty.adagc_gamma.shape == (1,) and int(empty.adagc_count) == 4
  restored = helpers.orbax_round_trip(state, tmp_path / "state")
  chex.assert_trees_all_equal(restored, state)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  chex.assert_trees_all_equal(
    step(grads, restored, params), step(grads, state, params)
  )


def test_adagc_empty_tree_placeholder(use_jit):
  tx = oc.adagc(warmup_steps=1)
  state = tx.init({})
  assert all(np.asarray(x).size > 0 for x in jax.tree.leaves(state))
  assert float(state.adagc_gamma[0]) == math.inf
  update = maybe_jit(tx.update, use_jit)
  for _ in range(3):
    out, state = update({}, state)
  assert out == {}
  assert int(state.adagc_count) == 3 and int(state.adagc_num_clipped) == 0
  assert float(state.adagc_global_norm) == 0.0
  assert float(state.adagc_gamma[0]) == math.inf
